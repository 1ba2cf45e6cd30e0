"""Feeds a study's ProgressView from Tune: a callback on the driver, beside the MLflow tracker.

Like the tracker it holds plain data until Tune calls its `setup` hook, so Tune may pickle it with
the experiment and a resumed study restores it as it is. On a resume, the trials that ended before
are the ones Tune hands back already TERMINATED: they are counted, not retrained.
"""
import os

from ray import tune
from ray.tune.experiment import Trial

from .failures import reason
from .progress_view import ProgressView, ending
from .tracking import status_of


def error_of(trial):
    """The reason of a trial's last error, from its error file."""
    if trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as f:
            return reason(f.read())
    return "unknown error"


class ProgressCallback(tune.Callback):
    """Tune callback showing a study's progress. plan: the StudyPlan; concurrency: trials at once
    (None: unlimited); log_path: where Ray's own messages go, named once by the view."""

    def __init__(self, plan, concurrency, log_path):
        self.plan, self.concurrency, self.log_path = plan, concurrency, log_path
        self.view = None  # made by setup(), on the driver

    def setup(self, **info):
        epochs = max(t.config.epochs for t in self.plan.trials)
        self.view = ProgressView(self.plan.trial_count, epochs, self.concurrency)
        self.view.note(f"[study] Ray's own messages (start-up, trial processes, shutdown) go to {self.log_path}")
        self.synced = False

    def _sync(self, trials):
        """At the first hook: count the trials a resumed study finished before (Tune hands them back
        TERMINATED, and runs no hook for them)."""
        if not self.synced:
            self.synced = True
            self.view.restored({self.plan.key_of(t): status_of(t.last_result, t.status) for t in trials
                                if t.status in (Trial.TERMINATED, Trial.ERROR)})

    def on_step_begin(self, iteration, trials, **info):
        self._sync(trials)
        self.view.refresh()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._sync(trials)
        self.view.started(self.plan.key_of(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if isinstance(result.get("val_bpd"), float) and "epoch" in result:
            self.view.epoch(self.plan.key_of(trial), result["epoch"], result["val_bpd"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = status_of(result, "TERMINATED")
        self.view.ended(self.plan.key_of(trial), status, ending(result, status))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.view.retrying(self.plan.key_of(trial), f"failure {trial.num_failures}: {error_of(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.view.ended(self.plan.key_of(trial), "failed", f"failed: {error_of(trial)}")

    def on_experiment_end(self, trials, **info):
        self._sync(trials)  # a resumed study with nothing left to run has no step
        self.view.close()
