"""Study declarations, plans and the shared command line: no Ray, no training."""
from types import SimpleNamespace

import pytest

from nvae_core import ConfigError
from nvae_platform.record.tracking import check_tracking_uri, status_of
from nvae_platform.study.cli import main
from nvae_platform.study.declaration import Factor, Study, field_factor, grid, resolve, trial_key
from nvae_platform.study.runner import (
    StudySettings,
    check_storage,
    pareto_front,
    plan_study,
    study_verdicts,
    summary_table,
    trials_frame,
)
from studies.ablation_norm import STUDY as NORM
from studies.search_architecture import STUDY as SEARCH

STUDY_SCRIPTS = ["ablation_norm", "ablation_cells", "ablation_residual_normal", "ablation_sr", "search_architecture"]


def test_norm_grid_is_every_level_pair_times_seeds_with_the_levels_applied():
    trials = grid(NORM, "smoke", seeds=[0, 1])
    assert len(trials) == 3 * 3 * 2
    assert len({t.key for t in trials}) == len(trials)
    wn = next(t for t in trials if t.levels == {"norm_act": "WN+ELU", "groups": "8"} and t.seed == 1)
    assert (wn.config.normalization, wn.config.activation) == ("weight_norm", "elu")
    assert wn.config.num_groups == 8 and wn.config.seed == 1 and wn.config.dataset == "digits"


def test_small_and_paper_scales_train_the_ablation_model_on_cifar10_at_the_papers_depths():
    for scale in ("small", "paper"):
        configs = [t.config for t in grid(NORM, scale, seeds=[0])]
        assert {c.num_groups for c in configs} == {10, 20, 40}
        assert {(c.dataset, c.num_channels_enc, c.num_flows) for c in configs} == {("cifar10", 64, 0)}
    assert {t.config.epochs for t in grid(NORM, "small", seeds=[0])} == {30}


def test_levels_narrow_a_factor_and_unknown_levels_or_factors_are_named():
    assert len(grid(NORM, "smoke", [0], only={"groups": ["2", "8"]})) == 6
    with pytest.raises(ConfigError, match=r"unknown level\(s\) \['3'\] of factor 'groups'.*2, 4, 8"):
        grid(NORM, "smoke", [0], only={"groups": ["3"]})
    with pytest.raises(ConfigError, match="unknown factor 'depth'.*norm_act, groups"):
        grid(NORM, "smoke", [0], only={"depth": ["2"]})


def test_overriding_a_field_the_study_varies_is_refused():
    with pytest.raises(ConfigError, match="--set normalization: the study varies this field"):
        resolve(NORM, "smoke", {"norm_act": "BN+ELU", "groups": "2"}, 0, {"normalization": "weight_norm"})


def test_a_level_with_an_impossible_value_fails_when_planned():
    bad = Study("bad", (Factor("act", {"relu": {"activation": "relu"}}),))
    with pytest.raises(ConfigError, match="activation='relu' is not allowed"):
        plan_study(bad, StudySettings())


def test_field_factor_names_levels_by_value_and_keeps_smoke_levels_apart():
    f = field_factor("groups", "num_groups_per_scale", [10, 20], smoke_values=[2])
    assert f.at("paper") == {"10": {"num_groups_per_scale": 10}, "20": {"num_groups_per_scale": 20}}
    assert f.at("smoke") == {"2": {"num_groups_per_scale": 2}}


def test_every_study_plans_at_every_scale(tmp_path):
    """Each script's declaration resolves at smoke (offline data here) and validates at small and paper."""
    import importlib

    for name in STUDY_SCRIPTS:
        study = importlib.import_module(f"studies.{name}").STUDY
        plan = plan_study(study, StudySettings(storage_path=str(tmp_path)))
        assert plan.trial_count >= 3 and plan.experiment_dir.startswith(f"{name}-smoke-")
        for scale in ("small", "paper"):
            assert grid(study, scale, [0])  # configs valid; data is checked only when run


def test_the_study_folder_changes_with_how_trials_train_and_not_with_seeds_levels_or_concurrency(tmp_path):
    def plan(**asked):
        return plan_study(NORM, StudySettings(storage_path=str(tmp_path), **asked), check_data=False)

    base = plan()
    same = [plan(**asked) for asked in ({"max_concurrent": 1}, {"seeds": 3}, {"levels": {"groups": ["4"]}},
                                        {"row_seeds": {("BN+ELU", "2"): 2}})]
    other = [plan(**asked) for asked in ({"overrides": {"epochs": 5}}, {"workers_per_trial": 2}, {"scale": "small"})]
    assert {p.experiment_dir for p in same} == {base.experiment_dir}
    assert len({p.experiment_dir for p in [base, *other]}) == 4
    assert len({p.tune_name for p in [base, *same[1:]]}) == 4 and same[0].tune_name == base.tune_name


@pytest.mark.parametrize("name", STUDY_SCRIPTS[:-1])
def test_every_grid_study_keeps_its_folder_whichever_levels_and_seeds_are_asked(name, tmp_path):
    import importlib

    study = importlib.import_module(f"studies.{name}").STUDY
    folders = {plan_study(study, StudySettings(storage_path=str(tmp_path), seeds=seeds, levels={f.name: [level]}),
                          check_data=False).experiment_dir
               for f in study.factors for level in f.at("smoke") for seeds in (1, 2)}
    assert len(folders) == 1


def test_row_seeds_set_a_rows_seed_count_beside_seeds_and_bad_rows_are_named(tmp_path):
    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path), levels={"groups": ["2", "4"]},
                                          row_seeds={("BN+Swish", "4"): 3, ("WN+ELU", "2"): 0}))
    seeds = {}
    for t in plan.trials:
        seeds.setdefault(tuple(t.levels.values()), []).append(t.seed)
    assert seeds.pop(("BN+Swish", "4")) == [0, 1, 2] and ("WN+ELU", "2") not in seeds
    assert list(seeds.values()) == [[0]] * 4
    for rows, message in (({("BN+Swish", "8"): 2}, r"row_seeds \('BN\+Swish', '8'\): not a row of this plan"),
                          ({("BN+Swish",): 2}, "not a row of this plan; expected the levels of norm_act, groups"),
                          ({("BN+Swish", "2"): -1}, "-1 is not allowed"),
                          ({("BN+Swish", "2"): 0, ("BN+ELU", "2"): 0, ("WN+ELU", "2"): 0}, "no trial to run")):
        with pytest.raises(ValueError, match=message):
            plan_study(NORM, StudySettings(storage_path=str(tmp_path), levels={"groups": ["2"]}, row_seeds=rows))
    with pytest.raises(ValueError, match="a search trains one seed per trial"):
        plan_study(SEARCH, StudySettings(row_seeds={("x",): 2}))


def test_a_trial_key_parses_back_to_its_levels_and_seed(tmp_path):
    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path), seeds=2, levels={"groups": ["2"]}))
    wider = grid(NORM, "smoke", [0, 11])  # a key of another invocation parses too
    assert all(plan.parse_key(t.key) == (t.levels, t.seed) for t in plan.trials + wider)
    for foreign in ("norm_act=BN+ReLU,groups=2,seed=0", "norm_act=BN+ELU,groups=2", "norm_act=BN+ELU,groups=2,seed=x"):
        assert plan.parse_key(foreign) is None


def test_the_parent_tags_name_the_union_of_every_invocations_levels_and_seeds(tmp_path):
    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path), levels={"groups": ["8"]}))
    recorded = [({"norm_act": "WN+ELU", "groups": "2"}, 2), ({"norm_act": "WN+ELU", "groups": "8"}, 0)]
    assert plan.extent_tags(recorded) == {"nvae.levels.norm_act": "WN+ELU,BN+ELU,BN+Swish",
                                          "nvae.levels.groups": "2,8", "nvae.seeds": "0,2", "nvae.trials": 4}


def test_search_plans_choices_and_refuses_seeds_and_asha_with_two_objectives(tmp_path):
    plan = plan_study(SEARCH, StudySettings(storage_path=str(tmp_path)))
    assert plan.is_search and plan.num_samples == SEARCH.search.smoke_samples
    assert set(plan.param_space()) == {f.name for f in SEARCH.factors}
    with pytest.raises(ValueError, match="a search trains one seed per trial"):
        plan_study(SEARCH, StudySettings(seeds=2))
    import dataclasses
    asha = dataclasses.replace(SEARCH, search=dataclasses.replace(SEARCH.search, early_stopping=True))
    with pytest.raises(ValueError, match="ASHA.*one metric"):
        plan_study(asha, StudySettings())


def test_unwritable_storage_and_unreachable_tracking_are_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="--storage-path .*a-file/runs is not writable"):
        check_storage(str(blocker / "runs"))
    with pytest.raises(ValueError, match="--tracking-uri http://127.0.0.1:9 cannot be reached .*Connection refused"):
        check_tracking_uri("http://127.0.0.1:9")
    with pytest.raises(ValueError, match=r"--tracking-uri postgresql://nobody:\*\*\*@127.0.0.1:9/db: the postgresql "
                                         r"database 'db' at 127.0.0.1:9 cannot be reached \(.*Connection refused\)"):
        check_tracking_uri("postgresql://nobody:secret@127.0.0.1:9/db")  # one attempt, not MLflow's 2 minutes
    with pytest.raises(ValueError, match="does not exist or is not writable"):
        check_tracking_uri(f"sqlite:///{blocker}/mlflow.db")


@pytest.mark.parametrize("argv, message", [
    (["--scale", "huge"], "invalid choice: 'huge'"),
    (["--levels", "norm_act=BN+ReLU"], r"unknown level\(s\) \['BN\+ReLU'\] of factor 'norm_act'"),
    (["--levels", "groups"], "--levels 'groups': expected NAME=VALUE"),
    (["--set", "num_groups_per_scale=3"], "the study varies this field"),
    (["--set", "colour=red"], r"unknown config field\(s\) \['colour'\]"),
    (["--set", "lr=1e4"], r"unknown config field\(s\) \['lr'\]; did you mean learning_rate\?"),
    (["--scale", "small", "--gpus-per-worker", "0", "--cpus-per-worker", "1", "--data-dir", "/proc/version",
      "--download"], "--data-dir /proc/version: /proc/version is a file, not a folder"),
    (["--tracking-uri", "http://127.0.0.1:9"], "cannot be reached"),
    (["--storage-path", "/proc/version/runs"], "is not writable"),
    (["--seeds", "0"], "argument --seeds: 0 is not allowed: expected an integer >= 1"),
    (["--max-failures", "-1"], "argument --max-failures: -1 is not allowed: expected an integer >= 0; Ray's -1"),
    (["--scale", "small", "--gpus-per-worker", "0", "--cpus-per-worker", "1", "--data-dir", "/nonexistent-data"],
     "dataset 'cifar10' not found.*add --download"),
    (["--set", "batch_size=2000"], r"--set batch_size=2000 x 1 worker\(s\) is more than the 1438 training images"),
    (["--set", "batch_size=720", "--workers-per-trial", "2"], r"batch_size=720 x 2 worker\(s\).*at most 719"),
    (["--address", "auto"], r"--address auto: no running Ray cluster was found on this machine; start one"),
    (["--address", "10.0.0.1:6379", "--num-cpus", "2"], "--num-cpus 2 sizes a local Ray.*drop --num-cpus"),
])
def test_bad_input_is_a_clear_error_before_anything_starts(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(NORM, argv + ["--storage-path", str(tmp_path / "runs")] if "--storage-path" not in argv else argv)
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "mlflow.db").exists() or "--storage-path" in argv  # nothing recorded


def test_max_failures_sets_every_trials_worker_restarts(tmp_path):
    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path), max_failures=0), check_data=False)
    assert plan.options.max_failures == 0
    assert plan_study(NORM, StudySettings(storage_path=str(tmp_path)), check_data=False).options.max_failures == 2


def test_on_a_cluster_storage_and_data_default_to_what_the_nodes_export(tmp_path, monkeypatch, capsys):
    """cluster.yaml exports NVAE_STORAGE_PATH and NVAE_DATA_DIR; flags still win."""
    monkeypatch.setenv("NVAE_STORAGE_PATH", "s3://lab-bucket/nvae")
    monkeypatch.setattr("nvae_platform.study.cli.ended_outcomes", lambda path: {})  # no S3 here: 6 s of retries
    monkeypatch.setenv("NVAE_DATA_DIR", str(tmp_path / "datasets"))
    assert main(NORM, ["--dry-run", "--scale", "small"]) == 0
    out = capsys.readouterr().out
    assert "checkpoints: s3://lab-bucket/nvae/ablation_norm-small-" in out
    assert f"looked in {tmp_path / 'datasets'}" in out
    assert main(NORM, ["--dry-run", "--storage-path", str(tmp_path / "mine")]) == 0
    assert f"checkpoints: {tmp_path / 'mine'}/ablation_norm-smoke-" in capsys.readouterr().out


def test_dry_run_prints_trials_and_resources_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(NORM, ["--dry-run", "--seeds", "2", "--workers-per-trial", "2"]) == 0
    out = capsys.readouterr().out
    assert "18 trials" in out and "norm_act=BN+Swish,groups=8,seed=1" in out and "2 worker(s)" in out
    assert list(tmp_path.iterdir()) == []


def _result(config, **metrics):
    return SimpleNamespace(config=config, metrics=metrics, error=None)


def test_the_closing_table_pools_trials_ended_in_earlier_invocations_in_the_studys_order(tmp_path):
    from nvae_platform.study.runner import earlier_trials

    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path), levels={"groups": ["2"], "norm_act": ["BN+ELU"]}))
    this = [_result({"norm_act": "BN+ELU", "groups": "2", "seed": 0}, status="finished", test_bpd=1.0)]
    ended = {"norm_act=BN+ELU,groups=2,seed=0": {"status": "finished", "test_bpd": 1.0},  # also in this invocation
             "norm_act=BN+ELU,groups=2,seed=1": {"status": "finished", "test_bpd": 2.0},
             "norm_act=WN+ELU,groups=8,seed=0": {"status": "diverged at step 3"},
             "not-a-trial-of-this-study": {"status": "finished"}}
    earlier = earlier_trials(plan, ended, this)
    assert sorted(trial_key({k: v for k, v in e.config.items() if k != "seed"}, e.config["seed"]) for e in earlier) == [
        "norm_act=BN+ELU,groups=2,seed=1", "norm_act=WN+ELU,groups=8,seed=0"]
    assert summary_table(plan, this + earlier).splitlines()[2:] == ["| WN+ELU | 8 | - | 1 diverged |",
                                                                    "| BN+ELU | 2 | 1.5 ± 0.71 | 2 finished |"]


def test_the_dry_run_marks_the_trials_that_ended_before(tmp_path, monkeypatch, capsys):
    from nvae_platform.record.outcomes import write_outcome

    monkeypatch.chdir(tmp_path)
    plan = plan_study(NORM, StudySettings(levels={"groups": ["2"]}, seeds=2), check_data=False)
    write_outcome(plan.trials_path, "norm_act=BN+ELU,groups=2,seed=0", {"status": "finished"})
    assert main(NORM, ["--dry-run", "--levels", "groups=2", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 trials (grid over norm_act x groups x seed), 1 ended before (not trained again):" in out
    assert [line.split()[0] for line in out.splitlines() if line.endswith("(ended before)")] == [
        "norm_act=BN+ELU,groups=2,seed=0"]


def test_summary_table_averages_finished_seeds_and_counts_statuses(tmp_path):
    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path), levels={"groups": ["2"]}, seeds=2))
    results = [_result({"norm_act": "WN+ELU", "groups": "2", "seed": 0}, status="finished", test_bpd=1.0),
               _result({"norm_act": "WN+ELU", "groups": "2", "seed": 1}, status="finished", test_bpd=2.0),
               _result({"norm_act": "BN+ELU", "groups": "2", "seed": 0}, status="diverged at step 7"),
               _result({"norm_act": "BN+ELU", "groups": "2", "seed": 1}, status="finished", test_bpd=3.0)]
    table = summary_table(plan, results).splitlines()
    assert table[0] == "| norm_act | groups | test_bpd | trials |"
    assert table[2] == "| WN+ELU | 2 | 1.5 ± 0.71 | 2 finished |"
    assert table[3] == "| BN+ELU | 2 | 3 | 1 diverged, 1 finished |"


def test_the_runner_judges_the_findings_on_tune_results_as_reports_load_trials(tmp_path):
    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path), levels={"groups": ["8"]}, seeds=2))
    results = [_result({"norm_act": "WN+ELU", "groups": "8", "seed": s}, status="diverged at step 7") for s in (0, 1)]
    results += [_result({"norm_act": n, "groups": "8", "seed": s}, status="finished", test_bpd=3.0 + s)
                for n in ("BN+ELU", "BN+Swish") for s in (0, 1)]
    frame = trials_frame(plan, results)
    assert list(frame.columns[:4]) == ["norm_act", "groups", "seed", "status"]
    assert frame["status"].tolist() == ["diverged"] * 2 + ["finished"] * 4 and frame["metrics.test_bpd"].iloc[2] == 3.0
    verdicts = {v.finding.name: v for v in study_verdicts(plan, results)}
    assert list(verdicts) == ["bn_beats_wn", "bn_gain_grows_with_groups", "swish_beats_elu", "wn_unstable_deep"]
    assert verdicts["wn_unstable_deep"].evidence[0].startswith("WN+ELU vs BN+ELU at groups=8: diverged 2/2 vs 0/2")


def test_pareto_front_keeps_only_undominated_trials():
    points = [_result({}, a=1.0, b=5.0), _result({}, a=2.0, b=2.0), _result({}, a=3.0, b=3.0), _result({}, a=4.0)]
    front = pareto_front(points, {"a": "min", "b": "min"})
    assert [(r.metrics["a"], r.metrics["b"]) for r in front] == [(1.0, 5.0), (2.0, 2.0)]


def test_status_of_names_each_outcome():
    assert status_of({"status": "finished"}, "TERMINATED") == "finished"
    assert status_of({"status": "diverged at step 3"}, "TERMINATED") == "diverged"
    assert status_of({"status": "failed: boom"}, "TERMINATED") == "failed"
    assert status_of({"status": "running"}, "ERROR") == "failed"
    assert status_of({"status": "running"}, "TERMINATED") == "stopped early"


def test_a_grid_trial_without_an_outcome_was_interrupted_and_a_searchs_stopped_early(tmp_path):
    from nvae_platform.study.runner import result_status

    settings = StudySettings(storage_path=str(tmp_path))
    cut = _result({"norm_act": "BN+ELU", "groups": "2", "seed": 0}, status="running")
    plan = plan_study(NORM, settings, check_data=False)
    assert result_status(plan, cut) == "interrupted"
    assert summary_table(plan, [cut]).splitlines()[2].endswith("| 1 interrupted |")
    assert result_status(plan_study(SEARCH, settings, check_data=False), cut) == (
        "stopped early" if SEARCH.search.early_stopping else "interrupted")


def test_a_baseline_or_across_that_is_not_a_level_or_factor_is_named():
    import dataclasses

    with pytest.raises(ConfigError, match="baseline norm_act=BN\\+ReLU is not a level of norm_act"):
        plan_study(dataclasses.replace(NORM, baseline={"norm_act": "BN+ReLU"}), StudySettings())
    with pytest.raises(ConfigError, match="unknown factor 'depth'"):
        plan_study(dataclasses.replace(NORM, across="depth"), StudySettings())


def test_the_default_store_is_mlflows_environment_variable_else_a_sqlite_file_here(monkeypatch, tmp_path):
    from nvae_platform.defaults import default_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert default_tracking_uri() == "http://mlflow.internal:5000"


def test_the_tracker_is_plain_data_until_tunes_setup_hook_opens_the_store(tmp_path):
    """Tune pickles its callbacks with the experiment and restores them as they are: the tracker
    pickles without a store connection, and setup() (Tune's hook, on every fit) opens and reads it."""
    import pickle

    from nvae_platform.record.tracking import MlflowTracker

    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path / "runs")))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = pickle.loads(pickle.dumps(MlflowTracker(plan, uri, "pickled")))
    assert tracker.client is None
    tracker.setup(stop=None, num_samples=1, total_num_samples=1)
    parent = tracker.parent_id
    again = MlflowTracker(plan, uri, "pickled")
    again.setup()
    assert again.parent_id == parent and again.interrupted  # the same parent run, found in the store


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "tab\there"])
def test_a_study_name_is_a_label_never_a_path(name):
    with pytest.raises(ConfigError, match=r"Study\(name="):
        Study(name=name, factors=NORM.factors)


def test_batch_sizes_that_fit_the_training_images_pass_and_a_study_says_how_many_trials_failed(tmp_path):
    from nvae_platform.study.runner import StudyOutcome
    from nvae_platform.train.scales import run_config, run_options

    cfg, options = run_config("digits", "smoke", batch_size=719), run_options("digits", "smoke", workers=2)
    assert options.check_batch(cfg) == 1438  # 2 x 719 = 1438: each worker gets one batch
    with pytest.raises(ValueError, match="no batch fits: lower it to at most 479"):
        options.check_batch(cfg, images=959)
    assert run_options("cifar10", "small").check_batch(run_config("cifar10", "small", batch_size=50000)) == 50000
    plan = plan_study(NORM, StudySettings(storage_path=str(tmp_path)), check_data=False)
    outcome = StudyOutcome(plan, [], "", "", None, False, pooled=[
        _result({}, status="finished"), _result({}, status="failed: ValueError: x")])
    line, every = outcome.failed_line()
    assert line.startswith("[study] 1 of 2 trial(s) failed: the reason of each") and every is False
    outcome.pooled = outcome.pooled[1:]
    assert outcome.failed_line()[1] is True
    outcome.pooled = [_result({}, status="diverged at step 3")]
    assert outcome.failed_line() == (None, False)


def test_a_gpu_scale_on_a_machine_without_a_gpu_says_so_before_the_data(tmp_path, monkeypatch, capsys):
    from studies.train import main as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("nvae_platform.preflight.local_resources", lambda num_cpus=None: {"CPU": 2, "GPU": 0})
    for command, argv in ((lambda a: main(NORM, a), ["--scale", "small"]), (train, ["--dataset", "cifar10",
                                                                                   "--scale", "small"])):
        with pytest.raises(SystemExit) as exit_info:
            command(argv + ["--data-dir", str(tmp_path / "none"), "--storage-path", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert "x --gpus-per-worker: this machine has no GPU: use --scale smoke here, or join a GPU cluster with " \
               "--address" in err
