"""Reports from a store of known runs, written through MLflow's real API: exact numbers, counts,
diverged and failed marking, the paper's values, every output format, and the errors."""
import html
import io
import json
import math
import os

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from reports.__main__ import main
from reports.build import build_report
from reports.intervals import welch_interval
from reports.runs import ReportError, load_studies
from reports.tables import LEGEND, ONE_SEED, build_table, load_reference

# (norm_act, groups, seed, status, test_bpd)
TRIALS = [("WN+ELU", "10", 0, "finished", 3.30), ("WN+ELU", "10", 1, "finished", 3.40),
          ("WN+ELU", "40", 0, "diverged", None), ("WN+ELU", "40", 1, "diverged", None),
          ("BN+Swish", "10", 0, "finished", 3.34), ("BN+Swish", "10", 1, "finished", 3.36),
          ("BN+Swish", "40", 0, "finished", 3.10), ("BN+Swish", "40", 1, "finished", 3.20),
          ("BN+Swish", "40", 2, "failed", None)]


def record_study(tmp_path, levels, trials, baseline, across="", extra=None):
    """An ablation_norm study at paper scale as the platform records it: a parent run with levels
    {factor: [level, ...]} (and the params in `extra`) and one trial run per (level..., seed, status,
    test_bpd or None)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ablation_norm", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, run_name="ablation_norm-paper-0123abcd",
                               tags={"nvae.study": "ablation_norm", "nvae.scale": "paper", "nvae.kind": "grid"})
    pid = parent.info.run_id
    params = {f"levels.{f}": ",".join(names) for f, names in levels.items()}
    params.update({"factors": ",".join(levels), "table.columns": "test_bpd", "table.across": across,
                   "table.baseline": json.dumps(baseline), **(extra or {})})
    for key, value in params.items():
        if value:
            client.log_param(pid, key, value)
    for *names, seed, status, bpd in trials:
        factors = dict(zip(levels, names))
        run = client.create_run(experiment, run_name=",".join(f"{f}={v}" for f, v in factors.items()) + f",seed={seed}",
                                tags={"mlflow.parentRunId": pid, "nvae.seed": str(seed), "nvae.status": status,
                                      **{f"factor.{f}": v for f, v in factors.items()}})
        for epoch in range(3):
            client.log_metric(run.info.run_id, "val_bpd", 4.0 - 0.2 * epoch, step=epoch)
        for group in range(int(factors.get("groups", 0)) // 10):
            client.log_metric(run.info.run_id, f"train_kl_group_{group}", 0.5 * group, step=2)
        if bpd is not None:
            client.log_metric(run.info.run_id, "test_bpd", bpd, step=2)
        client.set_terminated(run.info.run_id)
    client.set_terminated(pid)
    return uri, tmp_path


@pytest.fixture()
def store(tmp_path):
    """An ablation_norm study at paper scale as the platform records it: a parent and nine trials."""
    return record_study(tmp_path, {"norm_act": ["WN+ELU", "BN+Swish"], "groups": ["10", "40"]}, TRIALS,
                        {"norm_act": "BN+Swish"}, across="groups")


def test_cells_are_mean_sd_over_finished_seeds_with_diverged_and_failed_counted(store):
    uri, _ = store
    study = load_studies("ablation_norm", uri)[0]
    assert study.factors == ["norm_act", "groups"] and study.across == "groups"
    table = build_table(study, load_reference())
    cells = table.display
    assert list(cells.columns) == ["groups=10", "Δ groups=10", "paper (unverified) groups=10",
                                   "groups=40", "Δ groups=40", "paper (unverified) groups=40"]
    assert cells.loc["WN+ELU"].tolist() == ["3.35 ± 0.071 (n=2)", "+0.00 [-0.54, +0.54] ~", "3.36",
                                            "- (2 diverged)", "", "3.31"]
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


def test_the_levels_are_the_parents_widened_tags_and_every_level_its_trials_hold(tmp_path):
    """A study widened by later invocations: its first params name one level of each factor, its tags
    (updated by each invocation) two groups, and a trial holds a third norm_act: every row is there."""
    trials = TRIALS + [("BN+ELU", "10", 0, "finished", 3.5)]
    uri, _ = record_study(tmp_path, {"norm_act": ["WN+ELU"], "groups": ["10"]}, [], {})
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ablation_norm").experiment_id
    (parent,) = client.search_runs([experiment])
    for key, value in {"nvae.levels.norm_act": "WN+ELU,BN+Swish", "nvae.levels.groups": "10,40"}.items():
        client.set_tag(parent.info.run_id, key, value)
    for norm_act, groups, seed, status, _bpd in trials:
        client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id, "nvae.seed": str(seed),
                                            "nvae.status": status, "factor.norm_act": norm_act, "factor.groups": groups})
    (study,) = load_studies("ablation_norm", uri)
    assert study.levels == {"norm_act": ["WN+ELU", "BN+Swish", "BN+ELU"], "groups": ["10", "40"]}
    assert len(build_table(study, {}).long) == 5  # every configuration the trials hold


def test_a_report_of_a_real_smoke_study_embeds_its_sample_grids(finished_study, tmp_path):
    """The session's smoke study (2 finished trials, 2 diverged): counts, baseline and sample grids."""
    _, uri = finished_study
    paths = build_report("test_study", uri, out=str(tmp_path))
    markdown = open(next(p for p in paths if p.endswith("table.md"))).read()
    assert "| Swish | 1e-2 |" in markdown and "baseline" in markdown
    assert markdown.count("- (1 diverged)") == 2
    assert markdown.startswith("Findings") and "  absurd_lr_diverges: OPEN: an absurd learning rate diverges" in markdown
    page = open(next(p for p in paths if p.endswith("report.html"))).read()
    assert page.count("<figcaption>samples of ") == 2


