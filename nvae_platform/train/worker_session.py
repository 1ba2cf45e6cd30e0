"""Where the training loop reports its epochs: Ray Train's session, or a study trial's own process.

A Ray Train worker reports through ray.train: the controller uploads each epoch's checkpoint folder
to `<run folder>/checkpoint_<time>/` and restarts the worker group from the latest one after a
failure. A one-worker trial of a study on a local Ray needs none of that machinery (a controller
and a worker actor, each a Python process importing torch, for every trial), so it trains in the
trial's own process: TrialSession writes the same checkpoint folders itself, and the trial resumes
from them as an interrupted Train run does (resume.py).
"""
import os
import platform
import time

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch

from nvae_platform.storage import open_storage
from nvae_platform.train.checkpoints import CHECKPOINT_PREFIX, METRICS_FILE, epoch_checkpoints


class RayTrainSession:
    """The worker of a Ray Train run."""

    def device(self):
        return ray.train.torch.get_device()

    def node(self):
        return ray.get_runtime_context().get_node_id()

    def latest_checkpoint(self):
        """This fit's latest checkpoint (a ray.train.Checkpoint) after a worker-group restart, else None."""
        return ray.train.get_checkpoint()

    def report(self, metrics, folder=None):
        """Report an epoch; folder (rank 0's, or None) is uploaded as its checkpoint."""
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    def wait_committed(self):
        """Return once every reported checkpoint is on storage: a worker lost from here on costs at most
        the epoch in flight (reports are otherwise registered asynchronously)."""
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


class TrialSession:
    """One worker in a study trial's own process: checkpoints are written to the run folder directly and
    each epoch's metrics go to on_report (Tune's report)."""

    def __init__(self, options, on_report):
        self.options, self.on_report = options, on_report

    def device(self):
        return torch.device("cuda", 0) if self.options.gpus_per_worker > 0 else torch.device("cpu")

    def node(self):
        """The Ray node, or the host when no Ray runs (a test or a notebook training in-process)."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else platform.node()

    def latest_checkpoint(self):
        return None  # a retry starts over in run_trial, which chooses the checkpoint (options.resume_checkpoint)

    def report(self, metrics, folder=None):
        if folder is not None:
            self._store(folder)
        self.on_report(metrics)

    def wait_committed(self):
        pass  # _store returns once the checkpoint is on storage

    def _store(self, folder):
        """Copy folder to <run folder>/checkpoint_<UTC time> (Ray Train's names: the newest sorts last),
        its metrics file last, since only a folder with one counts as a checkpoint (a copy cut short is
        never taken for one); then keep the newest options.checkpoints_to_keep (0: all)."""
        run_folder = self.options.run_folder
        filesystem, base = open_storage(run_folder)
        now = time.time()
        target = f"{base}/{CHECKPOINT_PREFIX}{time.strftime('%Y-%m-%d_%H-%M-%S', time.gmtime(now))}.{int(now * 1e6) % 1_000_000:06d}"
        filesystem.create_dir(target, recursive=True)
        local = pyarrow.fs.LocalFileSystem()
        for name in sorted(os.listdir(folder), key=lambda n: n == METRICS_FILE):
            pyarrow.fs.copy_files(os.path.join(folder, name), f"{target}/{name}", source_filesystem=local,
                                  destination_filesystem=filesystem)
        keep = self.options.checkpoints_to_keep
        if keep:
            for old in epoch_checkpoints(run_folder)[:-keep]:
                filesystem.delete_dir(open_storage(old.path)[1])
