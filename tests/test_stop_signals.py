"""A study stopped by Ctrl-C (SIGINT, once or twice) or by a job manager (SIGTERM to its process
group: `timeout`; to its pid: `ray job stop`, Kubernetes) stops the same way: its
table, the one line of advice, its unfinished runs marked KILLED, exit 130 or 143, and no process it
started left running; so does `studies/train.py`. A study whose local Ray is lost (its raylet
SIGKILLed) says so and ends the same way, with exit 1. A study that finishes or fails leaves no
process either. Real commands, forked from the tests' command server (tests/forked_commands.py)."""
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # the whole module starts Ray, servers or commands

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


def _stop(process, send, tree, ray_dir, what):
    """Stop the command with send(process) and wait for its end: its (stdout, stderr); prints how it went."""
    signalled = time.time()
    send(process)
    out, err = process.communicate(timeout=120)
    print(f"{what}: {len(tree)} processes, exit {process.returncode} {time.time() - signalled:.1f} s after the "
          f"stop, {len(_started_by_now(ray_dir))} left")
    return out, err


def _signals(*signums, group=False):
    """A stop: each signal in turn, 0.5 s apart (an impatient user), to the command's pid or, as `timeout`
    and a terminal's Ctrl-C do, to its whole process group."""
    def send(process):
        for i, signum in enumerate(signums):
            time.sleep(0.5 if i else 0)
            (os.killpg if group else os.kill)(process.pid, signum)
    return send


STUDY_STOPS = {"SIGINT": (_signals(signal.SIGINT), 130),
               "SIGINT twice": (_signals(signal.SIGINT, signal.SIGINT, group=True), 130),
               "SIGTERM to the group": (_signals(signal.SIGTERM, group=True), 143)}
TRAIN_STOPS = {k: STUDY_STOPS[k] for k in ("SIGINT", "SIGTERM to the group")}


def _kill_if_running(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)


