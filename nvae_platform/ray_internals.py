"""The only two things the platform takes from Ray's non-public modules, for want of a public way.

tests/test_ray_internals.py fails loudly, naming the symbol, when an upgrade of Ray moves one.
"""
import ray._private.worker
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

