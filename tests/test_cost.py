"""A study's cost before it starts (study/cost.py): the arithmetic of its hours, the seconds read from
earlier runs in a real MLflow SQLite store, the budget's refusal, and a probe of a tiny model. No Ray,
except the last test, which reads a real study's record."""
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from nvae_platform.record.timings import earlier_timings
from nvae_platform.study.cost import (
    RAY_START_SECONDS,
    TRIAL_OVERHEAD_SECONDS,
    Estimate,
    Speed,
    check_budget,
    describe_cost,
    estimate_cost,
    reserved,
    speed_from_probe,
    speed_from_runs,
)
from nvae_platform.study.plan import StudySettings, plan_study
from nvae_platform.train.probe import probe_speed
from nvae_platform.train.run_options import RunOptions
from nvae_platform.train.scales import run_config, run_options
from studies.ablation_sr import STUDY as SR


def test_a_trial_takes_its_epochs_of_steps_plus_what_it_does_once():
    speed = Speed(step_s=0.5, steps_per_epoch=100, epoch_extra_s=2.0, once_s=30.0, source="test")
    assert speed.seconds(10) == 10 * (100 * 0.5 + 2.0) + 30.0


def test_a_probe_of_one_worker_splits_the_steps_and_the_test_set_over_the_trial_s_workers():
    probe = dict(set_up_s=1.0, warmup_s=5.0, step_s=0.5, steps_per_epoch=100, validation_s=4.0, checkpoint_s=1.0,
                 final_s=20.0, device="cpu")
    one, four = speed_from_probe(probe, 1), speed_from_probe(probe, 4)
    first_steps = 5.0 - 2 * 0.5  # the warm-up steps' time beyond two ordinary steps: counted once
    assert one.once_s == pytest.approx(1.0 + first_steps + 20.0 + TRIAL_OVERHEAD_SECONDS)
    assert (one.steps_per_epoch, one.epoch_extra_s) == (100, 5.0)
    assert (four.steps_per_epoch, four.epoch_extra_s) == (25, 2.0)
    assert four.once_s == pytest.approx(1.0 + first_steps + 5.0 + TRIAL_OVERHEAD_SECONDS)


def test_earlier_runs_give_their_median_seconds_per_step_and_epoch_and_the_rest_once():
    runs = [dict(epochs=3, train_s=30.0, step_s=0.1, wall_s=40.0, device="cpu"),
            dict(epochs=3, train_s=36.0, step_s=0.12, wall_s=50.0, device="cpu"),
            dict(epochs=6, train_s=66.0, step_s=0.11, wall_s=78.0, device="cpu")]
    speed = speed_from_runs(runs)
    assert speed.step_s == 0.11 and speed.steps_per_epoch * speed.step_s == pytest.approx(11.0)
    assert speed.once_s == 12.0 and speed.seconds(3) == pytest.approx(45.0)
    assert speed.source == "3 earlier run(s) on cpu"


def test_the_total_is_every_trial_and_the_start_up_for_the_trials_at_once():
    estimate = Estimate("GPU", 8.0, {"a": 3600.0, "b": 1800.0, "c": 1800.0}, start_s=15.0, lanes=2)
    assert estimate.total_hours() == pytest.approx(8 * (7200 + 2 * 15) / 3600)
    assert estimate.wall_seconds() == 15.0 + 3600.0  # the long trial on one lane, both short ones on the other
    assert Estimate("CPU", 1.0, {"a": 10.0, "b": None}).total_hours() is None


def test_a_trial_reserves_gpus_or_else_cpus():
    assert reserved(RunOptions(workers=8, gpus_per_worker=1.0, cpus_per_worker=4.0)) == ("GPU", 8.0)
    assert reserved(RunOptions(workers=2, cpus_per_worker=1.5)) == ("CPU", 3.0)


def test_the_budget_refuses_a_plan_above_it_or_of_unknown_hours_in_one_line():
    estimate = Estimate("GPU", 8.0, {"a": 3600.0, "b": 3600.0})
    check_budget(estimate, None)
    check_budget(estimate, 16.0)
    with pytest.raises(ValueError, match=r"^--budget-gpu-hours 10: the plan is estimated at 16 GPU-hours for 2 trial"):
        check_budget(estimate, 10.0)
    unknown = Estimate("CPU", 1.0, {"a": None}, unknown_why="no earlier run; add --probe")
    with pytest.raises(ValueError, match="add --probe"):
        check_budget(unknown, 10.0)


