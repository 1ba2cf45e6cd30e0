"""A run's storage on s3:// with a custom endpoint (AWS_ENDPOINT_URL, as MinIO or Ceph users set it),
on a real moto S3 server on loopback: failure.json, a damaged checkpoint set aside, and a store that
cannot be reached."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow.fs
import pytest
import torch
from conftest import free_port
from mlflow.tracking import MlflowClient

from nvae_core.data_check import BadDataError
from nvae_platform.ray_internals import TRAIN_SNAPSHOT_FILE
from nvae_platform.train.checkpoints import epoch_checkpoints, read_state
from nvae_platform.train.failures import clear_failure, read_failure, write_failure
from nvae_platform.train.resume import choose_resume

RUN = "s3://nvae/runs/run"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bucket(s3_store, monkeypatch):
    """moto's S3 server as the run's store, reached through AWS_ENDPOINT_URL: its pyarrow filesystem."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    return s3_store.filesystem


def _files(filesystem, prefix):
    selector = pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return sorted(i.path[len(prefix) + 1:] for i in filesystem.get_file_info(selector)
                  if i.type == pyarrow.fs.FileType.File)


def _put(filesystem, path, data):
    with filesystem.open_output_stream(path) as f:
        f.write(data)


def test_a_failure_is_written_read_and_cleared_on_s3(bucket):
    try:
        raise BadDataError("unreadable.png")
    except BadDataError as error:
        write_failure(RUN, error)
    assert _files(bucket, "nvae/runs/run") == ["failure.json"]
    record = read_failure(RUN)
    assert record["status"] == "failed: BadDataError: unreadable.png" and "raise BadDataError" in record["traceback"]
    clear_failure(RUN)
    assert read_failure(RUN) is None and _files(bucket, "nvae/runs/run") == []


def test_a_checkpoint_cut_short_on_s3_is_set_aside_whole_and_the_run_resumes_before_it(bucket):
    """Epoch 2's upload ended before its state.pt: the folder moves to damaged_<name> with every
    object it had, and the run resumes from epoch 1's checkpoint; Ray Train's record is deleted."""
    names = [f"checkpoint_2026-01-01_10-00-0{epoch}.000000" for epoch in range(3)]
    for epoch, name in enumerate(names):
        folder = f"nvae/runs/run/{name}"
        _put(bucket, f"{folder}/metrics.json", json.dumps({"epoch": epoch, "train_bpd": 5.0}).encode())
        _put(bucket, f"{folder}/samples.png", b"png")
        if epoch < 2:
            buffer = pyarrow.BufferOutputStream()
            torch.save({"model": {"w": torch.full((3,), float(epoch))}, "epoch": epoch}, buffer)
            _put(bucket, f"{folder}/state.pt", buffer.getvalue())
    _put(bucket, f"nvae/runs/run/{TRAIN_SNAPSHOT_FILE}", b"{}")

    said = []
    resume, set_aside = choose_resume(RUN, say=said.append)
    assert resume == f"{RUN}/{names[1]}" and read_state(resume)["epoch"] == 1
    assert set_aside == [f"damaged_{names[2]}"]
    assert _files(bucket, f"nvae/runs/run/damaged_{names[2]}") == ["metrics.json", "samples.png"]
    assert _files(bucket, f"nvae/runs/run/{names[2]}") == []  # the old prefix is gone
    assert bucket.get_file_info(f"nvae/runs/run/{names[2]}").type == pyarrow.fs.FileType.NotFound
    assert bucket.get_file_info(f"nvae/runs/run/{TRAIN_SNAPSHOT_FILE}").type == pyarrow.fs.FileType.NotFound
    assert _files(bucket, f"nvae/runs/run/{names[1]}") == ["metrics.json", "samples.png", "state.pt"]
    assert said == [f"[nvae] checkpoint {names[2]} (epoch 3) is damaged (no state.pt); set aside as damaged_{names[2]}",
                    "[nvae] resuming from epoch 2, the newest checkpoint that loads"]


class Proxy:
    """A TCP forwarder from a loopback port to moto's: the store as the run reaches it. down() closes
    its listening socket and drops every connection (a store gone, whose disk keeps the bucket); up()
    listens on the same port again."""

    def __init__(self, target_port):
        self.target, self.port, self.open, self.lock = target_port, free_port(), set(), threading.Lock()
        self.up()

    def up(self):
        self.listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self):
        with self.lock:
            for sock in [self.listener, *self.open]:
                _drop(sock)

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return  # down
            with self.lock:
                if listener.fileno() < 0:  # went down while this connection was made
                    _drop(client), _drop(upstream)
                    return
                self.open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self.lock:
            for sock in (source, sink):
                _drop(sock)
                self.open.discard(sock)


