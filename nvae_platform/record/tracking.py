"""MLflow records of a study, written by one process: the driver.

Trial workers may run on nodes with no route to the tracking store, and many processes writing one
SQLite file lose writes or lock it, so workers report to Ray and this Tune callback, on the driver,
writes MLflow: a parent run per study, a nested child run per trial (params = the resolved config,
tags = factor levels, status and provenance, one metric point per epoch, artifacts = config JSON
and sample grid). A resumed study finds its parent and child runs by tag and continues them; so
does a later invocation that adds seeds or levels to the study (the same study key), which widens
the parent's tags naming the study's levels, seeds and trial count.

The tracker's state is the store itself: it holds only plain data until Tune calls its `setup`
hook (at the start of every fit, a restored one included), which opens the store and reads what
earlier invocations recorded. So Tune may pickle it with the experiment and restore it as it is.
"""
import contextlib
import functools
import os
import platform
import re
import sqlite3
import subprocess
import time

import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from ray import tune
from ray.tune.experiment import Trial

from nvae_platform.folder_lock import unique_name
from nvae_platform.record.outcomes import read_outcome
from nvae_platform.record.run_writer import CHECKPOINT_TAG, CONFIG_ARTIFACT, NODES_TAG, STATUS_TAG, RunWriter
from nvae_platform.record.store import StoreClient, experiment_id, sqlite_path, without_retries
from nvae_platform.train import fault_injection

STUDY_KEY_TAG = "nvae.study_key"
FINDING_TAG = "nvae.finding"  # nvae.finding.<name> = the finding's verdict, on the parent run
TRIAL_KEY_TAG = "nvae.trial_key"
PARENT_TAG = "mlflow.parentRunId"
LOOKS_TAG = "nvae.findings.looks"
__all__ = ["CHECKPOINT_TAG", "CONFIG_ARTIFACT", "FINDING_TAG", "NODES_TAG", "PARENT_TAG", "STATUS_TAG", "STUDY_KEY_TAG",
           "TRIAL_KEY_TAG", "MlflowTracker", "StoreWriteError", "check_tracking_uri", "provenance_tags", "status_of"]


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
        table = re.sub(r"\W", "_", unique_name("nvae_write_probe"))  # of its own name: two commands at once
        connection.execute(f'CREATE TABLE "{table}" (x)')
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def _probe_server_write(client, experiment):
    """Set and delete a tag on the experiment the command will write to, if it exists yet."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        tag = f"{WRITE_PROBE_TAG}.{unique_name('probe')}"  # of its own name: two commands at once
        client.set_experiment_tag(found.experiment_id, tag, "ok")
        client.delete_experiment_tag(found.experiment_id, tag)


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
    if path is None and _is_database(tracking_uri):
        _probe_database(tracking_uri)
    # No retries: a server that is down refuses at once. A server that is up may be slow to answer its
    # first request (5 s was too short for a new one on a loaded head), so a generous read timeout.
    try:
        with without_retries(timeout_seconds=30):
            client = StoreClient(tracking_uri)  # reaches the store (and migrates an old SQLite schema)
            if experiment and path is None:
                _probe_server_write(client, experiment)
    except Exception as error:  # noqa: BLE001  any failure here means no study can be recorded
        first = first_line(error)
        if "error code 401" in str(error) or "error code 403" in str(error):  # a server with authentication
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            fix = (f"check MLFLOW_TRACKING_PASSWORD, and that user {user!r} may write experiments" if user
                   else "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
            raise ValueError(f"--tracking-uri {tracking_uri} refused the request ({first}): {fix}") from None
        raise ValueError(f"--tracking-uri {tracking_uri} cannot be reached ({first}); start the MLflow "
                         "server, fix the URI, or omit --tracking-uri for a SQLite store in this folder") from None


def first_line(error):
    """An error's first line (at most 300 characters: a longer one loses its middle, since the cause,
    e.g. urllib3's "Connection refused", comes last), or its type's name when it has no text."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 300 else f"{line[:150]} ... {line[-145:]}"


NOT_DATABASES = ("http", "https", "file", "databricks", "databricks-uc", "uc")  # MLflow's other store schemes


def _is_database(tracking_uri):
    """Whether MLflow opens tracking_uri with SQLAlchemy (postgresql://, mysql://, mssql://, ...)."""
    scheme = tracking_uri.split("://", 1)[0].lower() if "://" in tracking_uri else ""
    return bool(scheme) and scheme.split("+")[0] not in NOT_DATABASES


def _probe_database(tracking_uri):
    """One connection attempt to a database store (MLflow's own retries it for about 2 minutes);
    ValueError naming the database and the cause."""
    try:
        url = sqlalchemy.engine.make_url(tracking_uri)
    except sqlalchemy.exc.ArgumentError:
        return  # not a database URL after all: MLflow's own error names it
    timeout = {"connect_timeout": 10} if url.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=timeout)
        with engine.connect():
            pass
    except Exception as error:  # noqa: BLE001  a missing driver, a refused connection, a bad password...
        cause = re.sub(r"^\([\w.]+\) ", "", first_line(error))  # SQLAlchemy's "(psycopg.OperationalError) "
        raise ValueError(f"--tracking-uri {url.render_as_string(hide_password=True)}: the {url.get_backend_name()} "
                         f"database {url.database!r} at {url.host}:{url.port or 'its default port'} cannot be reached "
                         f"({type(error).__name__}: {cause}); start it, fix the URI, or omit --tracking-uri for a "
                         "SQLite store in this folder") from None


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


def _error_text(trial):
    """The end of a Tune trial's error file ("" if it has none)."""
    if trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as f:
            return f.read()[-2000:]
    return ""


class StoreWriteError(RuntimeError):
    """The tracking store stopped taking writes (disk full, read-only file, server gone)."""

    def __init__(self, tracking_uri, error):
        super().__init__(f"the MLflow store {tracking_uri} stopped taking writes ({first_line(error)}). Nothing "
                         "trained is lost: start the server, free space or make the store writable, then run "
                         "the same command again; it resumes from the checkpoints and completes the record")


STORE_ERRORS = (MlflowException, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, OSError,
                requests.exceptions.RequestException)
CATCH_UP_SECONDS = 15  # while the store refuses writes, how often the tracker tries again
PROBE_TIMEOUT_SECONDS = 5


def _writes_store(hook):
    """A Tune hook of the tracker. A store that refuses a write does not end the study: the tracker
    falls behind (each trial's epochs wait in its checkpoints, its end in its outcome file) and
    catches up in a later hook, once the store answers."""
    @functools.wraps(hook)
    def guarded(self, iteration, trials, *args, **kwargs):
        if self.behind_since is not None and not self._catch_up(trials):
            return
        try:
            return hook(self, iteration, trials, *args, **kwargs)
        except STORE_ERRORS as error:
            self._fall_behind(error)
    return guarded


class MlflowTracker(tune.Callback):
    """Tune callback writing a study to MLflow from the driver. `plan` describes each trial
    (StudyPlan: key, levels, seed and resolved config of a Tune trial config)."""

    _restoring_to = None  # (tracking_uri, experiment) while restoring_to() holds

    def __init__(self, plan, tracking_uri, experiment):
        self.plan, self.tracking_uri, self.experiment = plan, tracking_uri, experiment
        self.client = None  # opened by setup(): until then the tracker is plain, picklable data
        self.behind_since = None  # when the store last refused a write and has not caught up since
        self.last_try = 0.0

    @classmethod
    @contextlib.contextmanager
    def restoring_to(cls, tracking_uri, experiment):
        """Trackers unpickled in this block (Tune restores its callbacks with the experiment) write where
        this command says, not where the study's first command did: a moved server, another experiment."""
        cls._restoring_to = (tracking_uri, experiment)
        try:
            yield
        finally:
            cls._restoring_to = None

    def __setstate__(self, state):
        self.__dict__.update(state)
        if MlflowTracker._restoring_to is not None:
            self.tracking_uri, self.experiment = MlflowTracker._restoring_to

    def setup(self, **info):
        """Tune's hook at the start of every fit: open the store and read what is recorded."""
        try:
            self.open()
        except STORE_ERRORS as error:
            self._fall_behind(error)

    def _fall_behind(self, error):
        if self.behind_since is None:
            print(f"[study] the MLflow store {self.tracking_uri} stopped taking writes ({first_line(error)}); the "
                  "study goes on, and its record is completed once the store answers", flush=True)
            self.behind_since = time.monotonic()
        self.last_try = time.monotonic()

    def _catch_up(self, trials):
        """Whether the record caught up with Tune's trials (tried at most every CATCH_UP_SECONDS)."""
        if time.monotonic() - self.last_try < CATCH_UP_SECONDS:
            return False
        self.last_try = time.monotonic()
        try:
            with without_retries(PROBE_TIMEOUT_SECONDS):
                StoreClient(self.tracking_uri)  # a store still down refuses here, at once
            self.open()
            for trial in trials:
                if trial.status != Trial.PENDING:
                    self._record_tune_trial(trial)
        except STORE_ERRORS:
            return False
        minutes = (time.monotonic() - self.behind_since) / 60
        print(f"[study] the MLflow store {self.tracking_uri} takes writes again after {minutes:.1f} min: the "
              "record is caught up", flush=True)
        self.behind_since = None
        return True

    def open(self):
        """Find or create the experiment and this study's parent run; load its children, complete any
        that a failed write left half-made, and log every epoch their checkpoints hold that MLflow lacks."""
        self.client = StoreClient(self.tracking_uri)
        self.provenance = provenance_tags()
        self.parent_id = None
        self.runs = {}  # trial key -> RunWriter
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
            RunWriter(self.client, self.parent_id, "").log_batch(params=self.plan.study_params())
        children = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                                           max_results=10000)
        for run in children:
            key = run.data.tags.get(TRIAL_KEY_TAG)
            self.runs[key] = RunWriter.found(self.client, run, self._folder(key))
            self.runs[key].backfill()
        recorded = [({k[len("factor."):]: v for k, v in run.data.tags.items() if k.startswith("factor.")},
                     int(run.data.tags.get("nvae.seed", 0))) for run in children]
        RunWriter(self.client, self.parent_id, "").log_batch(tags=self.plan.extent_tags(recorded))
        configs = {t.key: t.config for t in self.plan.trials} if not self.plan.is_search else {}
        for key, writer in sorted(self.runs.items()):  # a search's trial is completed when it reports
            if not writer.complete and key in configs:
                writer.log_config(configs[key], self.plan.option_params(), skipped=self.plan.options.skip_files)
        return self

    def _folder(self, key):
        return f"{self.plan.trials_path}/{key}"

    def _child(self, trial):
        """The RunWriter of a Tune trial's child run, created (and completed) as needed."""
        return self._child_of(trial.config, trial.trial_id)

    def _child_of(self, config, trial_id):
        key = self.plan.key_for(config, trial_id)
        writer = self.runs.get(key)
        if writer is not None and writer.complete:
            return writer
        levels, seed, cfg = self.plan.describe_config(config)
        if writer is None:
            tags = {PARENT_TAG: self.parent_id, TRIAL_KEY_TAG: key, "nvae.seed": seed, STATUS_TAG: "running",
                    **({"nvae.tune_trial_id": trial_id} if trial_id else {}),  # none: ended in an earlier invocation
                    **{f"factor.{k}": v for k, v in levels.items()}, **self.provenance}
            # A tracking server takes string tags only (a SQLite store converts them itself).
            run = self.client.create_run(self.experiment_id, run_name=key, tags={k: str(v) for k, v in tags.items()})
            writer = self.runs[key] = RunWriter(self.client, run.info.run_id, self._folder(key))
        writer.log_config(cfg, self.plan.option_params(), skipped=self.plan.options.skip_files)
        return writer

    def _record_tune_trial(self, trial):
        """Bring a started trial's child run up to date: its checkpointed epochs, and its end if it ended."""
        if trial.status == Trial.ERROR:
            self._update(self._child(trial), trial.last_result, "failed", _error_text(trial))
        else:
            ended = status_of(trial.last_result, "TERMINATED") if trial.status == Trial.TERMINATED else None
            self._update(self._child(trial), trial.last_result, ended)

    def record_result(self, result):
        """Make sure a trial of the study's results has its child run, with its checkpointed epochs and,
        when Tune saw it fail, its failure (close() then ends it from its outcome file): a trial that
        started and ended while the store refused writes is recorded here."""
        trial_id = (result.metrics or {}).get("trial_id")
        if self.plan.is_search and not trial_id:
            return  # a search's trial that never reported cannot be named
        failed = (result.error is not None
                  and read_outcome(self.plan.trials_path, self.plan.key_for(result.config, trial_id)) is None)
        self._update(self._child_of(result.config, trial_id), result.metrics, "failed" if failed else None,
                     str(result.error)[-2000:])

    @staticmethod
    def _update(writer, result, status, error=""):
        """An open child run's checkpointed epochs back-filled, and its end written when status is given."""
        if writer.closed:
            return
        writer.backfill()
        if status:
            writer.finish(result or {}, status, error)

    def on_step_begin(self, iteration, trials, **info):
        if self.behind_since is not None:  # catch up between epochs too, not only when a trial reports
            self._catch_up(trials)

    @_writes_store
    def on_trial_start(self, iteration, trials, trial, **info):
        writer = self._child(trial)
        if writer.failed and read_outcome(self.plan.trials_path, self.plan.key_of(trial)) is None:
            writer.reopen()  # a trial that errored (its process lost, its storage gone), resumed by a rerun
        elif not writer.closed:
            self.client.update_run(writer.run_id, status="RUNNING")

    @_writes_store
    def on_trial_result(self, iteration, trials, trial, result, **info):
        writer = self._child(trial)
        if not writer.closed:
            fault_injection.kill_driver_before_recording(self.plan.key_of(trial), result.get("epoch"))
            writer.log_epoch(result)

    @_writes_store
    def on_trial_complete(self, iteration, trials, trial, **info):
        writer = self._child(trial)
        if not writer.closed:
            result = trial.last_result or {}
            writer.finish(result, status_of(result, "TERMINATED"))

    @_writes_store
    def on_trial_error(self, iteration, trials, trial, **info):
        writer = self._child(trial)
        if not writer.closed:
            writer.finish(trial.last_result or {}, "failed", _error_text(trial))

    def tag_verdicts(self, verdicts, looks=1):
        """Tag the parent run with each finding's verdict ({name: verdict}): nvae.finding.<name>, and
        the looks they were judged at (nvae.findings.looks: a report judges at the same level)."""
        for name, verdict in verdicts.items():
            self.client.set_tag(self.parent_id, f"{FINDING_TAG}.{name}", verdict)
        if verdicts:
            self.client.set_tag(self.parent_id, LOOKS_TAG, str(looks))

    @property
    def interrupted(self):
        """Whether some trial of this invocation's plan has no terminal record yet."""
        if self.plan.is_search:
            return sum(w.closed for w in self.runs.values()) < self.plan.trial_count
        return not all(t.key in self.runs and self.runs[t.key].closed for t in self.plan.trials)

    def close(self):
        """End every child still open (from its outcome file if the trial ended while no driver
        listened, else KILLED), then the parent: KILLED if the study was interrupted."""
        for key, writer in self.runs.items():
            if writer.closed:
                continue
            outcome = read_outcome(self.plan.trials_path, key)
            if outcome is not None:  # it ended while no driver listened
                writer.finish(outcome, status_of(outcome, "TERMINATED"))
                print(f"[study] {key}: {outcome.get('status')} (recorded from its outcome file)", flush=True)
            else:
                writer.interrupt()
        self.client.set_terminated(self.parent_id, "KILLED" if self.interrupted else "FINISHED")


