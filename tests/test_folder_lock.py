"""A study's or run's folder lock (nvae_platform/folder_lock.py), held by real processes: refused while
its holder runs, taken over once the holder is SIGKILLed or (another host's) no longer renewed,
released at exit. Both ways of creating it: a local folder's atomic link, and an object store's
write-and-read-back (forced on a local folder)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow.fs
import pytest

from nvae_platform import folder_lock
from nvae_platform.folder_lock import LOCK_FILE, STALE_SECONDS, AlreadyRunning, FolderLock, _one_attempt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """
import sys, time
from nvae_platform.folder_lock import FolderLock
lock = FolderLock(sys.argv[1], "study s")
lock.local = sys.argv[2] == "local"
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _holder(folder, kind, seconds=120):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), kind, str(seconds)], text=True,
                               stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    assert process.stdout.readline() == "held\n"
    return process


def _lock(folder, kind):
    lock = FolderLock(str(folder), "study s")
    lock.local = kind == "local"
    return lock


@pytest.mark.parametrize("kind", ["local", "object-store"])
def test_a_held_lock_refuses_names_its_holder_and_is_taken_over_once_the_holder_is_killed(kind, tmp_path):
    holder = _holder(tmp_path, kind)
    try:
        with pytest.raises(AlreadyRunning) as refused:
            _lock(tmp_path, kind).acquire()
        message = str(refused.value)
        assert "\n" not in message and f"study s is already running in {tmp_path}" in message
        assert f"pid {holder.pid} on host {socket.gethostname()}, since 20" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = _lock(tmp_path, kind)
    assert lock.acquire()["pid"] == holder.pid  # the holder it took over from
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists() and os.listdir(tmp_path) == []


def test_a_holder_that_ends_releases_the_lock(tmp_path):
    holder = _holder(tmp_path, "local", seconds=0)
    assert holder.wait() == 0
    assert not (tmp_path / LOCK_FILE).exists()
    assert _lock(tmp_path, "local").acquire() is None


def test_another_hosts_lock_is_judged_by_its_age(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "elsewhere", "pid": 7, "started": time.time(), "token": "t"}))
    with pytest.raises(AlreadyRunning) as refused:
        _lock(tmp_path, "local").acquire()
    assert "pid 7 on host elsewhere" in str(refused.value) and f"delete {path} if that process is gone" in str(
        refused.value)
    old = time.time() - STALE_SECONDS - 10
    os.utime(path, (old, old))
    lock = _lock(tmp_path, "local")
    assert lock.acquire()["host"] == "elsewhere"
    lock.release()


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path):
    lock = _lock(tmp_path, "local")
    lock.acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 7, "started": 0, "token": "other"}))
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("kind", ["local", "object-store"])
def test_a_held_lock_is_renewed_until_released(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(folder_lock, "RENEW_SECONDS", 0.1)
    lock = _lock(tmp_path, kind)
    lock.acquire()
    path = tmp_path / LOCK_FILE
    old = time.time() - STALE_SECONDS - 10
    os.utime(path, (old, old))
    time.sleep(1)
    assert time.time() - path.stat().st_mtime < 5  # renewed: another host would not take it over
    lock.release()
    assert not path.exists()


@pytest.fixture
def s3_folder(s3_store):
    """s3://nvae/study on a moto S3 server of its own (the object store branch on a real S3 API)."""
    return f"s3://nvae/study?endpoint_override=127.0.0.1:{s3_store.port}&scheme=http&region=us-east-1", s3_store.filesystem


def test_an_s3_folders_lock_refuses_is_taken_over_and_released(s3_folder):
    uri, filesystem = s3_folder
    holder = _holder(uri, "s3")
    try:
        with pytest.raises(AlreadyRunning) as refused:
            _lock(uri, "s3").acquire()
        assert f"study s is already running in s3://nvae/study: pid {holder.pid} on host " in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = _lock(uri, "s3")
    assert lock.acquire()["pid"] == holder.pid
    lock.release()
    assert filesystem.get_file_info(f"nvae/study/{LOCK_FILE}").type == pyarrow.fs.FileType.NotFound


def test_release_makes_one_attempt_per_request_to_an_object_store_that_is_down():
    """At exit a store that is down is not waited out: pyarrow's default retries a failed request
    (6 s for a refused connection); the filesystem release uses makes one attempt."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def hang_up():  # a store that drops every connection unanswered
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(connection)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        store = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{listener.getsockname()[1]}", scheme="http",
                                        region="us-east-1", access_key="k", secret_key="s")
        for filesystem in (store, _one_attempt(store)):
            connections.clear()
            with pytest.raises(OSError):
                filesystem.get_file_info(f"nvae/study/{LOCK_FILE}")
        assert len(connections) == 1  # the default made 3 here
    finally:
        listener.close()
