"""A run's checkpoints in its storage folder (a local folder or a URI such as s3://).

Ray Train writes one folder per reported epoch, `<run folder>/checkpoint_<time>/`; rank 0 puts in it
the training state (state.pt: model, optimizer, step, epoch, RNG states and the NVAEConfig) and the
metrics reported with it (metrics.json). So the storage alone says which epochs exist and what they
measured: the MLflow record is reconciled against it after any crash.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import pyarrow.fs
import torch

from nvae_platform.storage import open_storage

CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.png"
CHECKPOINT_PREFIX = "checkpoint_"
STAGING_PREFIX = ".staging_"


def staging_folder(run_folder):
    """A new folder to stage a checkpoint in before it is reported (a TemporaryDirectory: deleted on
    leaving its block): inside a local run folder, so that a process killed while it stages leaves no
    full checkpoint in the machine's temp folder (remove_staging_leftovers clears it at the next
    attempt); in the temp folder for a run on an object store."""
    if "://" in run_folder:
        return tempfile.TemporaryDirectory()
    os.makedirs(run_folder, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=run_folder, prefix=STAGING_PREFIX)


def remove_staging_leftovers(run_folder):
    """Delete the staging folders that killed processes left in a local run folder."""
    if "://" not in run_folder and os.path.isdir(run_folder):
        for name in os.listdir(run_folder):
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(os.path.join(run_folder, name), ignore_errors=True)


@dataclass
class EpochCheckpoint:
    epoch: int
    path: str  # the checkpoint folder, in the storage's own terms (a URI stays a URI)
    metrics: dict  # what the epoch reported


def _join(root, name):
    return f"{root.rstrip('/')}/{name}"


def is_file(filesystem, path):
    """Whether path is a file on filesystem."""
    return filesystem.get_file_info(path).type == pyarrow.fs.FileType.File


def move_folder(filesystem, source, destination):
    """Move a folder on a pyarrow filesystem: renamed where folders exist (local), else each file copied,
    then the originals deleted (an object store's move takes single objects only; a copy cut short
    leaves the source whole, and moving it again completes it)."""
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        filesystem.move(source, destination)
        return
    source, destination = source.rstrip("/"), destination.rstrip("/")
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(source, recursive=True)):
        if info.type == pyarrow.fs.FileType.File:
            filesystem.copy_file(info.path, destination + info.path[len(source):])
    filesystem.delete_dir(source)


def fetch_file(path, folder):
    """Copy a file (a local path or a URI such as s3://...) into folder; return its local path."""
    filesystem, inner = open_storage(path)
    local = os.path.join(folder, os.path.basename(inner))
    pyarrow.fs.copy_files(inner, local, source_filesystem=filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def read_state(checkpoint_path, map_location="cpu"):
    """A checkpoint's state.pt, fetched into a temporary folder first when it is not local."""
    filesystem, path = open_storage(f"{checkpoint_path.rstrip('/')}/{CHECKPOINT_FILE}")
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return torch.load(path, map_location=map_location, weights_only=False)
    with tempfile.TemporaryDirectory() as folder:
        return torch.load(fetch_file(f"{checkpoint_path.rstrip('/')}/{CHECKPOINT_FILE}", folder),
                          map_location=map_location, weights_only=False)


def epoch_checkpoints(run_folder, skip=()):
    """The run's checkpoints that carry their metrics, one per epoch (the newest folder wins when an
    epoch was written twice), by epoch; [] when the folder does not exist. Folders named in skip are
    not read (a caller that polls has read them already)."""
    filesystem, base = open_storage(run_folder)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    names = sorted(e.base_name for e in entries
                   if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX))
    by_epoch = {}
    for name in names:  # names sort by time, so a later folder of the same epoch replaces an earlier one
        if name in skip:
            continue
        try:
            with filesystem.open_input_stream(_join(base, f"{name}/{METRICS_FILE}")) as f:
                metrics = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            continue  # an upload cut short, or a checkpoint from before metrics were stored
        if isinstance(metrics.get("epoch"), int):
            by_epoch[metrics["epoch"]] = EpochCheckpoint(metrics["epoch"], _join(run_folder, name), metrics)
    return [by_epoch[e] for e in sorted(by_epoch)]


def storage_uri(path, filesystem):
    """A Ray path and its pyarrow filesystem as a local path or a URI (Ray's .path drops s3:// and gs://)."""
    if filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return path
    return f"{filesystem.type_name}://{path}"


def checkpoint_uri(checkpoint):
    """Where a Ray Checkpoint is, as a local path or a URI."""
    return storage_uri(checkpoint.path, checkpoint.filesystem)


def storage_file_exists(path):
    """Whether a file exists at a local path or URI."""
    filesystem, base = open_storage(path)
    return filesystem.get_file_info(base).type == pyarrow.fs.FileType.File
