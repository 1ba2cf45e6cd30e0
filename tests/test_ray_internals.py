"""The non-public Ray symbols the platform relies on (nvae_platform/ray_internals.py) still exist and
behave as it expects: this fails, naming the symbol, when a Ray upgrade moves one."""
import importlib

import pytest


@pytest.mark.parametrize("module, name", [("ray.train.v2._internal.constants", "CHECKPOINT_MANAGER_SNAPSHOT_FILENAME"),
                                          ("ray._private.worker", "print_to_stdstream"),
                                          ("ray._private.worker", "_global_node"),
                                          ("ray._private.services", "ConsolePopen")])
def test_the_private_ray_symbol_still_exists(module, name):
    assert hasattr(importlib.import_module(module), name), (
        f"Ray {importlib.import_module('ray').__version__} no longer has {module}.{name}: "
        "update nvae_platform/ray_internals.py")


def test_the_tune_keys_the_record_leaves_out_are_the_ones_tune_adds():
    """run_writer's own list of Tune's auto-filled keys holds every key Tune adds, and no metric of ours."""
    from ray.tune.result import AUTO_RESULT_KEYS  # only here, as the canary of that list

    from nvae_platform.record.run_writer import TUNE_AUTO_FILLED

    assert set(AUTO_RESULT_KEYS) <= TUNE_AUTO_FILLED, f"Tune now adds {set(AUTO_RESULT_KEYS) - TUNE_AUTO_FILLED}"
    assert not {"train_bpd", "val_bpd", "test_bpd", "lr", "epoch"} & TUNE_AUTO_FILLED


def test_find_cluster_finds_what_ray_init_would_join_without_connecting(monkeypatch, tmp_path):
    """find_cluster (public means: the address, $RAY_ADDRESS, the file `ray start` writes) agrees with
    the resolution ray.init runs, Ray's private canonicalize_bootstrap_address (used here only)."""
    from ray._private.services import canonicalize_bootstrap_address
    from ray._private.utils import write_ray_address

    from nvae_platform.ray_cluster import find_cluster

    def both(address):  # Ray's turns a loopback host into this node's address: compare the ports
        ours, rays = find_cluster(address), canonicalize_bootstrap_address(address)
        assert (ours is None) == (rays is None), (address, ours, rays)
        return ours and (ours.rsplit(":", 1)[1], rays.rsplit(":", 1)[1])

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for temp in ("RAY_TMPDIR", "TMPDIR"):  # where Ray keeps the address `ray start` wrote
        monkeypatch.delenv("RAY_TMPDIR", raising=False)
        monkeypatch.setenv(temp, str(tmp_path / temp))
        (tmp_path / temp / "ray").mkdir(parents=True)
        assert both(None) is None  # nothing started: a local Ray
        write_ray_address("127.0.0.1:6390")  # as `ray start --head` does
        assert both(None) == ("6390", "6390") and find_cluster("auto") == "127.0.0.1:6390"
    assert both("127.0.0.1:6379") == ("6379", "6379")  # an explicit address
    assert both("local") is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    assert both(None) == ("6380", "6380")  # $RAY_ADDRESS wins over `ray start`'s
    assert both("127.0.0.1:6379") == ("6379", "6379")  # and an explicit address over $RAY_ADDRESS
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "nothing-started"))
    with pytest.raises(ConnectionError):
        find_cluster("auto")


def test_the_driver_prints_ray_output_through_the_function_it_finds_at_call_time():
    """ray.init binds print_to_stdstream by its module name, and the error listener calls it by name."""
    import inspect

    from ray._private import worker

    assert list(inspect.signature(worker.print_to_stdstream).parameters) == ["data", "ignore_prefix"]
    source = inspect.getsource(worker)
    assert "functools.partial(print_to_stdstream," in source and "print_to_stdstream(\n" in source


@pytest.mark.slow
def test_shutdown_ray_stops_a_local_ray_and_all_its_processes(monkeypatch):
    """A local Ray started by init_ray (its GCS, raylet, autoscaler monitor, workers: this process's
    children) leaves none of its processes running after shutdown_ray."""
    import psutil
    import ray

    from nvae_platform.ray_cluster import init_ray, shutdown_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # other fixtures' servers
    init_ray(address="local", num_cpus=1)
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert any("monitor" in " ".join(p.cmdline()) for p in started), [p.cmdline()[:2] for p in started]
    shutdown_ray()
    assert not ray.is_initialized()
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [p.cmdline()[:2] for p in alive]


def test_a_local_ray_s_processes_start_in_a_session_of_their_own(monkeypatch):
    """Ray starts its processes through services.ConsolePopen, which the patch makes start a session of
    their own: a signal to the driver's process group does not reach them."""
    import inspect
    import os
    import subprocess

    import ray._private.services

    from nvae_platform.ray_internals import start_local_ray_in_own_session

    monkeypatch.setattr(ray._private.services, "ConsolePopen", ray._private.services.ConsolePopen)
    start_local_ray_in_own_session()
    start_local_ray_in_own_session()  # once is enough: a second call changes nothing
    process = ray._private.services.ConsolePopen(["sleep", "5"], stdin=subprocess.DEVNULL)
    try:
        assert os.getsid(process.pid) == process.pid != os.getsid(0)
        assert "ConsolePopen(" in inspect.getsource(ray._private.services.start_ray_process)
    finally:
        process.kill()
        process.wait()
