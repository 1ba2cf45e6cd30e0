"""One trial of a study, run by Tune in its own process (a Tune function trainable). Its module
imports only what a trial needs: a trial process starts for every concurrent trial of a study.
"""
import dataclasses

import ray
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from nvae_platform.record.outcomes import read_outcome, write_outcome
from nvae_platform.train.failures import StorageError, is_storage_failure
from nvae_platform.train.run import failed_run, make_trainer, run_in_this_process, summarize


def run_trial(config, plan):
    """One Tune trial: train its configuration with Ray Train, forwarding each epoch to Tune.
    The last report carries the outcome (finished, diverged at step S, or failed: error). A run its
    storage stopped (full, or not reachable) raises instead: the trial errors, and is resumed, not
    reported failed, by the same command once the storage answers."""
    key = plan.key_for(config, tune.get_context().get_trial_id())
    done = read_outcome(plan.trials_path, key)
    if done is not None:  # finished in an earlier invocation whose Tune state was not saved in time
        tune.report(done)
        return
    _, _, cfg = plan.describe_config(config)
    options = dataclasses.replace(plan.options, name=key)
    if plan.train_in_trial:
        run = run_in_this_process(cfg, options, tune.report)
    else:
        trainer = make_trainer(cfg, options, callbacks=[TuneReportCallback()])
        try:
            run = summarize(trainer.fit())
        except ray.train.TrainingFailedError as error:
            run = failed_run(error, options)
    if is_storage_failure(run.status):  # no outcome: Tune retries the trial, then a rerun resumes it
        raise StorageError(run.status.removeprefix("failed: "))
    outcome = {**run.metrics, "status": run.status, "samples_path": run.samples_path, "trial_key": key,
               "checkpoint_path": run.checkpoint_path,
               "training_hours": sum(m.get("epoch_seconds", 0.0) for m in run.history) / 3600}
    write_outcome(plan.trials_path, key, outcome)
    tune.report(outcome)
