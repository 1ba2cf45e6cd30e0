"""Deterministic failures end a run at once instead of being retried.

Ray Train restarts a worker group after any exception, which is right for a lost worker or node and
wasted on a bad dataset or config: those fail the same way every time, `max_failures` times over.
So the rank that meets one writes it beside the run's checkpoints (failure.json: the reason and the
traceback) before raising; every later attempt Ray Train makes reads it and ends at once with the
status "failed: <reason>". The driver clears it before the next run, so a rerun after a fix trains.
"""
import json
import os
import re
import traceback

from PIL import UnidentifiedImageError

from nvae_core import ConfigError
from nvae_core.data_check import BadDataError
from nvae_core.datasets import DatasetNotFoundError
from nvae_platform.storage import open_storage
from nvae_platform.train.checkpoints import is_file

FAILURE_FILE = "failure.json"
DETERMINISTIC = (ConfigError, DatasetNotFoundError, BadDataError, UnidentifiedImageError)
UNREADABLE_IMAGE = ("image file is truncated", "cannot identify image file")  # PIL's OSError texts
NO_SPACE = "No space left on device"


def _storage_words(whose):
    """How a line names the storage of a run or of a study: "the run's storage "."""
    return f"the {whose}'s storage "


_STORAGE = _storage_words("run")
_UNREACHABLE = re.compile(r"AWS Error NETWORK_CONNECTION[^;\n]*")  # pyarrow's S3: refused, timed out, no such host
_ADDRESS = re.compile(r"Failed to connect to (\S+) port (\d+)")  # curl's words in it
_ERROR_LINE = re.compile(r"^\s*[\w.]+(Error|Exception)\b.*")


def is_deterministic(error):
    """Whether the error fails again on a retry: bad data or config (not a lost worker or node)."""
    if isinstance(error, DETERMINISTIC):
        return True
    return isinstance(error, OSError) and any(text in str(error) for text in UNREADABLE_IMAGE)


def reason(error, storage="", whose="run"):
    """One line for an error Ray Train reports with its workers' tracebacks inside: the last
    exception line, and for a full or unreachable storage (storage: the run's folder; whose: "run",
    or "study" for a study's folder) what to do."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    lines = [line.strip() for line in text.splitlines() if _ERROR_LINE.match(line)]
    last = lines[-1] if lines else ([line.strip() for line in text.splitlines() if line.strip()] or ["unknown error"])[-1]
    if last.endswith(":"):  # e.g. Ray's "Training failed due to controller error:": the cause follows
        after = text[text.rindex(last) + len(last):] if last in text else ""
        cause = next((line.strip() for line in after.splitlines() if line.strip()), "")
        last = f"{last} {cause}" if cause else last
    if _STORAGE in last:  # already this function's line (a study's view reads the status again)
        return last[last.index(_STORAGE):]
    named_storage = _storage_words(whose)
    if NO_SPACE in text:
        return (f"{named_storage}is full ({last}); free space and run the same command: it resumes "
                "from the newest whole checkpoint")
    unreachable = _UNREACHABLE.findall(text)
    if unreachable:
        address = _ADDRESS.findall(text)
        endpoint = ":".join(address[-1]) if address else os.environ.get("AWS_ENDPOINT_URL", "")
        named = [storage.split("?")[0], f"at {endpoint}" if endpoint else "", "cannot be reached"]
        return (f"{named_storage}{' '.join(filter(None, named))} ({unreachable[-1].strip()}); once it answers, run "
                "the same command: it resumes from the newest checkpoint")
    return last


class StorageError(RuntimeError):
    """A run stopped by its storage (full, or not reachable): not the run's result, and a rerun resumes it."""


def is_storage_failure(status):
    """Whether a run's status says its storage stopped it (see reason)."""
    return status.startswith(f"failed: {_STORAGE}")


def storage_stopped(error, storage, whose="run"):
    """reason's line when error is the storage's (full, or not reachable), else None."""
    line = reason(error, storage, whose)
    return line if line.startswith(_storage_words(whose)) else None


def _location(run_folder):
    return open_storage(f"{str(run_folder).rstrip('/')}/{FAILURE_FILE}")


def write_failure(run_folder, error):
    """Record a deterministic error of this run (called while handling it); returns the record."""
    record = {"status": f"failed: {type(error).__name__}: {str(error)[:500]}", "traceback": traceback.format_exc()}
    filesystem, path = _location(run_folder)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps(record).encode())
    return record


def read_failure(run_folder):
    """The run's recorded deterministic failure, or None."""
    filesystem, path = _location(run_folder)
    try:
        with filesystem.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def clear_failure(run_folder):
    """Forget a recorded failure: the next attempt trains (the data or config may have been fixed)."""
    filesystem, path = _location(run_folder)
    if is_file(filesystem, path):
        filesystem.delete_file(path)
