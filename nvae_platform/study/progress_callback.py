"""Feeds a study's ProgressView from Tune: a callback on the driver, beside the MLflow tracker.

Like the tracker it holds plain data until Tune calls its `setup` hook, so Tune may pickle it with
the experiment and a resumed study restores it as it is. On a resume, the trials that ended before
are counted, not retrained: those Tune hands back TERMINATED, and those whose outcome file was
written after Tune last saved its state, which Tune runs again and which only report that outcome.
So are the trials of a grid's plan that an earlier invocation (fewer seeds or levels) ended, which
this invocation's Tune experiment does not hold.
"""
import os

from ray import tune
from ray.tune.experiment import Trial

from nvae_platform.record.outcomes import read_outcome
from nvae_platform.record.tracking import status_of
from nvae_platform.study.cost import reserved
from nvae_platform.study.progress_view import ProgressView, ending
from nvae_platform.train.failures import reason


def error_of(trial):
    """The reason of a trial's last error, from its error file."""
    if trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as f:
            return reason(f.read())
    return "unknown error"


class ProgressCallback(tune.Callback):
    """Tune callback showing a study's progress. plan: the StudyPlan; concurrency: trials at once
    (None: unlimited); log_path: where Ray's own messages go, named once by the view; cost: the
    plan's cost.Estimate, whose trial seconds project the hours the study takes (None: none)."""

    def __init__(self, plan, concurrency, log_path, cost=None):
        self.plan, self.concurrency, self.log_path = plan, concurrency, log_path
        self.estimates = dict(cost.trial_seconds) if cost is not None and cost.known else {}
        self.view = None  # made by setup(), on the driver

    def setup(self, **info):
        epochs = max(t.config.epochs for t in self.plan.trials)
        estimates = getattr(self, "estimates", {})  # a callback Tune pickled before there were estimates has none
        self.view = ProgressView(self.plan.trial_count, epochs, self.concurrency, reserved=reserved(self.plan.options),
                                 estimates=estimates)
        self.view.note(f"[study] Ray's own messages (start-up, trial processes, shutdown) go to {self.log_path}")
        self.synced = False
        self.replayed = set()  # keys of trials that ended before and that Tune runs again

    def _sync(self, trials):
        """At the first hook: count the trials a resumed study finished before (Tune hands them back
        TERMINATED and runs no hook for them, or runs them again when its state missed their end)."""
        if not self.synced:
            self.synced = True
            ended = {self.plan.key_of(t): status_of(t.last_result, t.status) for t in trials
                     if t.status in (Trial.TERMINATED, Trial.ERROR)}
            keys = [self.plan.key_of(t) for t in trials]
            if not self.plan.is_search:
                known = set(keys)
                keys += [t.key for t in self.plan.trials if t.key not in known]
            for key in keys:
                outcome = None if key in ended else read_outcome(self.plan.trials_path, key)
                if outcome is not None:
                    ended[key] = status_of(outcome, "TERMINATED")
                    self.replayed.add(key)
            self.view.restored(ended)

    def on_step_begin(self, iteration, trials, **info):
        self._sync(trials)
        self.view.refresh()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._sync(trials)
        key = self.plan.key_of(trial)
        outcome = None if key in self.replayed else read_outcome(self.plan.trials_path, key)
        if outcome is not None:  # ended before, and Tune made its trial after the first hook
            self.replayed.add(key)
            status = status_of(outcome, "TERMINATED")
            self.view.ended(key, status, f"{ending(outcome, status)} (ended before; not retrained)")
        if key not in self.replayed:
            self.view.started(key)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = self.plan.key_of(trial)
        if key not in self.replayed and isinstance(result.get("val_bpd"), float) and "epoch" in result:
            self.view.epoch(key, result["epoch"], result["val_bpd"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        key = self.plan.key_of(trial)
        if key in self.replayed:
            return
        result = trial.last_result or {}
        status = status_of(result, "TERMINATED")
        self.view.ended(key, status, ending(result, status))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.view.retrying(self.plan.key_of(trial), f"failure {trial.num_failures}: {error_of(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.view.ended(self.plan.key_of(trial), "failed", f"failed: {error_of(trial)}")

    def on_experiment_end(self, trials, **info):
        self._sync(trials)  # a resumed study with nothing left to run has no step
        self.view.close()
