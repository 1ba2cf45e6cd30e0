"""The MLflow run of one `studies/train.py` run, written by its driver alone.

A run is named by what it trains: `<name>-<digest of the config and worker count>`, so a changed
config is a new run folder and a new MLflow run, and the same command again resumes its own. While
Ray Train trains, a thread on the driver logs each epoch once its checkpoint is committed (the
checkpoint folder holds the epoch's metrics), so the record is live, and a rerun after any crash
back-fills what the store lacks; the end of the run adds the final figures, the sample grid and the
final checkpoint's location.
"""
import contextlib
import hashlib
import json
import threading

import torch

from nvae_core import NVAE
from nvae_platform.record.run_writer import STATUS_TAG, RunWriter
from nvae_platform.record.store import StoreClient, experiment_id
from nvae_platform.record.tracking import (
    STORE_ERRORS,
    StoreWriteError,
    default_artifact_location,
    provenance_tags,
    status_of,
)
from nvae_platform.train.checkpoints import epoch_checkpoints, read_state

RUN_KEY_TAG = "nvae.run_key"
WATCH_SECONDS = 2.0


def run_name(prefix, cfg, options):
    """'<prefix>-<8 hex digits>': the digest covers the config and the worker count (the global batch)."""
    identity = json.dumps({"config": cfg.to_dict(), "workers": options.workers}, sort_keys=True)
    return f"{prefix}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"


def resume_changes(run_folder, cfg):
    """{field: (old, new)} of a run continued with cfg (--resume-from), checked before anything starts:
    ValueError if the folder holds no checkpoint, or cfg builds a model of other shapes."""
    checkpoints = epoch_checkpoints(run_folder)
    if not checkpoints:
        raise ValueError(f"--resume-from: no checkpoint under {run_folder}; give a run folder name that "
                         "`ls` shows under --storage-path, or drop --resume-from to start a new run")
    state = read_state(checkpoints[-1].path)
    old = state.get("config") or {}
    changes = {k: (old[k], v) for k, v in cfg.to_dict().items() if k in old and old[k] != v}
    with torch.device("meta"):  # shapes only: no memory, no time
        shapes = {k: tuple(v.shape) for k, v in NVAE(cfg).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
    if shapes != theirs:
        fields = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) or "none recorded"
        raise ValueError(f"--resume-from: this config builds a model of other shapes than the checkpoint's "
                         f"(changed: {fields}); only fields that keep the model, such as epochs or "
                         "learning_rate, may change: drop --resume-from to train a new run")
    return changes


def describe_changes(changes):
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())


class TrainRecord:
    """One train.py run's MLflow run: opened before training, watched during it, finished after."""

    def __init__(self, tracking_uri, experiment, storage_path, cfg, options, tags):
        self.tracking_uri, self.experiment, self.cfg, self.options, self.tags = (
            tracking_uri, experiment, cfg, options, tags)
        self.run_folder = f"{storage_path.rstrip('/')}/{options.name}"
        self.writer = None
        self.finished_before = False  # this run was trained to its end with this very config

    def open(self, changes=None):
        """Find this run folder's MLflow run (continuing it) or create it; complete and back-fill it.
        changes ({field: (old, new)}, from --resume-from) are recorded as a tag and in config.json."""
        try:
            client = StoreClient(self.tracking_uri)
            exp = experiment_id(client, self.experiment, default_artifact_location(self.tracking_uri, self.experiment))
            found = client.search_runs([exp], f"tags.`{RUN_KEY_TAG}` = '{self.run_folder}'", max_results=1)
            if found:
                self.writer = RunWriter.found(client, found[0], self.run_folder)
                self.finished_before = (found[0].data.tags.get(STATUS_TAG) == "finished" and self.writer.closed
                                        and not changes)
                if self.finished_before:
                    return self  # nothing to train: the caller says so
                client.update_run(self.writer.run_id, status="RUNNING")
                self.writer.closed = False
            else:
                tags = {RUN_KEY_TAG: self.run_folder, STATUS_TAG: "running", **self.tags, **provenance_tags()}
                run = client.create_run(exp, run_name=self.options.name, tags={k: str(v) for k, v in tags.items()})
                self.writer = RunWriter(client, run.info.run_id, self.run_folder)
            if changes:
                client.set_tag(self.writer.run_id, "nvae.resumed_with", describe_changes(changes))
            if changes or not self.writer.complete:
                has_params = bool(found) and bool(found[0].data.params)
                self.writer.log_config(self.cfg, self.options.params(), params=not (changes and has_params),
                                      skipped=self.options.skip_files)
            self.writer.backfill()
        except STORE_ERRORS as error:
            raise StoreWriteError(self.tracking_uri, error) from error
        return self

    @property
    def run_id(self):
        return self.writer.run_id

    @contextlib.contextmanager
    def watching(self):
        """Log each epoch as its checkpoint appears, from a thread on this process, until the block ends.
        A store that stops taking writes stops the watching, not the training: finish() completes it."""
        stop = threading.Event()

        def watch():
            while not stop.wait(WATCH_SECONDS):
                try:
                    self.writer.backfill()
                except STORE_ERRORS as error:
                    print(f"[nvae] {StoreWriteError(self.tracking_uri, error)}; training goes on", flush=True)
                    return

        thread = threading.Thread(target=watch, name="nvae-mlflow-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def interrupt(self):
        """Record the epochs checkpointed so far and end the run KILLED (a Ctrl-C, a SIGTERM): resumable."""
        try:
            self.writer.backfill()
            self.writer.interrupt()
        except STORE_ERRORS as error:
            raise StoreWriteError(self.tracking_uri, error) from error

    def finish(self, result):
        """Record how a RunResult ended: every checkpointed epoch, final figures, grid, checkpoint."""
        outcome = {**result.metrics, "status": result.status, "checkpoint_path": result.checkpoint_path,
                   "samples_path": result.samples_path,
                   "training_hours": sum(m.get("epoch_seconds", 0.0) for m in result.history) / 3600}
        try:
            self.writer.finish(outcome, status_of(outcome, "ERROR" if result.status.startswith("failed")
                                                  else "TERMINATED"))
        except STORE_ERRORS as error:
            raise StoreWriteError(self.tracking_uri, error) from error


