"""`studies/train.py` end to end (real local Ray, real SQLite MLflow store): one MLflow run per run
name, resumed after a killed driver with every epoch once, named by its config, and extended only
on request."""
import os
import signal
import subprocess
import sys

import pytest
from conftest import fault_rng
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # the whole module starts Ray, servers or commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_EPOCH = ("train_bpd", "val_bpd", "lr", "epoch_seconds")


def _command(*flags):
    return [sys.executable, os.path.join(ROOT, "studies", "train.py"), "--num-cpus", "2", *flags]


def _train(folder, *flags, commands=None):
    """The command in folder: forked from the tests' command server (conftest.commands) when given one."""
    if commands is not None:
        command = _command(*flags)
        return commands.run_argv(command, cwd=folder, env=dict(os.environ), timeout=600)
    return subprocess.run(_command(*flags), cwd=folder, capture_output=True, text=True, timeout=600)


def _runs(folder):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("train")
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def _steps(client, run, name):
    return [m.step for m in client.get_metric_history(run.info.run_id, name)]


def test_a_training_run_is_recorded_and_the_same_command_does_not_repeat_it(tmp_path, commands):
    first = _train(tmp_path, "--set", "epochs=2", commands=commands)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    client, runs = _runs(tmp_path)
    assert len(runs) == 1
    (name, run), = runs.items()
    assert name.startswith("digits-smoke-") and run.info.status == "FINISHED"
    assert run.data.tags["nvae.status"] == "finished" and run.data.tags["nvae.kind"] == "train"
    assert run.data.params["epochs"] == "2" and run.data.params["run.workers"] == "1"
    assert 0 < run.data.metrics["test_bpd"] < 1 and run.data.metrics["training_hours"] > 0
    assert all(_steps(client, run, m) == [0, 1] for m in PER_EPOCH)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "samples.png"}
    assert os.path.exists(os.path.join(run.data.tags["nvae.checkpoint"], "state.pt"))
    assert run.info.run_id in first.stdout
    # the console holds the run's own lines, each once; Ray's messages are in the log the first line names
    said = [line for line in first.stdout.splitlines() if line.startswith("[nvae]")]
    assert [line.split("  ")[0] for line in said[1:]] == ["[nvae] epoch 1/2", "[nvae] epoch 2/2"], first.stdout
    assert len(said) == 3 and said[0].startswith("[nvae] training digits"), first.stdout
    assert "pid=" not in first.stdout + first.stderr and "Started a local Ray" not in first.stdout + first.stderr
    with open(said[0].split("Ray's own messages go to ")[1]) as f:
        assert "Started a local Ray instance" in f.read()

    again = _train(tmp_path, "--set", "epochs=2", commands=commands)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert len(_runs(tmp_path)[1]) == 1

    changed = _train(tmp_path, "--set", "epochs=2", "--set", "num_channels_enc=8", commands=commands)  # a new run
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert len(_runs(tmp_path)[1]) == 2

    refused = _train(tmp_path, "--resume-from", name, "--set", "epochs=3", "--set", "num_channels_enc=32",
                     commands=commands)
    assert refused.returncode == 2 and "other shapes" in refused.stderr and "num_channels_enc 16 -> 32" in refused.stderr
    assert "Started a local Ray instance" not in refused.stderr

    extended = _train(tmp_path, "--resume-from", name, "--set", "epochs=3", commands=commands)
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert f"continuing run {name} with epochs 2 -> 3" in extended.stdout
    assert f"[nvae] resuming at epoch 3/3 from {tmp_path}/runs/{name}/checkpoint_" in extended.stdout
    client, runs = _runs(tmp_path)
    assert len(runs) == 2
    run = runs[name]
    assert run.data.tags["nvae.resumed_with"] == "epochs 2 -> 3" and run.data.tags["nvae.status"] == "finished"
    assert all(_steps(client, run, m) == [0, 1, 2] for m in PER_EPOCH)


def test_a_driver_killed_at_a_random_moment_is_resumed_into_the_same_run_with_every_epoch_once(tmp_path, commands):
    """SIGKILL the driver (and its Ray) at a random moment of a 4-epoch run (about 40 s here, Ray's
    start-up included), then run it again. NVAE_FAULT_SEED=<seed> replays a failing draw."""
    seed, rng = fault_rng()
    moment = rng.uniform(3.0, 45.0)
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_command("--set", "epochs=4"), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        first.wait(timeout=moment)
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    printed = [line for line in (tmp_path / "first.log").read_text().splitlines() if "epoch" in line]
    replay = f"killed after {moment:.1f} s, at {printed[-1:]} (NVAE_FAULT_SEED={seed})"
    second = _train(tmp_path, "--set", "epochs=4", commands=commands)
    assert second.returncode == 0, replay + second.stdout[-2000:] + second.stderr[-2000:]
    client, runs = _runs(tmp_path)
    assert len(runs) == 1, replay
    run = next(iter(runs.values()))
    assert run.info.status == "FINISHED", replay
    for name in PER_EPOCH:
        assert _steps(client, run, name) == [0, 1, 2, 3], (name, replay)
