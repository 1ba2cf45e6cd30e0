"""The same study started twice in one folder (a double-clicked job, a scheduler's retried submission):
one runs, the other is refused in one line naming the holder, exit 2, before Ray starts; after a
SIGKILLed holder the next invocation takes its lock over and resumes the study. Real study scripts
(forked from the tests' command server), a real local Ray and SQLite store."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from nvae_platform.record.train_record import run_name
from nvae_platform.train.scales import run_config, run_options

pytestmark = pytest.mark.slow  # the whole module starts Ray, servers or commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    return env


def _command(epochs):
    return [sys.executable, os.path.join(ROOT, "studies", "ablation_sr.py"), "--levels", "sr_lambda=0.0",
            "--set", f"epochs={epochs}", "--num-cpus", "2", "--address", "local"]


def _start(command, folder, env, commands):
    """The command started, forked from the tests' command server (conftest.commands)."""
    return commands.start(command, folder, env)


def _statuses(folder):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    return [r.info.status for r in client.search_runs([client.get_experiment_by_name("ablation_sr").experiment_id])]


def _kill_all(process, env):
    """SIGKILL the command's group and every process of its Ray (a lost machine)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if env["RAY_TMPDIR"] in " ".join(p.info["cmdline"] or []):
            p.kill()


def test_two_invocations_at_once_one_runs_the_other_is_refused_in_one_line(tmp_path, commands):
    env = _env()
    started = time.time()
    both = [_start(_command(1), tmp_path, env, commands) for _ in range(2)]
    try:
        while all(p.poll() is None for p in both) and time.time() - started < 300:
            time.sleep(0.05)
        refused_after = time.time() - started
        refused = next(p for p in both if p.poll() is not None)
        running = next(p for p in both if p is not refused)
        out, err = refused.communicate()
        print(f"refused {refused_after:.1f} s after both started")
        assert refused.returncode == 2, (out + err)[-3000:]
        assert out == "" and len(err.splitlines()) == 1, err  # one line, nothing else, before Ray starts
        assert "ablation_sr.py: error: study ablation_sr-smoke-" in err and " is already running in " in err
        assert f"pid {running.pid} on host {socket.gethostname()}, since 20" in err
        assert running.poll() is None  # still running: its refused twin did not disturb it
        out, err = running.communicate(timeout=300)
        assert running.returncode == 0, (out + err)[-3000:]
    finally:
        for p in both:
            _kill_all(p, env)
    assert set(_statuses(tmp_path)) == {"FINISHED"}
    assert not list((tmp_path / "runs").glob("*/.lock")) and not list((tmp_path / "runs").glob(".write-probe*"))


def test_after_a_sigkilled_holder_the_next_invocation_takes_the_lock_over_and_resumes(tmp_path, commands):
    env = _env()
    first = _start(_command(2), tmp_path, env, commands)
    try:
        started = time.time()
        for line in first.stdout:  # until the trial has checkpointed its first epoch
            if ": epoch 1/2" in line or time.time() - started > 240:
                break
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        _kill_all(first, env)
    (lock,) = (tmp_path / "runs").glob("*/.lock")  # left behind by the killed holder
    assert f'"pid": {first.pid}' in lock.read_text()

    command = _command(2)
    again = commands.run_argv(command, cwd=tmp_path, env=_env(), timeout=300)  # forked, to its end
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"[study] taking over from pid {first.pid} on host {socket.gethostname()}, which is gone" in again.stdout
    assert "[study] resuming" in again.stdout
    assert set(_statuses(tmp_path)) == {"FINISHED"} and len(_statuses(tmp_path)) == 2  # parent and trial, once
    assert not lock.exists()


def test_a_training_run_in_progress_refuses_a_second_invocation_of_it(tmp_path, commands):
    """studies/train.py shares the lock: a run folder locked by a live process on this host."""
    name = run_name("digits-smoke", run_config("digits", "smoke", epochs=1), run_options("digits", "smoke"))
    holder = subprocess.Popen(["sleep", "120"])
    try:
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / ".lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid, "started": time.time(), "token": "t"}))
        started = time.time()
        refused = commands.run(os.path.join(ROOT, "studies", "train.py"), ["--set", "epochs=1"], cwd=tmp_path,
                               env=_env())
        print(f"train.py refused in {time.time() - started:.1f} s")
    finally:
        holder.kill()
    assert refused.returncode == 2 and refused.stdout == "" and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert f"run {name} is already running in {tmp_path}/runs/{name}: pid {holder.pid} on host " in refused.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded
