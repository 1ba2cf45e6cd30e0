"""Studies end to end on a real local Ray and a real MLflow SQLite store (digits smoke model).

The module's study runs four trials at once on two cores (one diverges on purpose). The driver-kill
resume test is in test_record_repair.py.
"""
import os

import pytest
import ray
from mlflow.tracking import MlflowClient

from nvae_platform.record.tracking import PARENT_TAG, STUDY_KEY_TAG
from nvae_platform.study.cli import main
from nvae_platform.study.declaration import Factor, Search, Study
from nvae_platform.study.runner import StudySettings, run_study
from studies.ablation_norm import STUDY as NORM

EPOCHS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study(finished_study):
    outcome, uri = finished_study
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("test_study")
    return outcome, client, client.search_runs([experiment.experiment_id])


def _children(runs):
    return {r.data.tags["nvae.trial_key"]: r for r in runs if PARENT_TAG in r.data.tags}


def test_one_parent_and_a_child_per_trial_with_params_tags_and_final_metrics(study):
    outcome, _client, runs = study
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and not outcome.interrupted
    assert parents[0].data.tags[STUDY_KEY_TAG] == outcome.plan.study_key
    # 2 of 2 diverged against 0 of 2, one seed each: Fisher's one-sided p = 1/6, not yet decided
    assert parents[0].data.tags["nvae.finding.absurd_lr_diverges"] == "open"
    assert outcome.verdicts[0].evidence == [("1e9 vs 1e-2 (pooled over act): diverged 2/2 vs 0/2 (Fisher's exact test: "
                                            "one-sided p 0.167; decides at 0.025)")]
    children = _children(runs)
    assert sorted(children) == sorted(t.key for t in outcome.plan.trials)
    for key, run in children.items():
        trial = next(t for t in outcome.plan.trials if t.key == key)
        assert run.data.tags[PARENT_TAG] == parents[0].info.run_id
        assert run.data.tags["factor.act"] == trial.levels["act"] and run.data.tags["factor.lr"] == trial.levels["lr"]
        assert run.data.params["activation"] == trial.config.activation
        assert float(run.data.params["learning_rate"]) == trial.config.learning_rate
        assert run.data.params["run.workers"] == "1"
        assert "mlflow.source.git.commit" in run.data.tags and run.data.tags["nvae.torch"]
        assert run.data.tags.get("nvae.device", "cpu") == "cpu"  # known from the first epoch's report
        (data,) = _client.get_run(run.info.run_id).inputs.dataset_inputs  # lineage: the data the workers read
        assert data.dataset.name == "digits" and data.dataset.digest == run.data.tags["nvae.data_digest"]
        assert '"train": 1438' in data.dataset.profile
        if "lr=1e9" not in key:  # the absurd rate diverges within its first epoch: no epoch figures
            assert run.data.metrics["cpu_utilization"] > 0


def test_a_diverged_trial_is_recorded_as_such_and_the_others_finish(study):
    outcome, client, runs = study
    for key, run in _children(runs).items():
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        if "lr=1e9" in key:
            assert run.data.tags["nvae.status"] == "diverged" and run.info.status == "FINISHED"
            assert run.data.tags["nvae.status_detail"].startswith("diverged at step")
            assert run.data.metrics["diverged"] == 1.0
            assert artifacts == {"config.json"}
        else:
            assert run.data.tags["nvae.status"] == "finished" and run.info.status == "FINISHED"
            for name in ("test_bpd", "train_kl", "active_units", "training_hours", "peak_memory_gb"):
                assert run.data.metrics[name] > 0, name
            assert 0 < run.data.metrics["test_bpd"] < 1
            assert artifacts == {"config.json", "samples.png"}
    assert "1 diverged" in outcome.table and outcome.table.count("1 finished") == 2


def test_trials_logging_at_once_lose_no_metric_point(study):
    """Every epoch Tune received is one point of every per-epoch metric in MLflow."""
    outcome, client, runs = study
    children = _children(runs)
    for result in outcome.results:
        key = result.metrics["trial_key"]
        epochs = sorted(set(result.metrics_dataframe["epoch"]))
        run_id = children[key].info.run_id
        for name in ("train_bpd", "val_bpd", "lr", "epoch_seconds", "train_kl_group_0"):
            if "lr=1e9" in key:
                continue
            steps = [m.step for m in client.get_metric_history(run_id, name)]
            assert steps == epochs == list(range(EPOCHS)), (key, name)
        for name in children[key].data.metrics:  # and no metric holds a step twice
            steps = [m.step for m in client.get_metric_history(run_id, name)]
            assert len(steps) == len(set(steps)), (key, name, steps)


@pytest.mark.slow
def test_an_optuna_search_with_asha_records_every_sampled_trial(local_ray, tmp_path):
    """Optuna picks levels, ASHA may stop trials on val_bpd; every trial is one finished child run."""
    search = Study(name="test_search", factors=(
        Factor("width", {"8": {"num_channels_enc": 8, "num_channels_dec": 8},
                         "16": {"num_channels_enc": 16, "num_channels_dec": 16}}),
        Factor("act", {"ELU": {"activation": "elu"}, "Swish": {"activation": "swish"}})),
        fixed={"epochs": 3}, search=Search(objectives={"test_bpd": "min"}, smoke_samples=3, early_stopping=True))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    outcome = run_study(search, StudySettings(storage_path=str(tmp_path / "runs"), tracking_uri=uri,
                                              max_concurrent=2))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test_search").experiment_id])
    children = _children(runs)
    assert len(runs) == 4 and len(children) == 3 and not outcome.interrupted
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["nvae.status"] for r in children.values()} <= {"finished", "stopped early"}
    assert "finished" in {r.data.tags["nvae.status"] for r in children.values()}
    for run in children.values():
        assert run.data.tags["factor.width"] in ("8", "16") and run.data.params["num_channels_enc"] in ("8", "16")


def test_more_gpus_than_the_cluster_has_is_refused_before_any_trial(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ray.shutdown()
    with pytest.raises(SystemExit) as exit_info:
        main(NORM, ["--gpus-per-worker", "1", "--num-cpus", "2"])
    assert exit_info.value.code == 2
    assert "one run needs 1 GPU(s)" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "runs" / "ablation_norm").exists()
