"""The MLflow store opened safely by many processes at once (studies and training runs started
together in one folder share ./mlflow.db).

MLflow creates and migrates a new SQLite store's schema on first use, with no lock: two processes
doing it at once fail ("duplicate column name: step"). Here the first use of a SQLite store happens
under an inter-process lock on its folder, every call that meets SQLite's "database is locked" is
retried, and an experiment created by another process at the same moment is found, not an error.
"""
import contextlib
import fcntl
import os
import threading
import time

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

LOCK_RETRIES = 8  # 0.1 s doubling: about 25 s in all before the error is raised


def sqlite_path(tracking_uri):
    """The database file of a sqlite:/// URI, else None."""
    return tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(tracking_uri):
    """Hold an exclusive inter-process lock on a SQLite store's folder (nothing for other stores)."""
    path = sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _locked(error):
    return "database is locked" in str(error)


class StoreClient:
    """An MlflowClient whose calls are retried while SQLite reports "database is locked" (a failed
    call's transaction was rolled back, so a retry is safe)."""

    def __init__(self, tracking_uri):
        with store_lock(tracking_uri):  # MlflowClient creates or migrates the store as it is built
            self.client = MlflowClient(tracking_uri)
            self.client.search_experiments(max_results=1)

    def __getattr__(self, name):
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            for attempt in range(LOCK_RETRIES - 1):
                try:
                    return method(*args, **kwargs)
                except Exception as error:  # MLflow wraps SQLAlchemy's OperationalError in several types
                    if not _locked(error):
                        raise
                time.sleep(0.1 * 2 ** attempt)
            return method(*args, **kwargs)

        return call


@contextlib.contextmanager
def without_retries(timeout_seconds=30):
    """MLflow's HTTP calls in this block are tried once, with this read timeout: a server that is down
    refuses at once, instead of after MLflow's retries (about 2 minutes)."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_seconds))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def open_in_background(tracking_uri):
    """Start opening the store in a thread and return it (join it before the store is used). MLflow
    keeps the opened store for the process, so the next StoreClient is immediate: creating a new
    SQLite store's schema takes about 2 s, which can overlap a local Ray's start. An error is left for
    that next StoreClient to raise and report."""
    def open_store():
        with contextlib.suppress(Exception):
            StoreClient(tracking_uri)

    thread = threading.Thread(target=open_store, name="open-mlflow-store", daemon=True)
    thread.start()
    return thread


def experiment_id(client, name, artifact_location=None):
    """The id of experiment `name`, created if missing; one created meanwhile by another process is
    found rather than an error."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise error from None
        return found.experiment_id
