"""A full disk (a real tmpfs of a few MiB as the storage path): the run stops with a clear error, the
checkpoints written before stay whole, and after space is freed the same run resumes from them."""
import os
import subprocess
import uuid

import pytest

from nvae_platform.train.checkpoints import epoch_checkpoints
from nvae_platform.train.resume import damage
from nvae_platform.train.run import run_training
from nvae_platform.train.scales import run_config, run_options

pytestmark = pytest.mark.slow  # the whole module starts Ray, servers or commands


def _mount(folder, size):
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)


def _resize(folder, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def _used(folder):
    stats = os.statvfs(folder)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (root can mount one here; CI runs as root on the same kind of machine)."""
    folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    mounted = _mount(folder, "64m")
    if mounted.returncode != 0:
        pytest.skip(f"this machine cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_stops_the_run_clearly_and_keeps_the_earlier_checkpoints(local_ray, small_disk):
    options = run_options("digits", "smoke", workers=1, storage_path=str(small_disk), name="run", max_failures=1)
    assert run_training(run_config("digits", "smoke", epochs=2), options).status == "finished"
    checkpoints = epoch_checkpoints(str(small_disk / "run"))
    assert [c.epoch for c in checkpoints] == [0, 1]
    used = _used(small_disk)
    _resize(small_disk, used + used // 8)  # room for a fraction of one more checkpoint

    stopped = run_training(run_config("digits", "smoke", epochs=4), options)
    assert stopped.status.startswith("failed: the run's storage is full") and "\n" not in stopped.status
    assert "No space left on device" in stopped.status and "No space" in stopped.metrics["traceback"]
    after = epoch_checkpoints(str(small_disk / "run"))
    assert after[:2] == checkpoints and all(damage(c.path) is None for c in checkpoints)  # whole
    cut_short = [c.path for c in after[2:]]  # epoch 2's upload, if it began: its state cannot load
    assert len(cut_short) <= 1 and all(damage(path) is not None for path in cut_short), stopped.status

    _resize(small_disk, "64m")  # space freed: the same command resumes from epoch 2
    resumed = run_training(run_config("digits", "smoke", epochs=4), options)
    assert resumed.status == "finished"
    assert [m["epoch"] for m in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[2]["start_epoch"] == 2
    assert resumed.metrics.get("set_aside_checkpoints", "") == ",".join(
        f"damaged_{os.path.basename(path)}" for path in cut_short)
