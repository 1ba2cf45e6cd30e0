"""A study stopped by Ctrl-C (SIGINT) or by a job manager (SIGTERM: `ray job stop`, Slurm,
Kubernetes, systemd) stops the same way: its table, the one line of advice, its unfinished runs
marked KILLED, exit 130 or 143, and no process it started left running. A real study, subprocess."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _started_by(pid, folder):
    """The command's processes: its children, and every process naming its own Ray folder (Ray's
    GCS, raylet and workers leave the driver's process tree)."""
    found = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    for p in psutil.process_iter(["cmdline"]):
        if str(folder) in " ".join(p.info["cmdline"] or []) and p.pid != pid:
            found[p.pid] = p
    return list(found.values())


def _started_by_now(folder):
    """The processes still naming the command's own Ray folder, once the command has exited."""
    return [p for p in psutil.process_iter(["cmdline"]) if str(folder) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_study_says_so_marks_its_runs_killed_and_leaves_no_process(signum, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=ray_dir)
    command = [sys.executable, os.path.join(ROOT, "studies", "ablation_sr.py"), "--levels", "sr_lambda=0.0,0.01",
               "--set", "epochs=20", "--num-cpus", "2",
               "--address", "local"]  # a new local Ray, whatever else runs on this machine
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    started, out = time.time(), []
    try:
        for line in process.stdout:  # until a trial has finished an epoch
            out.append(line)
            if ": epoch 1/20" in line or time.time() - started > 240:
                break
        tree = _started_by(process.pid, ray_dir)
        assert len(tree) > 3, f"the study's Ray processes were not found: {''.join(out)[-2000:]}"
        process.send_signal(signum)
        rest, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    out = "".join(out) + rest
    assert process.returncode == code, err[-3000:]
    assert "The study was interrupted: re-run the same command to resume it." in out, out[-3000:]
    assert "| sr_lambda |" in out  # its table of what finished
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ablation_sr").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_training_run_says_so_marks_its_run_killed_and_leaves_no_process(signum, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=ray_dir)
    command = [sys.executable, os.path.join(ROOT, "studies", "train.py"), "--set", "epochs=20", "--num-cpus", "2",
               "--address", "local"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        first = process.stdout.readline()  # "[nvae] training ... checkpoints in <run folder>; ..."
        assert first.startswith("[nvae] training"), first + process.stderr.read()[-3000:]
        run_folder = first.split("checkpoints in ")[1].split(";")[0]
        started = time.time()
        while not [n for n in os.listdir(run_folder) if n.startswith("checkpoint_")] and time.time() - started < 240:
            time.sleep(0.5)  # until an epoch is checkpointed
        tree = _started_by(process.pid, ray_dir)
        assert len(tree) > 3, "the run's Ray processes were not found"
        process.send_signal(signum)
        signalled = time.time()
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    print(f"train.py: {len(tree)} processes, exit {process.returncode} {time.time() - signalled:.1f} s after the "
          f"signal, {len(_started_by_now(ray_dir))} left")
    assert process.returncode == code, err[-3000:]
    assert "[nvae] the run was interrupted: re-run the same command to resume it." in out, out[-3000:]
    own = "\n".join(line for line in err.splitlines() if "pid=" not in line)  # not Ray's processes' forwarded lines
    assert "SIGTERM received" not in own and "Traceback" not in own, own[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
    assert not os.path.exists(os.path.join(run_folder, ".lock"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["nvae.status"] == "interrupted"
    assert client.get_metric_history(run.info.run_id, "val_bpd")  # the epochs checkpointed before the stop
