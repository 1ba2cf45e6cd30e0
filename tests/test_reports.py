"""Reports from a store of known runs, written through MLflow's real API: exact numbers, counts,
diverged and failed marking, the paper's values, every output format, and the errors."""
import json
import math
import os

import pytest
from mlflow.tracking import MlflowClient

from reports.__main__ import main
from reports.build import build_report
from reports.runs import ReportError, load_studies
from reports.tables import build_table, load_reference

# (norm_act, groups, seed, status, test_bpd)
TRIALS = [("WN+ELU", "10", 0, "finished", 3.30), ("WN+ELU", "10", 1, "finished", 3.40),
          ("WN+ELU", "40", 0, "diverged", None), ("WN+ELU", "40", 1, "diverged", None),
          ("BN+Swish", "10", 0, "finished", 3.34), ("BN+Swish", "10", 1, "finished", 3.36),
          ("BN+Swish", "40", 0, "finished", 3.10), ("BN+Swish", "40", 1, "finished", 3.20),
          ("BN+Swish", "40", 2, "failed", None)]


@pytest.fixture()
def store(tmp_path):
    """An ablation_norm study at paper scale as the platform records it: a parent and nine trials."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ablation_norm", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, run_name="ablation_norm-paper-0123abcd",
                               tags={"nvae.study": "ablation_norm", "nvae.scale": "paper", "nvae.kind": "grid"})
    pid = parent.info.run_id
    for key, value in {"levels.norm_act": "WN+ELU,BN+Swish", "levels.groups": "10,40", "factors": "norm_act,groups",
                       "table.columns": "test_bpd", "table.across": "groups",
                       "table.baseline": json.dumps({"norm_act": "BN+Swish"})}.items():
        client.log_param(pid, key, value)
    for act, groups, seed, status, bpd in TRIALS:
        run = client.create_run(experiment, run_name=f"norm_act={act},groups={groups},seed={seed}",
                                tags={"mlflow.parentRunId": pid, "factor.norm_act": act, "factor.groups": groups,
                                      "nvae.seed": str(seed), "nvae.status": status})
        for epoch in range(3):
            client.log_metric(run.info.run_id, "val_bpd", 4.0 - 0.2 * epoch, step=epoch)
        for group in range(int(groups) // 10):
            client.log_metric(run.info.run_id, f"train_kl_group_{group}", 0.5 * group, step=2)
        if bpd is not None:
            client.log_metric(run.info.run_id, "test_bpd", bpd, step=2)
        client.set_terminated(run.info.run_id)
    client.set_terminated(pid)
    return uri, tmp_path


def test_cells_are_mean_sd_over_finished_seeds_with_diverged_and_failed_counted(store):
    uri, _ = store
    study = load_studies("ablation_norm", uri)[0]
    assert study.factors == ["norm_act", "groups"] and study.across == "groups"
    table = build_table(study, load_reference())
    cells = table.display
    assert list(cells.columns) == ["groups=10", "Δ groups=10", "paper (unverified) groups=10",
                                   "groups=40", "Δ groups=40", "paper (unverified) groups=40"]
    assert cells.loc["WN+ELU"].tolist() == ["3.35 ± 0.071 (n=2)", "+0", "3.36", "- (2 diverged)", "", "3.31"]
    assert cells.loc["BN+Swish"].tolist() == ["3.35 ± 0.014 (n=2)", "baseline", "3.34",
                                              "3.15 ± 0.071 (n=2); 1 failed", "baseline", "3.16"]


def test_the_csv_holds_the_exact_numbers(store):
    uri, _ = store
    long = build_table(load_studies("ablation_norm", uri)[0], load_reference()).long.set_index(["norm_act", "groups"])
    row = long.loc[("WN+ELU", "10")]
    assert row["mean"] == pytest.approx(3.35) and row["std"] == pytest.approx(math.sqrt(0.005)) and row["n"] == 2
    assert row["delta"] == pytest.approx(0.0) and row["paper"] == 3.36
    lost = long.loc[("WN+ELU", "40")]
    assert (lost["n"], lost["diverged"], lost["failed"]) == (0, 2, 0) and math.isnan(lost["mean"])
    mixed = long.loc[("BN+Swish", "40")]
    assert (mixed["n"], mixed["failed"], mixed["mean"]) == (2, 1, pytest.approx(3.15))


def test_a_corrected_reference_file_is_used(store, tmp_path):
    uri, _ = store
    mine = tmp_path / "mine.csv"
    mine.write_text('study,levels,metric,value\nablation_norm,"norm_act=WN+ELU,groups=10",test_bpd,3.29\n')
    cells = build_table(load_studies("ablation_norm", uri)[0], load_reference(mine)).display
    assert cells.loc["WN+ELU", "paper (unverified) groups=10"] == "3.29"
    bad = tmp_path / "bad.csv"
    bad.write_text("study,value\nx,1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['levels', 'metric'\]"):
        load_reference(bad)


def test_build_writes_markdown_csv_booktabs_plots_and_a_self_contained_page(store):
    uri, folder = store
    paths = build_report("ablation_norm", uri, out=str(folder / "out"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["kl_per_group.png", "report.html", "table.csv", "table.md", "table.tex",
                     "test_bpd_against_groups.png", "val_bpd_per_epoch.png"]
    files = {os.path.basename(p): p for p in paths}
    for png in ("kl_per_group.png", "test_bpd_against_groups.png", "val_bpd_per_epoch.png"):
        assert open(files[png], "rb").read(4) == b"\x89PNG"
    markdown = open(files["table.md"]).read()
    assert "| norm_act | groups=10 | Δ groups=10 | paper (unverified) groups=10 |" in markdown
    latex = open(files["table.tex"]).read()
    assert r"\toprule" in latex and r"3.35 $\pm$ 0.071 (n=2)" in latex and r"norm\_act" in latex
    page = open(files["report.html"]).read()
    assert "- (2 diverged)" in page and page.count("data:image/png;base64,") == 3
    assert "src=\"http" not in page and "<link" not in page  # nothing fetched from elsewhere


def test_a_missing_or_empty_experiment_is_a_clear_error_and_writes_nothing(store, tmp_path):
    uri, _ = store
    with pytest.raises(ReportError, match="experiment 'ablation_nrom' not found .* it has: Default, ablation_norm"):
        build_report("ablation_nrom", uri, out=str(tmp_path / "out1"))
    MlflowClient(uri).create_experiment("empty")
    with pytest.raises(ReportError, match="experiment 'empty' holds no study runs"):
        build_report("empty", uri, out=str(tmp_path / "out2"))
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_the_command_line_names_the_problem(store, tmp_path, capsys):
    uri, _ = store
    with pytest.raises(SystemExit) as exit_info:
        main(["nothing", "--tracking-uri", uri, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "experiment 'nothing' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablation_norm", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"])
    assert "no MLflow store at" in capsys.readouterr().err
    assert main(["ablation_norm", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 0
    assert "| WN+ELU | 3.35 ± 0.071 (n=2) |" in capsys.readouterr().out


def test_a_report_of_a_real_smoke_study_embeds_its_sample_grids(finished_study, tmp_path):
    """The session's smoke study (2 finished trials, 2 diverged): counts, baseline and sample grids."""
    _, uri = finished_study
    paths = build_report("test_study", uri, out=str(tmp_path))
    markdown = open(next(p for p in paths if p.endswith("table.md"))).read()
    assert "| Swish | 1e-2 |" in markdown and "baseline" in markdown
    assert markdown.count("- (1 diverged)") == 2
    page = open(next(p for p in paths if p.endswith("report.html"))).read()
    assert page.count("<figcaption>samples of ") == 2


def test_the_pareto_plot_takes_finished_trials_only():
    import pandas as pd

    from reports.plots import pareto_front

    trials = pd.DataFrame({"status": ["finished", "finished", "diverged"], "metrics.test_bpd": [0.6, 0.7, None],
                           "metrics.num_params": [2e5, 1e5, None]})
    assert pareto_front(trials, {"test_bpd": "min", "num_params": "min"})[:4] == b"\x89PNG"
    assert pareto_front(trials.iloc[2:], {"test_bpd": "min", "num_params": "min"}) is None
