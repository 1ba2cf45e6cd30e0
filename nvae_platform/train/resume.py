"""Where a run resumes: the newest checkpoint that loads completely, never a damaged one.

A checkpoint cut short (a full disk, a killed upload) or a checkpoint folder deleted by hand must not
end a run for good. Before a run starts, the driver checks its checkpoints from the newest down: a
damaged one is set aside (moved to damaged_<name>, on an object store too; never deleted) and named in the output, and the run
resumes from the newest good one. Ray Train's own record of the run's checkpoints is then deleted,
since it may name the damaged or missing one (Ray refuses to start on such a record), and the
workers restore from the chosen checkpoint instead.
"""
import pyarrow.fs
import torch

from nvae_platform.ray_internals import TRAIN_SNAPSHOT_FILE
from nvae_platform.storage import open_storage
from nvae_platform.train.checkpoints import CHECKPOINT_FILE, epoch_checkpoints, is_file, move_folder

DAMAGED_PREFIX = "damaged_"


def damage(checkpoint_path):
    """Why a checkpoint's state cannot be loaded, or None when it loads (a truncated file has no
    zip directory at its end, so mapping it fails without reading it all)."""
    filesystem, path = open_storage(f"{checkpoint_path}/{CHECKPOINT_FILE}")
    if not is_file(filesystem, path):
        return f"no {CHECKPOINT_FILE}"
    if not isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return None  # an object store writes whole files or none
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001  whatever the reason, this checkpoint cannot resume the run
        return f"{type(error).__name__}: {str(error)[:200]}"
    return None


def choose_resume(run_folder, say=print):
    """(the newest checkpoint path that loads, or "" for none; the folders set aside). Deletes Ray's
    record of the run's checkpoints whenever one is set aside or missing."""
    checkpoints = epoch_checkpoints(run_folder)
    set_aside = []
    for checkpoint in reversed(checkpoints):
        reason = damage(checkpoint.path)
        if reason is None:
            break
        filesystem, path = open_storage(checkpoint.path)
        head, name = path.rstrip("/").rsplit("/", 1)
        move_folder(filesystem, path, f"{head}/{DAMAGED_PREFIX}{name}")
        set_aside.append(f"{DAMAGED_PREFIX}{name}")
        say(f"[nvae] checkpoint {name} (epoch {checkpoint.epoch + 1}) is damaged ({reason}); set aside as "
            f"{DAMAGED_PREFIX}{name}")
    good = [c for c in checkpoints if f"{DAMAGED_PREFIX}{c.path.rstrip('/').rsplit('/', 1)[1]}" not in set_aside]
    filesystem, snapshot = open_storage(f"{run_folder}/{TRAIN_SNAPSHOT_FILE}")
    if is_file(filesystem, snapshot):
        filesystem.delete_file(snapshot)  # the checkpoints on storage, checked here, are the record
    if good and set_aside:
        say(f"[nvae] resuming from epoch {good[-1].epoch + 1}, the newest checkpoint that loads")
    return (good[-1].path if good else ""), set_aside
