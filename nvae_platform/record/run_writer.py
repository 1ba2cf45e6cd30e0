"""One MLflow run of one trained configuration, written by one process (a study's driver for each
trial; `studies/train.py`'s driver for its run).

Each operation is idempotent, so a rerun after any crash completes the record instead of duplicating
it: params and config.json are written again if a failed write left them out, an epoch is logged
once (its step is the epoch), and every epoch the run's checkpoints hold is back-filled.
"""
import contextlib
import json
import os
import tempfile
import time

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from nvae_platform.train.checkpoints import epoch_checkpoints, fetch_file

STATUS_TAG = "nvae.status"
NODES_TAG = "nvae.nodes"
CHECKPOINT_TAG = "nvae.checkpoint"  # the final checkpoint folder: what loads the trained model
CONFIG_ARTIFACT = "config.json"
UNREADABLE_ARTIFACT = "unreadable_files.txt"
ERROR_ARTIFACT = "error.txt"
DATA_DIGEST_TAG = "nvae.data_digest"
# The numbers Tune adds to every reported result (its documented "auto-filled metrics"), and ours that
# are not metrics; tests/test_ray_internals.py checks this list against Tune's own.
TUNE_AUTO_FILLED = frozenset({"training_iteration", "iterations_since_restore", "time_this_iter_s", "time_total_s",
                              "time_since_restore", "timestamp", "timesteps_total", "timesteps_since_restore",
                              "episodes_total", "pid", "date", "hostname", "node_ip", "config", "checkpoint_dir_name"})
NOT_METRICS = TUNE_AUTO_FILLED | {"done", "trial_id", "experiment_tag", "epoch", "should_checkpoint"}


