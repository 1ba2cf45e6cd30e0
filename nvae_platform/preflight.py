"""The front door: the checks every command (studies/train.py, every study script) runs before Ray
starts, so that bad input costs seconds and records nothing.

- numbers in range, as argparse types (`at_least`), so the error names the flag; NAME=VALUE flags
  (`parse_pairs`, `parse_value`);
- names are labels, never paths (`label`: no '/', '..', nothing a file system or MLflow cannot hold);
- storage writable, by writing and deleting a probe file of its own name (a folder or s3:// gs://);
- one invocation at a time in a study's or run's folder (folder_lock.py);
- the tracking store takes a write (tracking.check_tracking_uri);
- the data is there (nvae_core.datasets.check_available, through RunOptions.validate);
- the resources exist: a local Ray cannot grow, so a run it could never schedule is refused before
  it starts; a cluster may autoscale, so there it is a warning.

Every failure is one line naming the flag, the problem and the fix, and exit code 2
(`CommandLine.error`).
"""
import argparse
import math
import os
import re
import sys

from nvae_platform.folder_lock import unique_name
from nvae_platform.storage import StorageSettingError, open_storage


class CommandLine(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, `prog: error: message`, with exit code 2
    (argparse would print the whole usage first; --help still shows it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def at_least(minimum, kind=int, strictly=False, note=""):
    """An argparse type: a number of `kind` >= minimum (> minimum with strictly), else an error
    naming the value and what is allowed (argparse adds the flag)."""
    name = "an integer" if kind is int else "a number"
    allowed = f"{name} {'>' if strictly else '>='} {minimum:g}{note}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if math.isnan(value) or value < minimum or (strictly and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} is not allowed: expected {allowed}")
        return value

    parse.__name__ = name  # argparse names the type in "invalid <type> value" messages
    return parse


def parse_value(text):
    """'3' -> 3, '0.1' -> 0.1, 'true' -> True, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_pairs(parser, items, flag):
    """{NAME: VALUE} of repeated NAME=VALUE flags; a malformed one is a parser error naming flag."""
    pairs = {}
    for item in items:
        if "=" not in item:
            parser.error(f"{flag} {item!r}: expected NAME=VALUE")
        key, value = item.split("=", 1)
        pairs[key] = value
    return pairs


# --max-failures of train.py and the studies.
FAILURE_COUNT = at_least(0, note="; Ray's -1 (unlimited) is refused: a failure that repeats would be retried forever")


LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,=+@-]{0,199}")


def label_error(text):
    """Why text cannot be a name (a run's, a study's, an MLflow experiment's), or None. A name is a
    label, never a path: it becomes a folder under the storage and an MLflow name."""
    if not text:
        return "an empty name is not allowed"
    if "/" in text or "\\" in text or ".." in text:
        return f"{text!r} is a path, not a name: no '/', '\\' or '..'"
    if not LABEL.fullmatch(text):
        return (f"{text!r} is not allowed: expected up to 200 letters, digits and _ . , = + @ -, "
                "starting with a letter or digit")
    return None


def label(text):
    """An argparse type: a name (see label_error)."""
    error = label_error(text)
    if error:
        raise argparse.ArgumentTypeError(error)
    return text


label.__name__ = "name"


def check_storage(storage_path, flag="--storage-path"):
    """Raise ValueError unless the storage root can be created and written (a probe file is
    written and deleted)."""
    try:
        filesystem, path = open_storage(storage_path)
        filesystem.create_dir(path, recursive=True)
        probe = f"{path}/{unique_name('.write-probe')}"  # two commands at once probe different files
        with filesystem.open_output_stream(probe) as f:
            f.write(b"ok")
        filesystem.delete_file(probe)
    except StorageSettingError:
        raise  # not the folder's fault: its own line
    except Exception as error:  # noqa: BLE001  pyarrow raises OSError, ArrowInvalid, ... for the same causes
        raise ValueError(f"{flag} {storage_path} is not writable ({error}); choose a folder you can "
                         "write (e.g. --storage-path ~/nvae-runs) or a reachable s3:// / gs:// URI") from None


def local_resources(num_cpus=None):
    """What a local Ray started by this process would have: {"CPU": n, "GPU": n}."""
    import torch

    cpus = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return {"CPU": cpus, "GPU": torch.cuda.device_count()}


def check_resources(workers, cpus_per_worker, gpus_per_worker, have, workers_flag, on_cluster=False,
                    where="this machine"):
    """Refuse a run that `have` ({"CPU", "GPU"}) can never hold when nothing can grow; on a cluster
    print that it will wait for the autoscaler instead. GPUs are checked first. Returns the
    resources one run needs."""
    need = {"GPU": workers * gpus_per_worker, "CPU": workers * cpus_per_worker}
    for kind, amount in need.items():
        if amount <= have.get(kind, 0):
            continue
        message = (f"one run needs {amount:g} {kind}(s) ({workers} worker(s) x {amount / workers:g}) and "
                   f"{where} has {have.get(kind, 0):g}")
        if on_cluster:
            print(f"[nvae] warning: {message}; it waits until the autoscaler adds {kind}s", file=sys.stderr,
                  flush=True)
            continue
        per_worker = f"--{kind.lower()}s-per-worker"
        if kind == "GPU" and not have.get("GPU") and where == "this machine":
            raise ValueError(f"{workers_flag} x {per_worker}: this machine has no GPU: use --scale smoke here, or join "
                             f"a GPU cluster with --address (one run needs {amount:g} GPU(s); --gpus-per-worker 0 "
                             "trains on CPUs)")
        hint = ("add --gpus-per-worker 0 to train on CPUs" if kind == "GPU"
                else f"lower {workers_flag} or --cpus-per-worker")
        raise ValueError(f"{workers_flag} x {per_worker}: {message}: {hint}, or --address to join a larger cluster")
    return need


def check_local_resources(workers, cpus_per_worker, gpus_per_worker, num_cpus, workers_flag):
    """check_resources against the local Ray this command would start (of --num-cpus CPUs)."""
    where = f"a local Ray of --num-cpus {num_cpus}" if num_cpus else "this machine"
    return check_resources(workers, cpus_per_worker, gpus_per_worker, local_resources(num_cpus), workers_flag,
                           where=where)
