"""Build the report of an MLflow experiment: for each study invocation, its table (Markdown, CSV,
LaTeX), its plots (PNG) and one self-contained HTML page with the sample grids.

    paths = build_report("ablation_norm", tracking_uri="sqlite:///mlflow.db", out="reports-out")
"""
import os
import tempfile

from mlflow.tracking import MlflowClient

from nvae_platform.verdicts import judge, verdict_lines

from . import plots
from .runs import load_studies
from .tables import PAPER, build_table, load_reference
from .writers import to_csv, to_html, to_latex, to_markdown

MAX_SAMPLE_GRIDS = 24
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per grid is noise here


def _histories(client, trials, metric="val_bpd"):
    return {row.run_name: [(m.step, m.value) for m in client.get_metric_history(row.run_id, metric)]
            for row in trials.itertuples()}


def _sample_grids(client, study):
    """One sample grid per configuration (its first finished trial), at most MAX_SAMPLE_GRIDS."""
    grids = []
    finished = study.trials[study.trials["status"] == "finished"]
    for _, first in finished.groupby(study.factors, sort=False).head(1).head(MAX_SAMPLE_GRIDS).iterrows():
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = client.download_artifacts(first["run_id"], "samples.png", folder)
            except Exception:  # noqa: BLE001, S112  a run without its grid still has its numbers
                continue
            with open(path, "rb") as f:
                grids.append((f"samples of {first['run_name']} (temperatures 1.0, 0.8, 0.6)", f.read(), "grid"))
    return grids


def study_report(client, study, reference):
    """Everything of one study invocation, in memory: {file name: bytes or str}."""
    table = build_table(study, reference)
    verdicts = judge(study.findings, study.trials, study.levels, study.looks, reference, study.name)
    findings = "".join(f"{line}\n" for line in verdict_lines(verdicts))
    caption = f"{study.name} ({study.scale}): " + ", ".join(study.columns) + "; mean ± sd over finished seeds"
    figures = {"val_bpd_per_epoch.png": plots.validation_curves(_histories(client, study.trials)),
               "kl_per_group.png": plots.kl_per_group(study)}
    if study.across:
        row_factors = [f for f in study.factors if f != study.across]
        figures[f"{study.columns[0]}_against_{study.across}.png"] = plots.metric_against(
            table.long, study.across, study.columns[0], row_factors)
    if study.kind == "search" and len(study.objectives) >= 2:
        figures["pareto_front.png"] = plots.pareto_front(study.trials, study.objectives)
    figures = {name: png for name, png in figures.items() if png is not None}
    intro = (f"Run {study.run_name} (MLflow parent run {study.parent_id}), {len(study.trials)} trials. "
             f"Cells: mean ± sd over finished seeds (n), each finished seed's value in grey beside it; diverged and "
             f"failed trials are counted in the cell. "
             f"Δ: difference to the baseline row {study.baseline or '(none)'}, with its 95% interval over seeds. "
             f"'{PAPER}': the paper's value as recalled, from reports/paper_reference.csv.")
    images = [(name[:-4].replace("_", " "), png) for name, png in figures.items()] + _sample_grids(client, study)
    note = "" if table.long["paper"].notna().any() else " The paper's values are known at scale paper only."
    files = {"table.md": (f"{findings}\n" if findings else "") + f"{caption}.{note}\n\n"
             + to_markdown(table.display, table.notes),
             "table.csv": to_csv(table.long, table.notes), "table.tex": to_latex(table.display, caption, table.notes),
             "report.html": to_html(f"{study.name}: {study.run_name}", [(caption, intro, table, images)], verdicts)}
    return {**files, **figures}


def build_report(experiment, tracking_uri=None, out="reports-out", reference=None):
    """Write each study invocation's report under out/<experiment>/<run name>/; return the file paths.
    Everything is built before the first file is written, so an error leaves nothing behind."""
    client = MlflowClient(tracking_uri)
    studies = load_studies(experiment, client.tracking_uri)
    values = load_reference(reference)
    built = {study.run_name: study_report(client, study, values) for study in studies}
    paths = []
    for run_name, files in built.items():
        folder = os.path.join(out, experiment, run_name)
        os.makedirs(folder, exist_ok=True)
        for name, content in files.items():
            path = os.path.join(folder, name)
            with open(path, "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
            paths.append(path)
    return paths