def _record_run(client, experiment, cfg, options, device="cpu", start_epoch=0, status="finished",
                train_s=30.0, wall_s=42.0, step_s=0.2):
    """A finished trial's MLflow record as the study's writer leaves it: params, device and status tags,
    the last epoch's metrics and the final training_hours, started and ended wall_s apart."""
    run = client.create_run(experiment, start_time=1_000_000,
                            tags={"nvae.status": status, "nvae.device": device})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in {**cfg.to_dict(), **options.params()}.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in dict(step_seconds=step_s, start_epoch=start_epoch,
                                                                   training_hours=train_s / 3600).items()])
    client.set_terminated(run.info.run_id, end_time=1_000_000 + int(wall_s * 1000))


def test_earlier_runs_of_the_same_model_and_device_are_read_from_a_real_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert earlier_timings(uri, run_config("digits", "smoke"), run_options("digits", "smoke"), on_gpu=False) == []
    assert not (tmp_path / "mlflow.db").exists(), "no store is created by reading"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ablation_sr")
    cfg, options = run_config("digits", "smoke", sr_lambda=0.1), run_options("digits", "smoke")
    _record_run(client, experiment, cfg.replace(seed=3, epochs=6), options, train_s=60.0, wall_s=75.0)  # counts
    _record_run(client, experiment, cfg.replace(num_channels_enc=32), options)  # another model
    _record_run(client, experiment, cfg, options, device="NVIDIA H100")  # another kind of device
    _record_run(client, experiment, cfg, options, start_epoch=2)  # resumed: its wall time spans invocations
    _record_run(client, experiment, cfg, options, status="diverged")
    _record_run(client, experiment, cfg, RunOptions(**{**vars(options), "iw_samples": 1000}))  # other evaluation
    found = earlier_timings(uri, cfg, options, on_gpu=False)
    assert found == [dict(epochs=6, train_s=pytest.approx(60.0), step_s=0.2, wall_s=75.0, device="cpu")]
    assert [r["device"] for r in earlier_timings(uri, cfg, options, on_gpu=True)] == ["NVIDIA H100"]

    plan = plan_study(SR, StudySettings(storage_path=str(tmp_path / "runs"), tracking_uri=uri))
    estimate = estimate_cost(plan, StudySettings(num_cpus=2), uri)
    assert estimate.trial_seconds["sr_lambda=0.1,seed=0"] == pytest.approx(3 * 10.0 + 15.0)
    assert estimate.trial_seconds["sr_lambda=0.0,seed=0"] is None and not estimate.known
    assert (estimate.lanes, estimate.start_s) == (2, RAY_START_SECONDS)
    text = describe_cost(estimate)
    assert "sr_lambda=0.1: 0.0125 CPU-h per trial x 1" in text and "from 1 earlier run(s) on cpu" in text
    assert "total: unknown" in text and "--probe" in text


def test_a_probe_times_a_tiny_model_s_steps_and_evaluation_apart_from_its_first_steps():
    cfg = run_config("digits", "smoke", num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=1, batch_size=64)
    options = run_options("digits", "smoke", max_test_images=64, iw_samples=2, sample_count=2)
    probe = probe_speed(cfg, options, steps=2, warmup=1)
    assert probe["device"] == "cpu" and probe["steps_per_epoch"] == 1797 * 8 // 10 // 64  # digits' training split
    for key in ("set_up_s", "warmup_s", "step_s", "validation_s", "checkpoint_s", "final_s"):
        assert 0 < probe[key] < 60, (key, probe)


@pytest.mark.slow
def test_a_finished_study_s_own_record_estimates_its_trials_close_to_what_they_took(finished_study):
    outcome, uri = finished_study
    plan = outcome.plan
    estimate = estimate_cost(plan, StudySettings(num_cpus=2, max_concurrent=4), uri)
    client = MlflowClient(uri)
    for run in client.search_runs([client.get_experiment_by_name("test_study").experiment_id],
                                  "tags.`nvae.status` = 'finished'"):
        seconds = estimate.trial_seconds[run.data.tags["nvae.trial_key"]]
        assert seconds == pytest.approx((run.info.end_time - run.info.start_time) / 1000, rel=0.01)
    diverged = [t.key for t in plan.trials if t.levels["lr"] == "1e9"]
    assert all(estimate.trial_seconds[key] is None for key in diverged)  # no finished run measured them