def test_the_pareto_plot_takes_finished_trials_only():
    from reports.plots import pareto_front

    trials = pd.DataFrame({"status": ["finished", "finished", "diverged"], "metrics.test_bpd": [0.6, 0.7, None],
                           "metrics.num_params": [2e5, 1e5, None]})
    assert pareto_front(trials, {"test_bpd": "min", "num_params": "min"})[:4] == b"\x89PNG"
    assert pareto_front(trials.iloc[2:], {"test_bpd": "min", "num_params": "min"}) is None



def test_the_validation_plot_is_left_out_when_no_trial_has_an_epoch(recwarn):
    from reports.plots import validation_curves

    assert validation_curves({"lambda=0.1": [], "lambda=1": []}) is None  # every trial diverged in epoch 1
    assert validation_curves({"lambda=0": [(0, 0.7), (1, 0.6)], "lambda=1": []})[:4] == b"\x89PNG"
    assert not [w for w in recwarn if "legend" in str(w.message)]

# (norm_act, seed, status, test_bpd): a baseline of three seeds; BN+ELU clearly worse; WN+ELU within
# seed noise; WN+Swish with a single finished seed.
KNOWN = [("BN+Swish", 0, "finished", 3.10), ("BN+Swish", 1, "finished", 3.12), ("BN+Swish", 2, "finished", 3.14),
         ("BN+ELU", 0, "finished", 3.19), ("BN+ELU", 1, "finished", 3.22), ("BN+ELU", 2, "finished", 3.25),
         ("WN+ELU", 0, "finished", 3.05), ("WN+ELU", 1, "finished", 3.25),
         ("WN+Swish", 0, "finished", 3.30), ("WN+Swish", 1, "diverged", None)]


@pytest.fixture()
def known(tmp_path):
    return record_study(tmp_path, {"norm_act": ["BN+Swish", "BN+ELU", "WN+ELU", "WN+Swish"]}, KNOWN,
                        {"norm_act": "BN+Swish"})


