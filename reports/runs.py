"""The runs of a study as pandas, read through MLflow's search: one StudyRuns per study and scale (an
MLflow parent run), holding the trials of every invocation that added seeds or levels to it."""
import json
from dataclasses import dataclass, field

import pandas as pd
from mlflow.tracking import MlflowClient

from nvae_platform.findings import from_json

PARENT = "tags.mlflow.parentRunId"


class ReportError(ValueError):
    """A report cannot be built; the message says why and what to do."""


@dataclass
class StudyRuns:
    """One study (an MLflow parent run) and its trial runs."""

    name: str  # the study's name, e.g. ablation_norm
    run_name: str  # the parent run's name, e.g. ablation_norm-smoke-cd3630ce
    parent_id: str
    scale: str
    kind: str  # grid or search
    levels: dict  # factor -> level names, in the study's order
    columns: list  # metrics of the table
    across: str = ""  # a factor spread across the table's columns
    baseline: dict = field(default_factory=dict)
    objectives: dict = field(default_factory=dict)  # a search's metric -> min/max
    trials: pd.DataFrame = None  # one row per trial: factor levels, seed, status, run_id, run_name, metrics.*
    findings: list = field(default_factory=list)  # nvae_platform.findings.Finding, as the study recorded them
    looks: int = 1  # of a sequential run (--until-decided): each verdict is judged at ALPHA / looks
    running: bool = False  # the parent run is still RUNNING: the study runs (or its driver was killed)
    planned: int = 0  # the trials the study's invocations planned (its parent's tag), 0 if unknown

    @property
    def factors(self):
        return list(self.levels)


def load_studies(experiment, tracking_uri=None):
    """Every study (parent run) recorded in the MLflow experiment, newest first."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"experiment {experiment!r} not found in {client.tracking_uri}; it has: "
                          f"{', '.join(names) or 'no experiments'}. Pass --tracking-uri for another store.")
    runs = runs_frame(client, found.experiment_id)
    if runs.empty or PARENT not in runs or "tags.nvae.study" not in runs or runs[PARENT].isna().all():
        raise ReportError(f"experiment {experiment!r} holds no study runs (no parent run with trial runs); "
                          "run a study first, e.g. python studies/ablation_norm.py")
    parents = runs[runs[PARENT].isna() & runs["tags.nvae.study"].notna()].sort_values("start_time", ascending=False)
    studies = [_study(parent, runs[runs[PARENT] == parent["run_id"]]) for _, parent in parents.iterrows()]
    studies = [s for s in studies if len(s.trials)]
    if not studies:
        raise ReportError(f"experiment {experiment!r} has study runs but none with a trial yet")
    return studies


def runs_frame(client, experiment_id):
    """Every run of the experiment as one row: run_id, start_time, status, tags.*, params.*, metrics.*
    (the columns of mlflow.search_runs, without its side effect of setting the process's tracking URI)."""
    rows, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=10000, page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "start_time": run.info.start_time, "status": run.info.status}
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            rows.append(row)
        token = page.token
        if not token:
            return pd.DataFrame(rows)


def _param(row, name, default=""):
    value = row.get(f"params.{name}")
    return default if value is None or (isinstance(value, float) and pd.isna(value)) else value


def _looks(parent):
    """The looks the study's verdicts were judged at: its tag (--until-decided writes it), else 1."""
    tag = parent.get("tags.nvae.findings.looks")
    return tag if isinstance(tag, str) and tag else _param(parent, "findings.looks", "1")


def _levels(parent, children):
    """{factor: levels} of the study: its parent's tags, which each invocation widens (params in records of
    earlier versions), and any level its trial runs hold beside them."""
    def named(prefix):
        return {k[len(prefix):]: v.split(",") for k, v in parent.items() if k.startswith(prefix) and isinstance(v, str)}

    levels = named("tags.nvae.levels.") or named("params.levels.")
    order = [f for f in _param(parent, "factors").split(",") if f in levels]  # MLflow keeps no param order
    levels = {f: levels[f] for f in order + sorted(set(levels) - set(order))}
    for name, names in levels.items():
        names += [n for n in children.get(f"tags.factor.{name}", pd.Series(dtype=object)).dropna().unique()
                  if n not in names]
    return levels


def _study(parent, children):
    levels = _levels(parent, children)
    objectives = dict(pair.split(":") for pair in _param(parent, "objectives").split(",") if pair)
    trials = pd.DataFrame({name: children.get(f"tags.factor.{name}") for name in levels})
    trials["seed"] = children.get("tags.nvae.seed")
    trials["status"] = children.get("tags.nvae.status").fillna("running")
    trials["run_id"] = children["run_id"]
    trials["run_name"] = children.get("tags.mlflow.runName")
    trials["data_digest"] = children.get("tags.nvae.data_digest")
    # metrics keep MLflow's "metrics." prefix: a factor may share a metric's name (lr)
    trials = pd.concat([trials, children[[c for c in children.columns if c.startswith("metrics.")]]], axis=1)
    return StudyRuns(
        name=parent["tags.nvae.study"], run_name=parent.get("tags.mlflow.runName", parent["run_id"]),
        parent_id=parent["run_id"], scale=parent.get("tags.nvae.scale") or parent.get("tags.nvae.preset", ""),
        kind=parent.get("tags.nvae.kind", "grid"),
        levels=levels, columns=[c for c in _param(parent, "table.columns", "test_bpd").split(",") if c],
        across=_param(parent, "table.across"), baseline=json.loads(_param(parent, "table.baseline", "{}")),
        objectives=objectives, trials=trials.reset_index(drop=True), findings=from_json(_param(parent, "findings")),
        looks=int(_looks(parent)), running=parent.get("status") == "RUNNING",
        planned=int(parent.get("tags.nvae.trials") or 0))
