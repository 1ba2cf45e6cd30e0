"""A study's table as in the paper: each cell the mean ± sd over finished seeds with the seed count,
diverged and failed trials counted (never dropped), the difference to the baseline row with its 95%
confidence interval over seeds, and the paper's value beside ours."""
import math
from dataclasses import dataclass
from importlib import resources
from itertools import product

import pandas as pd

from nvae_platform.summaries import mean_sd

from .intervals import welch_interval

PAPER = "paper (unverified)"
LEVEL = 0.95  # of the interval around each difference to the baseline
# The long table's judgement of a difference, and the mark its formatted Δ carries.
BASELINE, DIFFERS, NOISE, TOO_FEW = "baseline", "differs", "seed noise", "too few seeds"
MARKS = {NOISE: "~", TOO_FEW: "?"}
LEGEND = (f"Δ: difference to the baseline row's mean, [low, high] its {LEVEL:.0%} Welch t interval over seeds; "
          f"{MARKS[NOISE]} marks an interval that contains 0 (not distinguishable from seed noise); "
          f"{MARKS[TOO_FEW]} marks too few seeds to tell (fewer than 2 finished seeds in the row or the baseline "
          "row, so no interval).")
ONE_SEED = ("One seed per configuration: no difference can be judged against seed noise; "
            "run with --seeds 3 or more.")


def load_reference(path=None):
    """The paper's reference values (study, levels, metric, value); the packaged file by default."""
    if path is None:
        path = resources.files("reports") / "paper_reference.csv"
    table = pd.read_csv(path, comment="#")
    missing = {"study", "levels", "metric", "value"} - set(table.columns)
    if missing:
        raise ValueError(f"reference file {path} lacks column(s) {sorted(missing)}: expected study,levels,metric,value")
    return {(r.study, r.levels, r.metric): float(r.value) for r in table.itertuples()}


def level_key(levels):
    """'norm_act=BN+Swish,groups=20': how configurations are named in the reference file."""
    return ",".join(f"{k}={v}" for k, v in levels.items())


@dataclass
class StudyTable:
    long: pd.DataFrame  # one row per configuration and metric, every number unformatted (the CSV)
    display: pd.DataFrame  # the paper-style table of formatted cells (Markdown, LaTeX, HTML)
    seeds: pd.DataFrame  # display's shape: each mean cell's finished-seed values, "" elsewhere (HTML)
    notes: list  # the lines under the table in every format: the Δ legend, the one-seed warning


def _stats(trials, metric):
    column = f"metrics.{metric}"
    finished = trials.loc[trials["status"] == "finished", column].dropna() if column in trials else pd.Series([])
    counts = trials["status"].value_counts()
    n = len(finished)
    return {"mean": finished.mean() if n else math.nan, "std": finished.std(ddof=1) if n > 1 else math.nan,
            "n": n, "diverged": int(counts.get("diverged", 0)), "failed": int(counts.get("failed", 0)),
            "other": len(trials) - n - int(counts.get("diverged", 0)) - int(counts.get("failed", 0)),
            "values": [float(v) for v in finished]}


def _judgement(n, base_n, delta, low, high):
    if math.isnan(delta):
        return ""
    if n < 2 or base_n < 2:
        return TOO_FEW
    return NOISE if low <= 0 <= high else DIFFERS


def long_table(study, reference):
    """Statistics of every (configuration, metric) the study holds, in the study's level order: values
    (the finished seeds' values in seed order), mean, std, n, diverged, failed, paper, and the difference
    to the baseline row: delta, delta_low, delta_high (its 95% Welch interval), delta_df and judgement
    (baseline, differs, seed noise or too few seeds; "" where there is no difference)."""
    trials, factors = study.trials, study.factors
    trials = trials.sort_values("seed", key=lambda seeds: pd.to_numeric(seeds, errors="coerce"), kind="stable")
    rows = []
    for combo in product(*study.levels.values()):
        levels = dict(zip(factors, combo))
        selected = trials[(trials[factors] == pd.Series(levels)).all(axis=1)]
        if selected.empty and not study.running:  # a running study lists the rows still to come
            continue
        for metric in study.columns:
            row = {**levels, "metric": metric, **_stats(selected, metric),
                   "paper": reference.get((study.name, level_key(levels), metric), math.nan)}
            rows.append(row)
    for row in rows:
        row.update(delta=math.nan, delta_low=math.nan, delta_high=math.nan, delta_df=math.nan, judgement="")
        if not study.baseline:
            continue
        base = {**{f: row[f] for f in factors}, **study.baseline}
        match = [r for r in rows if r["metric"] == row["metric"] and all(r[f] == v for f, v in base.items())]
        if not match:
            continue
        if match[0] is row:
            row.update(delta=0.0 if row["n"] else math.nan, judgement=BASELINE)
            continue
        delta, low, high, df = welch_interval(row["values"], match[0]["values"], LEVEL)
        row.update(delta=delta, delta_low=low, delta_high=high, delta_df=df,
                   judgement=_judgement(row["n"], match[0]["n"], delta, low, high))
    return pd.DataFrame(rows)