class RunWriter:
    """The record of one run: `run_folder` is where its Train run checkpoints (local or URI)."""

    def __init__(self, client, run_id, run_folder):
        self.client, self.run_id, self.run_folder = client, run_id, run_folder
        self.logged = set()  # epochs already logged
        self.nodes = set()  # Ray node ids the run's workers ran on (a recovered run may move)
        self.closed = False  # terminal: FINISHED or FAILED
        self.failed = False  # FAILED
        self.complete = False  # params and config.json are there
        self.data_logged = False  # the dataset input (name, splits, digest) is there
        self.read_folders = set()  # checkpoint folders whose metrics backfill has logged

    @classmethod
    def found(cls, client, run, run_folder):
        """The writer of an existing run, with what it already holds."""
        writer = cls(client, run.info.run_id, run_folder)
        writer.logged = {m.step for m in client.get_metric_history(run.info.run_id, "train_bpd")}
        writer.nodes = set(filter(None, run.data.tags.get(NODES_TAG, "").split(",")))
        writer.closed = run.info.status in ("FINISHED", "FAILED")
        writer.failed = run.info.status == "FAILED"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        writer.complete = bool(run.data.params) and CONFIG_ARTIFACT in artifacts
        writer.data_logged = DATA_DIGEST_TAG in run.data.tags
        return writer

    def log_batch(self, metrics=(), params=None, tags=None):
        """One or more MLflow log_batch calls, each within MLflow's limits (100 params or tags)."""
        items = ([("metrics", m) for m in metrics]
                 + [("params", Param(k, str(v)[:6000])) for k, v in (params or {}).items()]
                 + [("tags", RunTag(k, str(v)[:5000])) for k, v in (tags or {}).items()])
        for start in range(0, len(items), 100):
            chunk = items[start:start + 100]
            self.client.log_batch(self.run_id, **{kind: [x for k, x in chunk if k == kind]
                                                  for kind in ("metrics", "params", "tags")})

    def log_config(self, cfg, option_params, params=True, skipped=()):
        """Params (the config and run options) and config.json; params=False writes config.json only
        (a run continued with a changed config keeps its first params, which MLflow cannot change).
        skipped: the unreadable data files left out (--skip-unreadable), written to unreadable_files.txt."""
        if params:
            self.log_batch(params={**cfg.to_dict(), **option_params})
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, CONFIG_ARTIFACT)
            with open(path, "w") as f:
                json.dump({"nvae": cfg.to_dict(), "options": option_params}, f, indent=2)
            self.client.log_artifact(self.run_id, path)
            if skipped:
                path = os.path.join(folder, UNREADABLE_ARTIFACT)
                with open(path, "w") as f:
                    f.write("".join(f"{name}\n" for name in skipped))
                self.client.log_artifact(self.run_id, path)
        self.complete = True

    def log_epoch(self, result):
        """One point per numeric metric of an epoch's report at step = epoch, once per epoch."""
        epoch = result.get("epoch")
        if epoch is None or epoch in self.logged:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(epoch)) for k, v in result.items()
                   if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        tags = {"nvae.device": result["device"]} if "device" in result else {}
        if result.get("nodes"):
            self.nodes.update(result["nodes"].split(","))
            tags[NODES_TAG] = ",".join(sorted(self.nodes))
        if result.get("set_aside_checkpoints"):  # damaged checkpoints this resume renamed (resume.py)
            tags["nvae.set_aside_checkpoints"] = result["set_aside_checkpoints"]
        if result.get("data_digest") and not self.data_logged:
            self.log_dataset(result)
            tags[DATA_DIGEST_TAG] = result["data_digest"]
        # Tags first, in their own call: a store commits a batch's metrics before its tags, so a reader
        # (a dashboard, a test) could otherwise see the epoch without the nodes it ran on.
        self.log_batch(tags=tags)
        self.log_batch(metrics)
        self.logged.add(epoch)

    def log_dataset(self, result):
        """The data the workers read, as the run's MLflow dataset input: name, digest, source (a remote
        data dir's URI with the digest of its files' listing), split sizes."""
        source = result.get("data_source", "")
        remote = {"files_digest": result["data_files_digest"]} if result.get("data_files_digest") else {}
        dataset = Dataset(name=result["data_name"], digest=result["data_digest"],
                          source_type=source.split("://")[0] if "://" in source else "local",
                          source=json.dumps({"path": source, **remote}),
                          profile=json.dumps({"splits": json.loads(result.get("data_splits") or "{}")}))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
        self.data_logged = True

    def backfill(self):
        """Log each epoch the run's checkpoints hold and MLflow lacks: a driver killed between a
        checkpoint's commit and its record loses no epoch."""
        for checkpoint in epoch_checkpoints(self.run_folder, skip=self.read_folders):
            self.log_epoch(checkpoint.metrics)
            self.read_folders.add(checkpoint.path.rstrip("/").rsplit("/", 1)[-1])

    def finish(self, result, status, error=""):
        """Final tags, metrics, sample grid and checkpoint location of an ended run; it ends FINISHED
        (FAILED if it failed)."""
        self.backfill()
        tags = {STATUS_TAG: status}
        if result.get("checkpoint_path"):
            tags[CHECKPOINT_TAG] = result["checkpoint_path"]
        if result.get("status") and result["status"] not in ("finished", "running"):
            tags["nvae.status_detail"] = result["status"]
        error = error or result.get("traceback", "")
        if error:
            tags["nvae.error"] = error[-5000:]
        final = {k: result[k] for k in ("training_hours",) if isinstance(result.get(k), float)}
        if "time_total_s" in result:  # a trial's wall time, start-up and evaluation included
            final["wall_hours"] = result["time_total_s"] / 3600
        now, step = int(time.time() * 1000), int(result.get("epoch", 0) or 0)
        self.log_batch([Metric(k, v, now, step) for k, v in final.items()], tags=tags)
        if error:  # the traceback, whole, beside the tag's tail
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, ERROR_ARTIFACT)
                with open(path, "w") as f:
                    f.write(error)
                self.client.log_artifact(self.run_id, path)
        if result.get("samples_path"):
            with tempfile.TemporaryDirectory() as folder:
                try:
                    self.client.log_artifact(self.run_id, fetch_file(result["samples_path"], folder))
                except OSError as err:  # a lost sample grid must not lose the run
                    self.client.set_tag(self.run_id, "nvae.samples_error", str(err)[:500])
        self.client.set_terminated(self.run_id, "FAILED" if status == "failed" else "FINISHED")
        self.closed, self.failed = True, status == "failed"

    def reopen(self):
        """A failed run that trains again (a rerun resumes it): RUNNING, without its failure's tags."""
        for tag in ("nvae.error", "nvae.status_detail"):
            with contextlib.suppress(MlflowException):  # a tag the run does not have
                self.client.delete_tag(self.run_id, tag)
        self.client.set_tag(self.run_id, STATUS_TAG, "running")
        self.client.update_run(self.run_id, status="RUNNING")
        self.closed = self.failed = False

    def interrupt(self):
        """End a run whose training stopped without an outcome: KILLED, resumable."""
        self.client.set_tag(self.run_id, STATUS_TAG, "interrupted")
        self.client.set_terminated(self.run_id, "KILLED")