def test_the_delta_carries_welch_interval_by_hand(known):
    uri, _ = known
    table = build_table(load_studies("ablation_norm", uri)[0], load_reference())
    row = table.long.set_index("norm_act").loc["BN+ELU"]
    # BN+ELU 3.19, 3.22, 3.25 against BN+Swish 3.10, 3.12, 3.14: means 3.22 and 3.12, variances 0.0009, 0.0004
    se2 = 0.0009 / 3 + 0.0004 / 3
    df = se2**2 / ((0.0009 / 3) ** 2 / (3 - 1) + (0.0004 / 3) ** 2 / (3 - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    assert df == pytest.approx(3.48454, abs=1e-5) and half == pytest.approx(0.0613295, abs=1e-7)
    assert row["delta"] == pytest.approx(0.10) and row["delta_df"] == pytest.approx(df)
    assert (row["delta_low"], row["delta_high"]) == (pytest.approx(0.10 - half), pytest.approx(0.10 + half))
    assert row["judgement"] == "differs" and row["values"] == [3.19, 3.22, 3.25]
    assert table.display.loc["BN+ELU", "Δ test_bpd"] == "+0.100 [+0.039, +0.161]"
    assert table.display.loc["BN+Swish", "Δ test_bpd"] == "baseline"


def test_an_interval_holding_zero_and_too_few_seeds_are_marked(known):
    uri, _ = known
    table = build_table(load_studies("ablation_norm", uri)[0], load_reference())
    long = table.long.set_index("norm_act")
    assert long.loc["WN+ELU", "delta_low"] < 0 < long.loc["WN+ELU", "delta_high"]
    assert long.loc["WN+ELU", "judgement"] == "seed noise"
    assert table.display.loc["WN+ELU", "Δ test_bpd"] == "+0.0 [-1.2, +1.2] ~"
    few = long.loc["WN+Swish"]  # one finished seed: a difference, but no variance to judge it by
    assert few["judgement"] == "too few seeds" and few["delta"] == pytest.approx(0.18)
    assert math.isnan(few["delta_low"]) and math.isnan(few["delta_high"]) and math.isnan(few["delta_df"])
    assert table.display.loc["WN+Swish", "Δ test_bpd"] == "+0.18 ?"
    assert table.notes == [LEGEND]  # three seeds: no one-seed warning


def test_every_format_carries_the_legend_the_csv_the_numbers_the_page_the_seeds(known):
    uri, folder = known
    files = {os.path.basename(p): open(p).read() for p in build_report("ablation_norm", uri, out=str(folder / "o"))
             if not p.endswith(".png")}
    assert "| BN+ELU | 3.22 ± 0.03 (n=3) | +0.100 [+0.039, +0.161] |" in files["table.md"]
    assert "| WN+ELU | 3.15 ± 0.14 (n=2) | +0.0 [-1.2, +1.2] ~ |" in files["table.md"]
    assert f"\n{LEGEND}\n" in files["table.md"] and "[low, high] its 95% Welch t interval" in LEGEND
    assert "~ marks an interval that contains 0" in LEGEND and "? marks too few seeds" in LEGEND
    assert r"\textasciitilde{} marks an interval that contains 0" in files["table.tex"]
    assert r"its 95\% Welch" in files["table.tex"] and r"+0.0 [-1.2, +1.2] \textasciitilde{}" in files["table.tex"]
    assert files["table.csv"].startswith(f"# {LEGEND}\n")
    csv = pd.read_csv(io.StringIO(files["table.csv"]), comment="#").set_index("norm_act")
    for column in ("mean", "std", "delta", "delta_low", "delta_high", "delta_df"):
        assert csv[column].dtype == float, column
    assert csv.loc["BN+ELU", "delta_df"] == pytest.approx(3.48454, abs=1e-5)
    assert csv["judgement"].fillna("").tolist() == ["baseline", "differs", "seed noise", "too few seeds"]
    assert csv.loc["BN+ELU", "values"] == "3.19 3.22 3.25" and csv.loc["WN+Swish", "values"] == "3.3"
    page = files["report.html"]
    assert ('<td>3.22 ± 0.03 (n=3) <span class="seeds" title="finished seeds">3.19 3.22 3.25</span></td>'
            '<td>+0.100 [+0.039, +0.161]</td>') in page
    assert '<td>3.3 (n=1); 1 diverged <span class="seeds" title="finished seeds">3.3</span></td>' in page
    assert f'<p class="note">{html.escape(LEGEND)}</p>' in page
    assert ONE_SEED not in page


def test_a_one_seed_study_says_no_difference_can_be_judged(tmp_path):
    uri, folder = record_study(tmp_path, {"norm_act": ["BN+Swish", "WN+ELU"]},
                               [("BN+Swish", 0, "finished", 3.10), ("WN+ELU", 0, "finished", 3.20)],
                               {"norm_act": "BN+Swish"})
    files = {os.path.basename(p): open(p).read() for p in build_report("ablation_norm", uri, out=str(folder / "o"))
             if not p.endswith(".png")}
    assert ONE_SEED == ("One seed per configuration: no difference can be judged against seed noise; "
                        "run with --seeds 3 or more.")
    assert "| WN+ELU | 3.2 (n=1) | +0.1 ? |" in files["table.md"] and f"\n{ONE_SEED}\n" in files["table.md"]
    assert f"# {ONE_SEED}\n" in files["table.csv"] and html.escape(ONE_SEED) in files["report.html"]
    assert "run with -{}-seeds 3 or more." in files["table.tex"]


def test_welch_interval_without_variance():
    assert all(math.isnan(x) for x in welch_interval([], [1.0, 2.0]))
    delta, *rest = welch_interval([3.3], [3.1, 3.2])
    assert delta == pytest.approx(0.15) and all(math.isnan(x) for x in rest)
    assert welch_interval([2.0, 2.0], [1.0, 1.0])[:3] == (1.0, 1.0, 1.0)


def test_the_kl_heatmap_lists_configurations_in_the_studys_level_order_not_the_run_order():
    from reports.plots import kl_means
    from reports.runs import StudyRuns

    ran = [("WN+ELU", "2"), ("WN+ELU", "8"), ("BN+Swish", "4"), ("WN+ELU", "4"), ("BN+Swish", "2")]  # longest first
    trials = pd.DataFrame([{"norm_act": n, "groups": g, "status": "finished", "metrics.train_kl_group_0": float(i),
                            "metrics.train_kl_group_1": 1.0} for i, (n, g) in enumerate(ran)])
    study = StudyRuns(name="ablation_norm", run_name="r", parent_id="p", scale="smoke", kind="grid",
                  levels={"norm_act": ["WN+ELU", "BN+Swish"], "groups": ["2", "4", "8"]}, columns=["test_bpd"],
                  trials=trials)
    means = kl_means(study)
    assert list(means.index) == [("WN+ELU", "2"), ("WN+ELU", "4"), ("WN+ELU", "8"), ("BN+Swish", "2"), ("BN+Swish", "4")]
    assert means.loc[("WN+ELU", "4"), "metrics.train_kl_group_0"] == 3.0
    one_factor = StudyRuns(**{**study.__dict__, "levels": {"groups": ["2", "4", "8"]}, "trials": trials.drop(columns="norm_act")})
    assert list(kl_means(one_factor).index) == ["2", "4", "8"]


def test_a_study_still_running_says_so_with_its_ended_trials_and_lists_every_planned_row(tmp_path):
    uri, _ = record_study(tmp_path, {"norm_act": ["WN+ELU", "BN+Swish", "BN+ELU"]},
                          [("BN+Swish", 0, "finished", 3.1), ("WN+ELU", 0, "running", None)], {"norm_act": "BN+Swish"})
    client = MlflowClient(uri)
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("ablation_norm").experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)
    client.update_run(parent.info.run_id, "RUNNING")
    client.set_tag(parent.info.run_id, "nvae.trials", "3")
    paths = build_report("ablation_norm", uri, str(tmp_path / "out"))
    with open(next(p for p in paths if p.endswith("table.md"))) as f:
        table = f.read()
    assert "The study is still running" in table and "1 of 3 trials have ended" in table
    assert all(f"| {level} |" in table for level in ("WN+ELU", "BN+Swish", "BN+ELU"))