def format_cell(row):
    """'3.264 ± 0.012 (n=3)', with diverged and failed trials named, or '- (2 diverged)'."""
    notes = [f"{row[k]} {k}" for k in ("diverged", "failed") if row[k]]
    if row["n"] == 0:
        return "- (" + ", ".join(notes or ["no finished trial"]) + ")"
    text = mean_sd(row["mean"], row["std"], row["n"]) + f" (n={row['n']})"
    return text + "".join(f"; {note}" for note in notes)


def format_delta(row):
    """'+0.012 [+0.004, +0.020]', '+0.012 [-0.010, +0.034] ~' (within seed noise), '+0.012 ?' (too few
    seeds) or 'baseline'; the decimals are those of the interval's half-width to 2 significant digits."""
    judgement, delta = row["judgement"], row["delta"]
    if judgement == BASELINE or math.isnan(delta):
        return judgement
    if judgement == TOO_FEW:
        return f"{delta:+.3g} {MARKS[TOO_FEW]}"
    low, high = row["delta_low"], row["delta_high"]
    d = max(0, 1 - math.floor(math.log10((high - low) / 2))) if high > low else 3  # decimals
    text = f"{delta:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}]"
    return text + (f" {MARKS[NOISE]}" if judgement == NOISE else "")


def table_notes(study):
    """The lines every format prints under the table: the Δ legend (when there is a baseline), that the
    study is still running (with its trials ended), a plain warning when the study ran one seed, so no difference can be judged, and one per seed whose
    trials read different data."""
    lines = [LEGEND] if study.baseline else []
    if study.running:
        ended = int((study.trials["status"] != "running").sum())
        lines.append(f"The study is still running (its MLflow run is RUNNING; or its driver was killed): {ended} of "
                     f"{max(study.planned, len(study.trials))} trials have ended, and this table is not final.")
    if study.trials["seed"].nunique() < 2:
        lines.append(ONE_SEED)
    return lines + data_warnings(study.trials)


def data_warnings(trials):
    """A line for each seed whose trials read different data (dataset digests differ): their rows are
    not comparable. Seeds may differ from each other: a set split here is split by its seed."""
    if "data_digest" not in trials:
        return []
    lines = []
    for seed, digests in trials.dropna(subset=["data_digest"]).groupby("seed")["data_digest"]:
        if digests.nunique() > 1:
            lines.append(f"Warning: the trials of seed {seed} read different data (dataset digests "
                         f"{', '.join(sorted(digests.unique()))}); their rows are not comparable.")
    return lines


def display_table(study, long):
    """The paper's layout: rows = the non-`across` factors; columns = each metric (or each level of
    `across`), each followed by its difference to the baseline and the paper's value where known."""
    return _layout(study, long)[0]


def _layout(study, long):
    """display_table, and beside it a frame of its shape holding each mean cell's finished-seed values."""
    row_factors = [f for f in study.factors if f != study.across]
    has_paper = long["paper"].notna().any()
    cells, seeds = {}, {}
    for _, row in long.iterrows():
        key = tuple(row[f] for f in row_factors)
        head = f"{study.across}={row[study.across]}" if study.across else row["metric"]
        if study.across and row["metric"] != study.columns[0]:
            continue
        entry = cells.setdefault(key, {})
        entry[head] = format_cell(row)
        seeds.setdefault(key, {})[head] = " ".join(f"{v:.4g}" for v in row["values"])
        if study.baseline:
            entry[f"Δ {head}"] = format_delta(row)
        if has_paper:
            entry[f"{PAPER} {head}"] = "" if math.isnan(row["paper"]) else f"{row['paper']:g}"
    index = None
    if len(row_factors) == 1:
        index = pd.Index([key[0] for key in cells], name=row_factors[0])
    elif row_factors:
        index = pd.MultiIndex.from_tuples(list(cells), names=row_factors)
    display = pd.DataFrame(list(cells.values()), index=index).fillna("")
    values = pd.DataFrame(list(seeds.values()), index=index).reindex(columns=display.columns, fill_value="")
    return display, values.fillna("")


def build_table(study, reference):
    """The study's long table, its display table with the per-seed values beside it, and its notes."""
    long = long_table(study, reference)
    display, seeds = _layout(study, long)
    return StudyTable(long=long, display=display, seeds=seeds, notes=table_notes(study))
