"""MLflow records of a study, written by one process: the driver.

Trial workers may run on nodes with no route to the tracking store, and many processes writing one
SQLite file lose writes or lock it, so workers report to Ray and this Tune callback, on the driver,
writes MLflow: a parent run per study, a nested child run per trial (params = the resolved config,
tags = factor levels, status and provenance, one metric point per epoch, artifacts = config JSON
and sample grid). A resumed study finds its parent and child runs by tag and continues them.

The tracker's state is the store itself: it holds only plain data until Tune calls its `setup`
hook (at the start of every fit, a restored one included), which opens the store and reads what
earlier invocations recorded. So Tune may pickle it with the experiment and restore it as it is.
"""
import functools
import json
import os
import platform
import sqlite3
import subprocess
import tempfile
import time

import pyarrow.fs
import requests
import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray import tune

from . import fault_injection
from .checkpoints import epoch_checkpoints
from .outcomes import read_outcome
from .ray_internals import TUNE_RESULT_KEYS
from .store import StoreClient, experiment_id, sqlite_path

STUDY_KEY_TAG = "nvae.study_key"
TRIAL_KEY_TAG = "nvae.trial_key"
STATUS_TAG = "nvae.status"
NODES_TAG = "nvae.nodes"
CHECKPOINT_TAG = "nvae.checkpoint"  # the final checkpoint folder: what loads the trained model
CONFIG_ARTIFACT = "config.json"
PARENT_TAG = "mlflow.parentRunId"
NOT_METRICS = set(TUNE_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "epoch", "should_checkpoint"}


def default_artifact_location(tracking_uri, experiment):
    """Artifacts of a local SQLite store live beside it in mlartifacts/; a server chooses its own."""
    if tracking_uri.startswith("sqlite:///"):
        folder = os.path.dirname(tracking_uri[len("sqlite:///"):])
        return "file://" + os.path.join(folder, "mlartifacts", experiment)
    return None


WRITE_PROBE_TAG = "nvae.write_probe"


def _probe_sqlite_write(path):
    """Attempt a write inside a transaction and roll it back: the store is left as it was."""
    connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("CREATE TABLE nvae_write_probe (x)")
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def _probe_server_write(client, experiment):
    """Set and delete a tag on the experiment the command will write to, if it exists yet."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        client.set_experiment_tag(found.experiment_id, WRITE_PROBE_TAG, "ok")
        client.delete_experiment_tag(found.experiment_id, WRITE_PROBE_TAG)


def check_tracking_uri(tracking_uri, experiment=None):
    """Raise ValueError naming the problem unless the store can be reached and takes a write (a
    SQLite file: a rolled-back write; a server: a tag set and deleted on `experiment` if it exists).
    A SQLite file that does not exist yet is not created here: its folder must be writable."""
    path = sqlite_path(tracking_uri)
    if path is not None:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"--tracking-uri {tracking_uri}: the folder {folder} does not exist or is not "
                             "writable; choose another path, or omit --tracking-uri for ./mlflow.db")
        if not os.path.exists(path):
            return
        try:
            _probe_sqlite_write(path)
        except sqlite3.Error as error:
            raise ValueError(f"--tracking-uri {tracking_uri} does not take a write ({error}); make the file "
                             "writable, or choose another store") from None
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        client = StoreClient(tracking_uri)  # reaches the store (and migrates an old SQLite schema)
        if experiment and path is None:
            _probe_server_write(client, experiment)
    except Exception as error:  # noqa: BLE001  any failure here means no study can be recorded
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        if "error code 401" in str(error) or "error code 403" in str(error):  # a server with authentication
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            fix = (f"check MLFLOW_TRACKING_PASSWORD, and that user {user!r} may write experiments" if user
                   else "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
            raise ValueError(f"--tracking-uri {tracking_uri} refused the request ({first}): {fix}") from None
        raise ValueError(f"--tracking-uri {tracking_uri} cannot be reached ({first}); start the MLflow "
                         "server, fix the URI, or omit --tracking-uri for a SQLite store in this folder") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def provenance_tags():
    """git commit, library versions and host: where a result came from."""
    import mlflow
    import optuna
    import ray
    import torch

    tags = {"nvae.python": platform.python_version(), "nvae.torch": torch.__version__, "nvae.ray": ray.__version__,
            "nvae.mlflow": mlflow.__version__, "nvae.optuna": optuna.__version__, "nvae.host": platform.node()}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["nvae.git_dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def status_of(result, trial_status):
    """finished / diverged / failed / stopped early, from a trial's last result and Tune status."""
    status = str((result or {}).get("status", ""))
    if status in ("finished", "diverged") or status.startswith("diverged"):
        return "diverged" if status.startswith("diverged") else "finished"
    if status.startswith("failed") or trial_status == "ERROR":
        return "failed"
    return "stopped early" if trial_status == "TERMINATED" else "interrupted"


