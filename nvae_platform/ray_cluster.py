"""The Ray a command runs on: the cluster it joins (an address, $RAY_ADDRESS, or `ray start` on this
machine), else a local Ray it starts and stops."""
import atexit
import contextlib
import os
import signal
import sys
import threading

import ray

from nvae_platform.preflight import at_least, check_local_resources, check_resources
from nvae_platform.process_exit import stopped_by_signal
from nvae_platform.ray_internals import local_ray_processes, start_local_ray_in_own_session


def find_cluster(address=None):
    """The Ray cluster ray.init(address) joins, found without contacting it or starting Ray, by the
    order Ray documents (ray.init; "Starting Ray"): address; for none or "auto", $RAY_ADDRESS, else
    the latest cluster `ray start` started on this machine. None when ray.init would start a local
    Ray ("local", or none of these). Raises ConnectionError for "auto" when there is no cluster
    (where ray.init would still join a Ray another process started with ray.init, this refuses)."""
    if address not in (None, "auto"):
        return None if address == "local" else address
    found = os.environ.get("RAY_ADDRESS") or ray_start_address()
    if found is None and address == "auto":
        raise ConnectionError("no running Ray cluster was found on this machine")
    return None if found == "local" else found


def ray_start_address():
    """The address `ray start` last wrote on this machine (and removes on `ray stop`), or None: the
    file ray_current_cluster in Ray's temp folder, which ray.init's documentation names
    (/tmp/ray/ray_current_cluster; $RAY_TMPDIR, on Linux else $TMPDIR, in place of /tmp).
    tests/test_ray_internals.py checks this path against Ray's own."""
    if "RAY_TMPDIR" in os.environ:
        temp = os.environ["RAY_TMPDIR"]
    else:
        temp = os.environ.get("TMPDIR", "/tmp") if sys.platform.startswith("linux") else "/tmp"
    try:
        with open(os.path.join(temp, "ray", "ray_current_cluster")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def add_ray_arguments(parser):
    """--address and --num-cpus, the flags of every command that runs on Ray."""
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a cluster started on "
                                          "this machine with `ray start`, else a new local Ray)")
    parser.add_argument("--num-cpus", type=at_least(1), help="CPUs of a new local Ray (default: all)")


def cluster_address(address=None, num_cpus=None):
    """The Ray cluster a command joins: address, else $RAY_ADDRESS (set inside a Ray job), else a
    cluster started with `ray start` on this machine (the head, under `ray submit`); None when there
    is none, and a local Ray (of num_cpus CPUs) is started instead. Raises ValueError for an address
    that finds no cluster, or num_cpus given for a cluster whose nodes declare their own."""
    try:
        found = find_cluster(address)
    except ConnectionError:  # "auto" with no cluster on this machine
        raise ValueError(f"--address {address}: no running Ray cluster was found on this machine; start one "
                         "(`ray start --head`, or `ray up cluster.yaml`), or omit --address for a local Ray") from None
    if found is not None and num_cpus is not None:
        raise ValueError(f"--num-cpus {num_cpus} sizes a local Ray, and this command joins the Ray cluster at "
                         f"{found}, whose nodes declare their own CPUs: drop --num-cpus")
    return found


def init_ray(address=None, num_cpus=None, **kwargs):
    """Join the cluster cluster_address finds, or start a local Ray with num_cpus CPUs (default: all).
    Returns True when it joined a cluster.

    Ray Train's controller collects reports when it polls the workers (every 2 s by default) and each
    epoch waits for its checkpoint to be committed, so a local Ray started here polls every 0.25 s
    (measured: 0.56 -> 0.28 s per epoch). On a cluster, set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the
    nodes' environment instead. A local Ray also starts no idle workers ahead of need: Ray Train
    starts its actors in processes of their own, so the two it prestarted on 2 cores only took CPU
    from the command's start (measured: 2.2 s less per smoke training run, 4 alternating pairs)."""
    if ray.is_initialized():  # already connected (a test, a notebook): keep that connection
        return ray.get_runtime_context().gcs_address not in _LOCAL_RAY
    joined = cluster_address(address, num_cpus) is not None
    if not joined:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        for setting in ("RAY_enable_worker_prestart", "RAY_prestart_worker_first_driver"):
            os.environ.setdefault(setting, "0")
        kwargs.update(num_cpus=num_cpus, include_dashboard=kwargs.get("include_dashboard", False))
        start_local_ray_in_own_session()  # a signal to the command's process group reaches the driver only
    # what find_cluster found, and no other: given "auto", ray.init would also join a Ray that another
    # process started with ray.init (any GCS process on this machine)
    ray.init(address=(None if address == "auto" else address) if joined else "local", **kwargs)
    if not joined:
        if not _LOCAL_RAY:  # once per process; it runs before ray.init's own handler, which then has nothing to do
            atexit.register(shutdown_ray)
        _LOCAL_RAY.add(ray.get_runtime_context().gcs_address)
    return joined


def init_ray_for_run(address, num_cpus, workers, cpus_per_worker, gpus_per_worker, workers_flag):
    """init_ray for one run of `workers` workers: a local Ray that could never hold it is refused (a
    ValueError naming workers_flag) before it starts; on a cluster, which may autoscale, a warning says
    what the run waits for. Returns True when it joined a cluster."""
    if cluster_address(address, num_cpus) is None:
        check_local_resources(workers, cpus_per_worker, gpus_per_worker, num_cpus, workers_flag)
    joined = init_ray(address, num_cpus=num_cpus)
    if joined:
        check_resources(workers, cpus_per_worker, gpus_per_worker, ray.cluster_resources(), workers_flag,
                        on_cluster=True, where="the Ray cluster")
    return joined


def shutdown_ray():
    """ray.shutdown. A local Ray's autoscaler monitor then sits out Ray's 1 s SIGTERM grace before its
    SIGKILL; killing it first saved that second but took Ray's private process table."""
    ray.shutdown()


@contextlib.contextmanager
def local_ray_watched(on_lost):
    """While in the block, on_lost(what) runs in a thread of its own if the GCS or the raylet of the
    local Ray this process started exits (the out-of-memory killer, a crash, a signal to it); what
    says which, how and the likely cause, e.g. "its raylet (pid 123) was killed by SIGKILL (out of
    memory? see dmesg)", or "... (stopped with this command)" when a job manager signalled every
    process of the job (systemd, Slurm) and the driver got the stop signal too. The driver's Ray ends the
    process within seconds of such a loss, without a word of ours, so on_lost ends the command
    itself. Nothing is watched on a cluster."""
    processes, done = local_ray_processes(), threading.Event()

    def watch():
        while not done.wait(0.25):
            for kind, process in processes.items():
                code = process.poll()
                if code is not None and not done.is_set():
                    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                    cause = "stopped with this command" if stopped_by_signal() else "out of memory? see dmesg"
                    on_lost(f"its {kind.replace('_server', '')} (pid {process.pid}) {how} ({cause})")
                    return

    if processes:
        threading.Thread(target=watch, name="local Ray watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


_LOCAL_RAY = set()  # GCS addresses of the local Rays this process started
