"""One NVAE configuration on Ray Train (real Ray on this machine): replicas, resume, faults, divergence.

Every run here is the digits smoke model on two CPU workers; each costs about 35 s of Ray start-up
and training on 2 cores.
"""
import os
import shutil

import pytest
import ray
import torch
from conftest import fault_rng
from ray.cluster_utils import Cluster

from nvae_platform.train.run import CHECKPOINT_FILE, make_trainer, run_training
from nvae_platform.train.scales import run_config, run_options

EPOCHS = 4


def _options(storage, name, **overrides):
    return run_options("digits", "smoke", workers=2, storage_path=str(storage), name=name, **overrides)


def _final_model(result):
    return torch.load(os.path.join(result.checkpoint_path, CHECKPOINT_FILE), weights_only=False)["model"]


@pytest.fixture(scope="module")
def straight(local_ray, tmp_path_factory):
    """Four epochs without interruption: the reference the recovery tests compare against."""
    return run_training(run_config("digits", "smoke", epochs=EPOCHS),
                        _options(tmp_path_factory.mktemp("runs"), "straight"))


def test_gpu_workers_reduce_cuda_tensors_over_nccl_and_cpu_ones_over_gloo(tmp_path):
    """Each epoch's metrics, the finite-loss vote and the RNG states are CPU tensors, which a process
    group of NCCL alone (Ray Train's default with GPUs) refuses; CPU workers use Gloo alone."""
    for gpus, backend in ((0, "gloo"), (1, "cpu:gloo,cuda:nccl")):
        trainer = make_trainer(run_config("digits", "smoke"), _options(tmp_path, f"gpus-{gpus}", gpus_per_worker=gpus))
        assert trainer.backend_config.backend == backend


@pytest.mark.slow
def test_straight_run_finishes_with_every_epoch_and_final_figures(straight):
    """A clean run reports each epoch once, then test bits/dim, active units and a sample grid."""
    assert straight.status == "finished"
    assert [m["epoch"] for m in straight.history] == list(range(EPOCHS))
    assert 0.0 < straight.metrics["test_bpd"] < 1.0  # below the 1 bit/dim of coin-flip pixels
    assert straight.metrics["active_units"] > 0
    assert os.path.getsize(straight.samples_path) > 0
    assert straight.metrics["replica_param_spread"] == 0.0 and straight.metrics["replica_bn_spread"] == 0.0


@pytest.mark.slow
def test_crash_and_resume_gives_bitwise_the_same_parameters(straight, tmp_path):
    """2 epochs, a crash of every worker, an automatic resume: the final parameters equal the straight run's."""
    resumed = run_training(run_config("digits", "smoke", epochs=EPOCHS),
                           _options(tmp_path, "crashed", debug_crash_after_epoch=1, max_failures=1))
    assert resumed.status == "finished"
    assert [m["epoch"] for m in resumed.history] == list(range(EPOCHS))
    ours, reference = _final_model(resumed), _final_model(straight)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.slow
def test_a_run_rerun_after_its_last_checkpoint_reports_that_epoch_as_finished(straight, tmp_path):
    """A driver killed after the last epoch's checkpoint was committed, rerun: the fit resumes past
    the last epoch and reports nothing, so the result is that checkpoint's figures, status finished."""
    run_folder = os.path.dirname(straight.checkpoint_path)
    shutil.copytree(run_folder, tmp_path / "straight")
    rerun = run_training(run_config("digits", "smoke", epochs=EPOCHS), _options(tmp_path, "straight"))
    assert rerun.status == "finished"
    assert [m["epoch"] for m in rerun.history] == list(range(EPOCHS))
    assert rerun.metrics["test_bpd"] == straight.metrics["test_bpd"]
    assert os.path.basename(rerun.checkpoint_path) == os.path.basename(straight.checkpoint_path)
    assert os.path.getsize(rerun.samples_path) > 0


