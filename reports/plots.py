"""The report's plots (matplotlib, PNG bytes): learning curves, KL per latent group, test bpd
against the factor spread across the table, and a search's Pareto front."""
import io
import re
from itertools import product

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from nvae_platform.summaries import non_dominated


def _png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def validation_curves(histories):
    """Validation bits/dim per epoch, one line per trial; histories: {trial name: [(epoch, value)]}.
    None when no trial has one (every trial diverged or failed in its first epoch)."""
    if not any(histories.values()):
        return None
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name, points in histories.items():
        if points:
            epochs, values = zip(*sorted(points))
            axes.plot(np.array(epochs) + 1, values, marker="o" if len(points) < 12 else None, label=name, lw=1)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
    axes.set_ylabel("validation bits/dim")
    axes.set_title("Validation bits/dim of every trial")
    if len(histories) <= 12:
        axes.legend(fontsize=7)
    return _png(figure)


def kl_means(study):
    """The mean final training KL of each latent group (columns, top group first) per configuration
    (rows, in the study's level order, not the order the trials ran in); None without such metrics."""
    finished = study.trials[study.trials["status"] == "finished"]
    columns = sorted((c for c in finished.columns if re.fullmatch(r"metrics\.train_kl_group_\d+", c)),
                     key=lambda c: int(c.rsplit("_", 1)[1]))
    if finished.empty or not columns:
        return None
    means = finished.groupby(study.factors, sort=False)[columns].mean()
    order = [c if len(c) > 1 else c[0] for c in product(*study.levels.values())]
    return means.reindex([key for key in order if key in means.index])


def kl_per_group(study):
    """Heatmap of the final training KL (nats) of each latent group, per configuration: a group near
    zero has collapsed onto its prior."""
    means = kl_means(study)
    if means is None:
        return None
    columns = list(means.columns)
    labels = [", ".join(map(str, k if isinstance(k, tuple) else (k,))) for k in means.index]
    figure, axes = plt.subplots(figsize=(1.2 + 0.45 * len(columns), 1 + 0.35 * len(labels)))
    image = axes.imshow(means.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(columns)), [c.rsplit("_", 1)[1] for c in columns])
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_xlabel("latent group (0 = top)")
    axes.set_ylabel(", ".join(study.factors), fontsize=8)
    axes.set_title("Training KL per latent group (nats)")
    figure.colorbar(image, ax=axes)
    return _png(figure)


def metric_against(long, across, metric, row_factors):
    """metric (mean ± sd over finished seeds) against the numeric levels of `across`, a line per row."""
    rows = long[long["metric"] == metric]
    try:
        x = rows[across].astype(float)
    except ValueError:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for key, group in rows.assign(x=x).groupby(row_factors, sort=False):
        label = ", ".join(map(str, key if isinstance(key, tuple) else (key,)))
        done = group[group["n"] > 0]
        axes.errorbar(done["x"], done["mean"], yerr=done["std"].fillna(0), marker="o", capsize=3, label=label)
        lost = group[(group["n"] == 0) & (group["diverged"] + group["failed"] > 0)]
        if len(lost):
            axes.plot([], [], " ", label=f"{label}: diverged/failed at {across} = "
                                         + ", ".join(f"{v:g}" for v in lost["x"]))
    axes.set_xlabel(across)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} against {across}")
    axes.legend(fontsize=7)
    return _png(figure)


def pareto_front(trials, objectives):
    """Finished trials in the plane of two objectives, the non-dominated ones joined."""
    (x_name, x_mode), (y_name, y_mode) = list(objectives.items())[:2]
    columns = [f"metrics.{x_name}", f"metrics.{y_name}"]
    if not set(columns) <= set(trials.columns):
        return None
    done = trials[(trials["status"] == "finished")].dropna(subset=columns)
    if done.empty:
        return None
    points = done[columns].to_numpy(dtype=float)
    rows = [{x_name: float(x), y_name: float(y)} for x, y in points]
    front = np.array(sorted((r[x_name], r[y_name]) for r in non_dominated(rows, {x_name: x_mode, y_name: y_mode})))
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.scatter(points[:, 0], points[:, 1], color="0.6", label="trials")
    axes.plot(front[:, 0], front[:, 1], "o-", color="C3", label="Pareto front")
    axes.set_xlabel(x_name)
    axes.set_ylabel(y_name)
    axes.set_title("Architecture search: Pareto front")
    axes.legend(fontsize=8)
    return _png(figure)