def _command_env(tmp_path):
    """(environment, Ray folder) of a command on a new local Ray with its own (short: Ray's socket
    paths have a length limit) Ray folder and temp folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    (tmp_path / "tmp").mkdir()
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=ray_dir, TMPDIR=str(tmp_path / "tmp"))
    return env, ray_dir


def _study_after_an_epoch(tmp_path, env, ray_dir, commands):
    """A study of 20 epochs started (forked from the tests' command server, conftest.commands) on a new
    local Ray, once a trial has finished an epoch: (process, its output so far, its processes)."""
    command = [sys.executable, os.path.join(ROOT, "studies", "ablation_sr.py"), "--levels", "sr_lambda=0.0,0.01",
               "--set", "epochs=20", "--num-cpus", "2",
               "--address", "local"]  # a new local Ray, whatever else runs on this machine
    process = commands.start(command, tmp_path, env)
    started, out = time.time(), []
    for line in process.stdout:  # until a trial has finished an epoch
        out.append(line)
        if ": epoch 1/20" in line or time.time() - started > 240:
            break
    tree = _started_by(process.pid, ray_dir)
    assert len(tree) > 3, f"the study's Ray processes were not found: {''.join(out)[-2000:]}"
    return process, out, tree


def _assert_stopped_cleanly(tree, ray_dir, tmp_path, experiment):
    """No process of the command is left, its locks are released and its MLflow runs are all KILLED."""
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
    assert not _started_by_now(ray_dir)
    assert not list((tmp_path / "runs").glob("*/.lock"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    return runs


@pytest.mark.parametrize("stop", STUDY_STOPS)
def test_a_stopped_study_says_so_marks_its_runs_killed_and_leaves_no_process(stop, tmp_path, commands):
    send, code = STUDY_STOPS[stop]
    env, ray_dir = _command_env(tmp_path)
    process, out, tree = _study_after_an_epoch(tmp_path, env, ray_dir, commands)
    try:
        rest, err = _stop(process, send, tree, ray_dir, f"study, {stop}")
    finally:
        _kill_if_running(process)
    out = "".join(out) + rest
    assert process.returncode == code, err[-3000:]
    assert "The study was interrupted: re-run the same command to resume it." in out, out[-3000:]
    assert "| sr_lambda |" in out  # its table of what finished
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
    _assert_stopped_cleanly(tree, ray_dir, tmp_path, "ablation_sr")


def test_a_study_whose_local_ray_is_lost_says_so_marks_its_runs_killed_and_leaves_nothing(tmp_path, commands):
    """The study's raylet SIGKILLed, as by the out-of-memory killer: one line says so, then the table
    and the re-run line; exit 1, no process left, no checkpoint left in the temp folder."""
    env, ray_dir = _command_env(tmp_path)
    process, out, tree = _study_after_an_epoch(tmp_path, env, ray_dir, commands)
    try:
        (raylet,) = [p for p in tree if p.name() == "raylet"]
        rest, err = _stop(process, lambda _: raylet.kill(), tree, ray_dir, "study, raylet SIGKILLed")
    finally:
        _kill_if_running(process)
    out = "".join(out) + rest
    assert process.returncode == 1, err[-3000:]
    assert f"[study] the local Ray was lost: its raylet (pid {raylet.pid}) was killed by SIGKILL" in err, err[-3000:]
    assert "The study was interrupted: re-run the same command to resume it." in out, out[-3000:]
    assert "| sr_lambda |" in out
    assert "Traceback" not in err and "core_worker" not in err, err[-3000:]
    _assert_stopped_cleanly(tree, ray_dir, tmp_path, "ablation_sr")
    assert not os.listdir(tmp_path / "tmp")  # the checkpoints are staged in their run folders


@pytest.mark.parametrize("stop", TRAIN_STOPS)
def test_a_stopped_training_run_says_so_marks_its_run_killed_and_leaves_no_process(stop, tmp_path, commands):
    send, code = TRAIN_STOPS[stop]
    env, ray_dir = _command_env(tmp_path)
    command = [sys.executable, os.path.join(ROOT, "studies", "train.py"), "--set", "epochs=20", "--num-cpus", "2",
               "--address", "local"]
    process = commands.start(command, tmp_path, env)
    try:
        first = process.stdout.readline()  # "[nvae] training ... checkpoints in <run folder>; ..."
        assert first.startswith("[nvae] training"), first + process.stderr.read()[-3000:]
        run_folder = first.split("checkpoints in ")[1].split(";")[0]
        started = time.time()
        while not [n for n in os.listdir(run_folder) if n.startswith("checkpoint_")] and time.time() - started < 240:
            time.sleep(0.5)  # until an epoch is checkpointed
        tree = _started_by(process.pid, ray_dir)
        assert len(tree) > 3, "the run's Ray processes were not found"
        out, err = _stop(process, send, tree, ray_dir, f"train.py, {stop}")
    finally:
        _kill_if_running(process)
    assert process.returncode == code, err[-3000:]
    assert "[nvae] the run was interrupted: re-run the same command to resume it." in out, out[-3000:]
    own = "\n".join(line for line in err.splitlines() if "pid=" not in line)  # not Ray's processes' forwarded lines
    assert "SIGTERM received" not in own and "Traceback" not in own, own[-3000:]
    (run,) = _assert_stopped_cleanly(tree, ray_dir, tmp_path, "train")
    assert run.data.tags["nvae.status"] == "interrupted"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_metric_history(run.info.run_id, "val_bpd")  # the epochs checkpointed before the stop


def _watch(command, cwd, env, commands):
    """Run command (forked from the tests' command server) to its end, listing its processes every
    0.2 s: (process, stdout, stderr, every process seen)."""
    process = commands.start(command, cwd, env)
    output = {}
    reader = threading.Thread(target=lambda: output.update(zip(("out", "err"), process.communicate(timeout=300))))
    reader.start()
    seen = {}
    try:
        while process.poll() is None:
            try:
                seen.update({(p.pid, p.create_time()): p for p in _started_by(process.pid, env["RAY_TMPDIR"])})
            except psutil.Error:
                pass  # the command ended, or one of its processes, while it was listed
            time.sleep(0.2)
        reader.join()
    finally:
        _kill_if_running(process)
    return process, output["out"], output["err"], list(seen.values())


@pytest.mark.parametrize("end", ["finished", "failed"])
def test_a_study_that_ends_leaves_no_process(end, tmp_path, commands):
    """A study that finishes (exit 0), and one whose MLflow store refuses its writes once it has started
    (it trains on, then ends with exit 1: its record incomplete), leave none of the processes they started."""
    if end == "failed":  # the first child run's params are refused, as by a full disk
        store = tmp_path / "mlflow.db"
        MlflowClient(f"sqlite:///{store}").search_experiments()
        with sqlite3.connect(store) as db:
            db.execute("CREATE TRIGGER full_disk BEFORE INSERT ON params WHEN (SELECT count(*) FROM runs) >= 2 "
                       "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    env, ray_dir = _command_env(tmp_path)
    command = [sys.executable, os.path.join(ROOT, "studies", "ablation_sr.py"), "--levels", "sr_lambda=0.0",
               "--set", "epochs=1", "--num-cpus", "2", "--address", "local"]
    process, out, err, seen = _watch(command, tmp_path, env, commands)
    _, alive = psutil.wait_procs(seen, timeout=5)
    print(f"{end}: exit {process.returncode}, {len(seen)} processes seen, {len(alive)} alive 5 s after the exit, "
          f"{len(_started_by_now(ray_dir))} naming its Ray folder")
    assert process.returncode == (0 if end == "finished" else 1), (out + err)[-3000:]
    if end == "failed":
        assert "[study] the trials ended, but the MLflow store" in err and "database or disk is full" in err, err[-3000:]
    assert len(seen) > 3, f"the study's Ray processes were not found: {(out + err)[-2000:]}"
    assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
    assert not _started_by_now(ray_dir)
    assert not list((tmp_path / "runs").glob("*/.lock"))  # the study folder's lock is released
