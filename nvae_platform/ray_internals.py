"""What the platform takes from Ray's non-public modules, for want of a public way.

tests/test_ray_internals.py fails loudly, naming the symbol, when an upgrade of Ray moves one.
"""
import sys

import ray._private.services
import ray._private.utils
import ray._private.worker
from ray._private import ray_constants
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

# Ray Train's record of a run's checkpoints, in the run folder. A resume that sets a damaged
# checkpoint aside deletes it: Ray refuses to start while it names a checkpoint that is gone.
TRAIN_SNAPSHOT_FILE = CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def print_ray_output_with(printer):
    """A driver prints what Ray's processes print (their stdout and stderr, forwarded when
    ray.init's log_to_driver is on) and the errors the cluster publishes (a raylet's warning, a
    worker killed for memory) through ray._private.worker.print_to_stdstream(data, ignore_prefix);
    printer(data, ignore_prefix) takes its place. data is Ray's batch: a dict of pid, actor_name,
    task_name, is_err and lines. Call it before ray.init, which binds the printer of forwarded output."""
    ray._private.worker.print_to_stdstream = printer


def start_local_ray_in_own_session():
    """Start the processes of a local Ray (GCS, raylet, monitors; the raylet's workers follow it) in
    a session of their own, as Ray already does on Windows: a signal to the driver's process group
    (`timeout`, `kill -TERM -PGID`) then reaches the driver alone, which stops Ray
    itself, instead of killing the GCS under it. They still die with the driver (Ray's kernel
    fate-sharing, checked here: without it Ray's reaper relies on the process group). Call it
    before ray.init."""
    if not sys.platform.startswith("linux") or not ray._private.utils.detect_fate_sharing_support():
        return
    popen = ray._private.services.ConsolePopen
    if getattr(popen, "own_session", False):
        return

    class OwnSessionPopen(popen):
        own_session = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, start_new_session=True, **kwargs)

    ray._private.services.ConsolePopen = OwnSessionPopen


def local_ray_processes():
    """{"gcs_server" / "raylet": subprocess.Popen} of the local Ray this process started (ray.init
    without an address); empty when it joined a cluster."""
    node = ray._private.worker._global_node
    if node is None:
        return {}
    return {kind: info.process for kind in (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET)
            for info in node.all_processes.get(kind, [])[:1]}
