"""The study's progress callback on a resumed study, with real Tune Trial objects and real outcome
files (no Ray started): what it counts as ended before, and what it shows as started."""
from ray.tune.experiment import Trial

from nvae_platform.record.outcomes import write_outcome
from nvae_platform.study.plan import StudySettings, plan_study
from nvae_platform.study.progress_callback import ProgressCallback
from studies.ablation_norm import STUDY as NORM


def _resumed(tmp_path):
    """A 3-trial plan, its Tune trials as a resume hands them back, and its callback set up."""
    plan = plan_study(NORM, StudySettings(levels={"groups": ["2"]}, overrides={"epochs": 2},
                                          storage_path=str(tmp_path)), check_data=False)
    trials = [Trial("run_trial", config={**t.levels, "seed": t.seed}, trial_id=f"t{i}", stub=True)
              for i, t in enumerate(plan.trials)]
    callback = ProgressCallback(plan, 1, str(tmp_path / "ray.log"))
    callback.setup()
    return plan, trials, callback


def _outcome(key):
    return {"status": "finished", "test_bpd": 0.6454, "val_bpd": 0.649, "epoch": 1, "trial_key": key}


def test_a_trial_whose_end_tune_did_not_save_is_counted_as_ended_before_and_not_shown_started(tmp_path, capsys):
    """Tune saved its state while the first trial ran, then the driver died after that trial wrote
    its outcome: the rerun hands it back PENDING and runs it again (it only reports its outcome)."""
    plan, trials, callback = _resumed(tmp_path)
    first, second = trials[0], trials[1]
    write_outcome(plan.trials_path, plan.key_of(first), _outcome(plan.key_of(first)))
    callback.on_step_begin(0, trials)
    callback.on_trial_start(0, trials, first)
    first.update_last_result(_outcome(plan.key_of(first)))
    callback.on_trial_result(0, trials, first, first.last_result)
    callback.on_trial_complete(0, trials, first)
    callback.on_trial_start(0, trials, second)
    out = capsys.readouterr().out
    assert "[study] resumed: 1 trial(s) ended before  (1/3 done: 1 finished" in out
    assert f"started {plan.key_of(first)}" not in out and f"{plan.key_of(first)}: epoch" not in out
    assert f"{plan.key_of(first)}: finished" not in out  # counted once, at the resume
    assert f"started {plan.key_of(second)}  (1/3 done" in out


def test_a_trial_tune_makes_after_the_first_hook_is_shown_once_as_ended_before(tmp_path, capsys):
    plan, trials, callback = _resumed(tmp_path)
    late = trials[2]
    callback.on_step_begin(0, trials[:2])  # Tune had not made the third trial yet
    write_outcome(plan.trials_path, plan.key_of(late), _outcome(plan.key_of(late)))
    callback.on_trial_start(0, trials, late)
    callback.on_trial_complete(0, trials, late)
    out = capsys.readouterr().out
    assert out.count(plan.key_of(late)) == 1
    assert f"{plan.key_of(late)}: finished  test_bpd 0.6454 (ended before; not retrained)  (1/3 done" in out
    assert "started" not in out