def _drop(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept or recv on it
    except OSError:
        pass
    sock.close()


def _whole_checkpoints(filesystem):
    """Checkpoint folders under s3://nvae/runs/ that hold both metrics.json and state.pt."""
    files = _files(filesystem, "nvae/runs")
    return [f for f in files if f.endswith("/metrics.json") and f.replace("metrics.json", "state.pt") in files]


def _start(script, folder, endpoint, commands, *flags):
    """studies/<script> at smoke scale, 3 epochs, its storage s3://nvae/runs reached at endpoint: started,
    forked from the tests' command server (conftest.commands), its output merged (a ForkedProcess).
    AWS_MAX_ATTEMPTS=1: the platform's requests to a store that is down each fail at the first try
    (nvae_platform/storage.py), where pyarrow's own retrying takes seconds for each."""
    command = [sys.executable, os.path.join(ROOT, "studies", script), "--num-cpus", "2", "--set", "epochs=3",
               "--storage-path", "s3://nvae/runs", "--tracking-uri", f"sqlite:///{folder}/mlflow.db", *flags]
    return commands.start(command, folder, {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}, stderr=subprocess.STDOUT,
                          timeout=600)


def _train(folder, endpoint, commands):
    return _start("train.py", folder, endpoint, commands, "--scale", "smoke", "--max-failures", "1")


def _study(folder, endpoint, commands):
    # No retries: the store stays down, and each retry would wait it out again.
    return _start("ablation_sr.py", folder, endpoint, commands, "--levels", "sr_lambda=0.0", "--max-failures", "0")


def _store_down_after_epoch_0(s3_store, bucket, start, folder, commands):
    """Run start(folder, endpoint, commands) with the store behind a Proxy, taken down once epoch 0's
    checkpoint is in the bucket and kept down until the command ends, then up again: (proxy, process, output)."""
    proxy = Proxy(s3_store.port)  # the command reaches the store through it; the test reaches moto directly
    started = time.time()
    process = start(folder, f"http://127.0.0.1:{proxy.port}", commands)
    while not _whole_checkpoints(bucket):
        assert process.poll() is None and time.time() - started < 300, _finish(process)
        time.sleep(0.5)
    proxy.down()
    out = _finish(process)
    proxy.up()
    return proxy, process, out


def _finish(process):
    try:
        return process.communicate(timeout=600)[0]
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever it left running (its Ray)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_store_that_stays_down_fails_the_run_in_one_line_and_the_same_command_resumes(bucket, s3_store, tmp_path,
                                                                                       commands):
    """The store goes down once epoch 0's checkpoint is in the bucket and stays down until the run
    ends; once it answers again on the same port, the same command resumes from that checkpoint."""
    proxy, first, out = _store_down_after_epoch_0(s3_store, bucket, _train, tmp_path, commands)
    name = re.search(r"run (\S+), checkpoints in s3://nvae/runs/", out).group(1)
    own = [line for line in out.splitlines() if "pid=" not in line]  # not what Ray forwards from its processes
    assert not [line for line in own if "Traceback" in line], out[-5000:]
    said = [line for line in own if "cannot be reached" in line]
    assert first.returncode == 1 and len(said) == 1, out[-5000:]
    assert (f'"status": "failed: the run\'s storage s3://nvae/runs/{name} at 127.0.0.1:{proxy.port} cannot be reached '
            "(AWS Error NETWORK_CONNECTION") in said[0] and "run the same command: it resumes" in said[0]

    second = _train(tmp_path, f"http://127.0.0.1:{proxy.port}", commands)  # the same command
    out = _finish(second)
    assert second.returncode == 0, out[-5000:]
    history = [c.metrics for c in epoch_checkpoints(f"s3://nvae/runs/{name}")]
    assert [(m["epoch"], m["start_epoch"]) for m in history] == [(0, 0), (1, 1), (2, 1)]  # resumed after epoch 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run, = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["nvae.status"] == "finished"
    for metric in ("train_bpd", "val_bpd"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0, 1, 2], metric


@pytest.mark.slow
def test_a_studys_trial_whose_store_stays_down_is_resumed_by_the_same_command_not_reported_failed(
        bucket, s3_store, tmp_path, commands):
    """As above, for a study: the trial fails naming the store, but its failure is not its result
    (no outcome file): the same command resumes it after epoch 0 and its MLflow run ends FINISHED."""
    proxy, _, out = _store_down_after_epoch_0(s3_store, bucket, _study, tmp_path, commands)
    said = [line for line in out.splitlines() if "failed: the run's storage" in line and "cannot be reached" in line]
    assert said and f"at 127.0.0.1:{proxy.port}" in said[-1] and "run the same command" in said[-1], out[-5000:]
    assert "Traceback" not in out, out[-5000:]  # Tune, ending, met the store too: said in one line, not its traceback
    (ended,) = [line for line in out.splitlines() if line.startswith("[study] the study's storage s3://nvae/runs/")]
    assert f"at 127.0.0.1:{proxy.port} cannot be reached" in ended and "run the same command" in ended
    assert not [f for f in _files(bucket, "nvae/runs") if f.endswith("/outcome.json")]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("ablation_sr").experiment_id
    (child,) = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FAILED", out[-5000:]

    second = _study(tmp_path, f"http://127.0.0.1:{proxy.port}", commands)  # the same command
    out = _finish(second)
    assert second.returncode == 0 and "1 finished" in out, out[-5000:]
    (trial,) = {f.split("/trials/")[1].split("/")[0] for f in _whole_checkpoints(bucket)}
    history = [c.metrics for c in epoch_checkpoints(next(
        f"s3://nvae/runs/{f.split('/trials/')[0]}/trials/{trial}" for f in _whole_checkpoints(bucket)))]
    assert [m["epoch"] for m in history] == [0, 1, 2] and history[-1]["start_epoch"] >= 1  # resumed
    child = client.get_run(child.info.run_id)
    assert child.info.status == "FINISHED" and child.data.tags["nvae.status"] == "finished"
    assert "nvae.error" not in child.data.tags
    for metric in ("train_bpd", "val_bpd"):
        assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == [0, 1, 2], metric