def fetch_file(path, storage_path, folder):
    """Copy a file from the study's storage (local folder or URI) into folder; return its local path."""
    filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
    local = os.path.join(folder, os.path.basename(path))
    pyarrow.fs.copy_files(path, local, source_filesystem=filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


class StoreWriteError(RuntimeError):
    """The tracking store stopped taking writes (disk full, read-only file, server gone)."""

    def __init__(self, tracking_uri, error):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        super().__init__(f"the MLflow store {tracking_uri} stopped taking writes ({first}). Nothing trained is "
                         "lost: free space or make the store writable, then run the same command again; it "
                         "resumes from the checkpoints and completes the record")


STORE_ERRORS = (MlflowException, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, OSError,
                requests.exceptions.RequestException)


def _writes_store(hook):
    """A Tune hook of the tracker: a store error in it becomes a StoreWriteError, which ends the study."""
    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except STORE_ERRORS as error:
            raise StoreWriteError(self.tracking_uri, error) from error
    return guarded


class MlflowTracker(tune.Callback):
    """Tune callback writing a study to MLflow from the driver. `plan` describes each trial
    (StudyPlan: key, levels, seed and resolved config of a Tune trial config)."""

    def __init__(self, plan, tracking_uri, experiment):
        self.plan, self.tracking_uri, self.experiment = plan, tracking_uri, experiment
        self.client = None  # opened by setup(): until then the tracker is plain, picklable data

    @_writes_store
    def setup(self, **info):
        """Tune's hook at the start of every fit: open the store and read what is recorded."""
        self.open()

    def open(self):
        """Find or create the experiment and this study's parent run; load its children, complete any
        that a failed write left half-made, and log every epoch their checkpoints hold that MLflow lacks."""
        self.client = StoreClient(self.tracking_uri)
        self.provenance = provenance_tags()
        self.parent_id = None
        self.runs = {}  # trial key -> MLflow run id
        self.logged_epochs = {}  # run id -> epochs already logged (a resumed trial re-reports none twice)
        self.closed = set()  # run ids already terminal (done in an earlier invocation)
        self.nodes = {}  # run id -> Ray node ids its workers ran on (a recovered trial may move)
        self.incomplete = set()  # trial keys whose run lacks its params or config.json
        self.experiment_id = experiment_id(self.client, self.experiment,
                                           default_artifact_location(self.tracking_uri, self.experiment))
        found = self.client.search_runs([self.experiment_id], f"tags.`{STUDY_KEY_TAG}` = '{self.plan.study_key}'",
                                        max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.plan.experiment_dir,
                                         tags={STUDY_KEY_TAG: self.plan.study_key, **self.plan.study_tags(),
                                               **self.provenance})
            self.parent_id = run.info.run_id
        if not found or not found[0].data.params:  # new, or a write failed right after its creation
            self._log_batch(self.parent_id, params=self.plan.study_params())
        children = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                                           max_results=10000)
        for run in children:
            key = run.data.tags.get(TRIAL_KEY_TAG)
            self.runs[key] = run.info.run_id
            history = self.client.get_metric_history(run.info.run_id, "train_bpd")
            self.logged_epochs[run.info.run_id] = {m.step for m in history}
            self.nodes[run.info.run_id] = set(filter(None, run.data.tags.get(NODES_TAG, "").split(",")))
            if run.info.status == "FINISHED" or run.info.status == "FAILED":
                self.closed.add(run.info.run_id)
            artifacts = {a.path for a in self.client.list_artifacts(run.info.run_id)}
            if not run.data.params or CONFIG_ARTIFACT not in artifacts:
                self.incomplete.add(key)
            self._backfill(run.info.run_id, key)
        configs = {t.key: t.config for t in self.plan.trials} if not self.plan.is_search else {}
        for key in sorted(self.incomplete & set(configs)):  # a search's trial is completed when it reports
            self._complete(key, configs[key])
        return self

    def _backfill(self, run_id, key):
        """Log each epoch the trial's checkpoints hold and MLflow lacks: a driver killed between a
        checkpoint's commit and its record loses no epoch."""
        for checkpoint in epoch_checkpoints(f"{self.plan.trials_path}/{key}"):
            self._log_epoch(run_id, checkpoint.metrics)

    def _complete(self, key, cfg):
        """Params and config.json of a child run (again, if a failed write left them out)."""
        run_id = self.runs[key]
        self._log_batch(run_id, params={**cfg.to_dict(), **self.plan.option_params()})
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, CONFIG_ARTIFACT)
            with open(path, "w") as f:
                json.dump({"nvae": cfg.to_dict(), "options": self.plan.option_params()}, f, indent=2)
            self.client.log_artifact(run_id, path)
        self.incomplete.discard(key)

    def _log_batch(self, run_id, metrics=(), params=None, tags=None):
        """One or more MLflow log_batch calls, each within MLflow's limits (100 params or tags)."""
        items = ([("metrics", m) for m in metrics]
                 + [("params", Param(k, str(v)[:6000])) for k, v in (params or {}).items()]
                 + [("tags", RunTag(k, str(v)[:5000])) for k, v in (tags or {}).items()])
        for start in range(0, len(items), 100):
            chunk = items[start:start + 100]
            self.client.log_batch(run_id, **{kind: [x for k, x in chunk if k == kind]
                                             for kind in ("metrics", "params", "tags")})

    def _child(self, trial):
        key = self.plan.key_of(trial)
        if key not in self.runs or key in self.incomplete:
            levels, seed, cfg = self.plan.describe(trial)
        if key not in self.runs:
            tags = {PARENT_TAG: self.parent_id, TRIAL_KEY_TAG: key, "nvae.seed": seed, STATUS_TAG: "running",
                    "nvae.tune_trial_id": trial.trial_id, **{f"factor.{k}": v for k, v in levels.items()},
                    **self.provenance}
            # A tracking server takes string tags only (a SQLite store converts them itself).
            run = self.client.create_run(self.experiment_id, run_name=key, tags={k: str(v) for k, v in tags.items()})
            run_id = run.info.run_id
            self.runs[key], self.logged_epochs[run_id], self.nodes[run_id] = run_id, set(), set()
            self.incomplete.add(key)
        if key in self.incomplete:
            self._complete(key, cfg)
        return self.runs[key]

    @_writes_store
    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        if run_id not in self.closed:
            self.client.update_run(run_id, status="RUNNING")
            print(f"[study] started {self.plan.key_of(trial)}", flush=True)

    @_writes_store
    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._child(trial)
        if run_id not in self.closed:
            fault_injection.kill_driver_before_recording(self.plan.key_of(trial), result.get("epoch"))
            self._log_epoch(run_id, result)

    def _log_epoch(self, run_id, result):
        """One point per numeric metric of an epoch's report at step = epoch, once per epoch."""
        epoch = result.get("epoch")
        if epoch is None or epoch in self.logged_epochs[run_id]:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(epoch)) for k, v in result.items()
                   if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        tags = {"nvae.device": result["device"]} if "device" in result else {}
        if result.get("nodes"):
            self.nodes[run_id].update(result["nodes"].split(","))
            tags[NODES_TAG] = ",".join(sorted(self.nodes[run_id]))
        self._log_batch(run_id, metrics, tags=tags)
        self.logged_epochs[run_id].add(epoch)

    def _finish(self, run_id, key, result, status, error=""):
        """Final tags, metrics and sample grid of an ended trial; its run ends FINISHED (FAILED if it failed)."""
        self._backfill(run_id, key)
        tags = {STATUS_TAG: status}
        if result.get("checkpoint_path"):
            tags[CHECKPOINT_TAG] = result["checkpoint_path"]
        if result.get("status") and result["status"] not in ("finished", "running"):
            tags["nvae.status_detail"] = result["status"]
        if error:
            tags["nvae.error"] = error
        final = {k: result[k] for k in ("training_hours",) if isinstance(result.get(k), float)}
        if "time_total_s" in result:  # the trial's wall time, start-up and evaluation included
            final["wall_hours"] = result["time_total_s"] / 3600
        now, step = int(time.time() * 1000), int(result.get("epoch", 0) or 0)
        self._log_batch(run_id, [Metric(k, v, now, step) for k, v in final.items()], tags=tags)
        if result.get("samples_path"):
            with tempfile.TemporaryDirectory() as folder:
                try:
                    self.client.log_artifact(run_id, fetch_file(result["samples_path"], self.plan.storage_path, folder))
                except OSError as err:  # a lost sample grid must not lose the run
                    self.client.set_tag(run_id, "nvae.samples_error", str(err)[:500])
        self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
        self.closed.add(run_id)
        figure = f"  test_bpd {result['test_bpd']:.4f}" if isinstance(result.get("test_bpd"), float) else ""
        print(f"[study] {key}: {result.get('status') or status}{figure}  "
              f"({len(self.closed)}/{self.plan.trial_count} done)", flush=True)

    @_writes_store
    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        if run_id not in self.closed:
            result = trial.last_result or {}
            self._finish(run_id, self.plan.key_of(trial), result, status_of(result, "TERMINATED"))

    @_writes_store
    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        error = ""
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                error = f.read()[-2000:]
        if run_id not in self.closed:
            self._finish(run_id, self.plan.key_of(trial), trial.last_result or {}, "failed", error)

    @property
    def interrupted(self):
        """Whether some trial of the study has no terminal record yet."""
        return len(self.closed) < self.plan.trial_count

    def close(self):
        """End every child still open (from its outcome file if the trial ended while no driver
        listened, else KILLED), then the parent: KILLED if the study was interrupted."""
        for key, run_id in self.runs.items():
            if run_id in self.closed:
                continue
            outcome = read_outcome(self.plan.trials_path, key)
            if outcome is not None:
                self._finish(run_id, key, outcome, status_of(outcome, "TERMINATED"))
            else:
                self.client.set_tag(run_id, STATUS_TAG, "interrupted")
                self.client.set_terminated(run_id, "KILLED")
        self.client.set_terminated(self.parent_id, "KILLED" if self.interrupted else "FINISHED")