@pytest.mark.slow
def test_worker_killed_at_a_random_step_is_replaced_and_each_epoch_counted_once(straight, tmp_path):
    """SIGKILL of one worker at a random step after epoch 0: the group restarts from the last
    checkpoint and finishes. NVAE_FAULT_SEED=<seed> replays a failing draw."""
    per_epoch = straight.history[0]["step"]
    seed, rng = fault_rng()
    step = rng.randrange(per_epoch + 1, EPOCHS * per_epoch)
    result = run_training(run_config("digits", "smoke", epochs=EPOCHS),
                          _options(tmp_path, "killed", debug_kill_at_step=step, max_failures=1))
    replay = f"killed at step {step} (NVAE_FAULT_SEED={seed})"
    assert result.status == "finished", replay
    assert [m["epoch"] for m in result.history] == list(range(EPOCHS)), replay
    killed_in = max(m["epoch"] for m in result.history if m["step"] < step) + 1  # the epoch in flight
    assert result.history[killed_in]["start_epoch"] == killed_in, replay  # resumed from the one before


@pytest.mark.slow
def test_nan_loss_stops_as_diverged_at_that_step_keeping_the_last_good_checkpoint(local_ray, tmp_path):
    """A NaN at step 30 ends the run as 'diverged at step 30', not retried; epoch 0's checkpoint stays."""
    result = run_training(run_config("digits", "smoke", epochs=EPOCHS),
                          _options(tmp_path, "diverged", debug_nan_at_step=30, max_failures=2))
    assert result.status == "diverged at step 30"
    assert [m["epoch"] for m in result.history] == [0]
    assert os.path.exists(os.path.join(result.checkpoint_path, CHECKPOINT_FILE))


@pytest.mark.slow
def test_two_nodes_keep_parameters_and_bn_statistics_identical(tmp_path):
    """Two workers on two simulated nodes: DDP and synchronized BN keep every rank bitwise equal."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        result = run_training(run_config("digits", "smoke", epochs=2), _options(tmp_path, "two-nodes"))
        assert result.status == "finished"
        assert all(m["worker_nodes"] == 2 for m in result.history)
        assert all(m["replica_param_spread"] == 0.0 for m in result.history)
        assert all(m["replica_bn_spread"] == 0.0 for m in result.history)
    finally:
        ray.shutdown()
        cluster.shutdown()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_command_help_and_bad_input_fail_fast(commands):
    """--help works; a bad field or value is a clear error before Ray starts."""
    def train(*args):
        return commands.run(os.path.join(ROOT, "studies/train.py"), args, cwd=ROOT, env=dict(os.environ))

    assert "--scale" in train("--help").stdout
    bad = train("--set", "normalization=layer_norm")
    assert bad.returncode == 2 and "normalization='layer_norm' is not allowed" in bad.stderr
    unknown = train("--set", "colour=blue")
    assert unknown.returncode == 2 and "unknown config field" in unknown.stderr
    missing = train("--dataset", "cifar10", "--data-dir", "/nonexistent/nvae-data")
    assert missing.returncode == 2
    assert "'cifar10' not found" in missing.stderr and "/nonexistent/nvae-data" in missing.stderr
    assert "--dataset digits" in missing.stderr
    assert "Started a local Ray instance" not in bad.stderr + unknown.stderr + missing.stderr


@pytest.mark.slow
def test_train_command_refuses_gpus_a_local_machine_lacks(tmp_path, commands):
    """--scale small wants a GPU per worker: on a CPU-only machine, a clear error, not a wait."""
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 4}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["x"] * 10}, f)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = commands.run(os.path.join(ROOT, "studies/train.py"), ["--dataset", "cifar10", "--scale", "small",
                          "--data-dir", str(tmp_path), "--num-cpus", "1"], cwd=ROOT, env=dict(os.environ))
    assert result.returncode == 2
    assert "needs 1 GPU(s) (1 worker(s) x 1) and a local Ray of --num-cpus 1 has 0" in result.stderr
    assert "--gpus-per-worker 0" in result.stderr
