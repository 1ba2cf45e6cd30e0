"""A study's table as in the paper: each cell the mean ± sd over finished seeds with the seed count,
diverged and failed trials counted (never dropped), the difference to the baseline row and the
paper's value beside ours."""
import math
from dataclasses import dataclass
from importlib import resources
from itertools import product

import pandas as pd

from nvae_platform.figures import mean_sd

PAPER = "paper (unverified)"


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


def _stats(trials, metric):
    column = f"metrics.{metric}"
    finished = trials.loc[trials["status"] == "finished", column].dropna() if column in trials else pd.Series([])
    counts = trials["status"].value_counts()
    n = len(finished)
    return {"mean": finished.mean() if n else math.nan, "std": finished.std(ddof=1) if n > 1 else math.nan,
            "n": n, "diverged": int(counts.get("diverged", 0)), "failed": int(counts.get("failed", 0)),
            "other": len(trials) - n - int(counts.get("diverged", 0)) - int(counts.get("failed", 0))}


def long_table(study, reference):
    """Statistics of every (configuration, metric) the study holds, in the study's level order."""
    trials, factors = study.trials, study.factors
    rows = []
    for combo in product(*study.levels.values()):
        levels = dict(zip(factors, combo))
        selected = trials[(trials[factors] == pd.Series(levels)).all(axis=1)]
        if selected.empty:
            continue
        for metric in study.columns:
            row = {**levels, "metric": metric, **_stats(selected, metric),
                   "paper": reference.get((study.name, level_key(levels), metric), math.nan)}
            rows.append(row)
    table = pd.DataFrame(rows)
    table["delta"] = math.nan
    if study.baseline and not table.empty:
        for i, row in table.iterrows():
            base = {**{f: row[f] for f in factors}, **study.baseline}
            match = table[(table[factors] == pd.Series(base)).all(axis=1) & (table["metric"] == row["metric"])]
            if len(match):
                table.loc[i, "delta"] = row["mean"] - match["mean"].iloc[0]
    return table


def format_cell(row):
    """'3.264 ± 0.012 (n=3)', with diverged and failed trials named, or '- (2 diverged)'."""
    notes = [f"{row[k]} {k}" for k in ("diverged", "failed") if row[k]]
    if row["n"] == 0:
        return "- (" + ", ".join(notes or ["no finished trial"]) + ")"
    text = mean_sd(row["mean"], row["std"], row["n"]) + f" (n={row['n']})"
    return text + "".join(f"; {note}" for note in notes)


def _delta(row, baseline_row):
    if baseline_row:
        return "baseline"
    return "" if math.isnan(row["delta"]) else f"{row['delta']:+.3g}"


def display_table(study, long):
    """The paper's layout: rows = the non-`across` factors; columns = each metric (or each level of
    `across`), each followed by its difference to the baseline and the paper's value where known."""
    row_factors = [f for f in study.factors if f != study.across]
    has_paper = long["paper"].notna().any()
    cells = {}
    for _, row in long.iterrows():
        key = tuple(row[f] for f in row_factors)
        head = f"{study.across}={row[study.across]}" if study.across else row["metric"]
        if study.across and row["metric"] != study.columns[0]:
            continue
        is_baseline = bool(study.baseline) and all(row[f] == v for f, v in study.baseline.items())
        entry = cells.setdefault(key, {})
        entry[head] = format_cell(row)
        if study.baseline:
            entry[f"Δ {head}"] = _delta(row, is_baseline)
        if has_paper:
            entry[f"{PAPER} {head}"] = "" if math.isnan(row["paper"]) else f"{row['paper']:g}"
    index = None
    if len(row_factors) == 1:
        index = pd.Index([key[0] for key in cells], name=row_factors[0])
    elif row_factors:
        index = pd.MultiIndex.from_tuples(list(cells), names=row_factors)
    return pd.DataFrame(list(cells.values()), index=index).fillna("")


def build_table(study, reference):
    long = long_table(study, reference)
    return StudyTable(long=long, display=display_table(study, long))
