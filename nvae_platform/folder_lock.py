"""One command at a time in a study's (or a training run's) folder: a lock file where its state lives.

A second invocation of the same study in the same folder (a double-clicked job, a scheduler that
retries a submission) would train the same trials and write the same checkpoints and MLflow runs.
The first takes `<folder>/.lock` (its host, pid and start time) before Ray starts; the second is
refused in one line naming them (exit 2). The lock is released when the command ends: normally, on a
failure, on Ctrl-C or SIGTERM. A holder that is gone (SIGKILL, a lost machine) leaves it, and the next
invocation takes it over and resumes:
- a lock of this host is gone when its pid runs no more (or runs a process started after the lock:
  the pid was reused);
- a lock of another host (a shared folder, s3://) is gone when it was not renewed for STALE_SECONDS;
  its holder renews it every RENEW_SECONDS.

A local (or NFS) folder's lock is created atomically (a hard link). pyarrow's object stores have no
create-if-absent: there the lock is written, read back after SETTLE_SECONDS, and the last writer
holds it, the others refuse.
"""
import atexit
import json
import os
import secrets
import socket
import threading
import time

import psutil
import pyarrow.fs

from nvae_platform.storage import open_storage

LOCK_FILE = ".lock"
RENEW_SECONDS = 30
STALE_SECONDS = 120
SETTLE_SECONDS = 0.5


def unique_name(prefix):
    """prefix-host-pid-random: a probe file or tag that no other process, here or elsewhere, uses."""
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class AlreadyRunning(ValueError):
    """The folder's lock is held by a command that still runs."""


class FolderLock:
    """`<folder>/.lock` for the command `what` names ("study ablation_sr-smoke-0c480221"); folder is a
    local path or a pyarrow URI (s3://, gs://)."""

    def __init__(self, folder, what):
        self.folder, self.what = folder.split("?")[0].rstrip("/"), what  # as the user knows it: no URI options
        self.filesystem, base = open_storage(folder)
        self.base = base.rstrip("/")
        self.path = f"{self.base}/{LOCK_FILE}"
        self.local = isinstance(self.filesystem, pyarrow.fs.LocalFileSystem)
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                     "token": secrets.token_hex(8)}
        self.stop = threading.Event()
        self.held = False

    def acquire(self):
        """Take the lock or raise AlreadyRunning naming its holder. Returns the holder a lock was taken
        over from ({"host", "pid", "started"}), else None."""
        self.filesystem.create_dir(self.base, recursive=True)
        taken_over = None
        for _ in range(3):  # another invocation may create or take over the lock between our steps
            held = self._read()
            if held is not None:
                holder, age = held
                if not self._gone(holder, age):
                    raise AlreadyRunning(self._refusal(holder, age))
                taken_over = holder
            if self._create(taken_over if held else None):
                break
        else:
            raise AlreadyRunning(f"{self.what}: {self.folder}/{LOCK_FILE} keeps changing hands: another "
                                 "invocation of this command is starting there; wait for it, or stop it")
        self.held = True
        self.renewing = threading.Thread(target=self._renew, name="nvae-lock-renew", daemon=True)
        self.renewing.start()
        atexit.register(self.release)
        return taken_over

    def release(self):
        """Delete the lock if this process still holds it; never raises (it runs at exit)."""
        if not self.held:
            return
        self.held = False
        self.stop.set()
        self.renewing.join(timeout=10)  # a renewal in flight would write the lock again
        # One attempt per request: a store that is down at exit is not waited out. A lock left
        # behind is taken over by the next invocation (on this host at once, elsewhere when stale).
        filesystem = _one_attempt(self.filesystem)
        try:
            held = self._read(filesystem)
            if held is not None and held[0].get("token") == self.mine["token"]:
                filesystem.delete_file(self.path)
        except OSError:
            pass

    def _read(self, filesystem=None):
        """(holder, age in seconds) of the lock file, None when there is none. A file that cannot be
        parsed has an empty holder: it is judged by its age alone."""
        filesystem = filesystem or self.filesystem
        try:
            info = filesystem.get_file_info(self.path)
            if info.type == pyarrow.fs.FileType.NotFound:
                return None
            with filesystem.open_input_stream(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        holder = _parse(text)
        mtime = info.mtime.timestamp() if info.mtime else time.time()
        return holder, max(0.0, time.time() - mtime)

    def _gone(self, holder, age):
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return age > STALE_SECONDS
        if pid == os.getpid():
            return True  # this very process (a study run twice from one program)
        try:
            process = psutil.Process(pid)
            return (process.status() == psutil.STATUS_ZOMBIE
                    or process.create_time() > float(holder.get("started", 0)) + 1)  # a reused pid
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False  # not ours to judge (access denied): it runs

    def _refusal(self, holder, age):
        host, pid = holder.get("host", "an unknown host"), holder.get("pid", "unknown")
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(holder.get("started", 0) or 0)))
        line = (f"{self.what} is already running in {self.folder}: pid {pid} on host {host}, since {since}; "
                f"wait for it to end, or stop it (kill -INT {pid} on {host})")
        if host != socket.gethostname():
            line += (f"; its lock was renewed {age:.0f} s ago and is taken over once {STALE_SECONDS} s old, or "
                     f"delete {self.folder}/{LOCK_FILE} if that process is gone")
        return line

    def _create(self, stale):
        """Write this process's lock; True when it holds it. stale: the holder found gone, if any."""
        content = json.dumps(self.mine).encode()
        if not self.local:  # no create-if-absent: write, let rivals write, read back
            with self.filesystem.open_output_stream(self.path) as f:
                f.write(content)
            time.sleep(SETTLE_SECONDS)
            held = self._read()
            return held is not None and held[0].get("token") == self.mine["token"]
        if stale is not None:  # move it aside: of two invocations taking it over, one moves it
            aside = f"{self.path}.{self.mine['token']}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            with open(aside, "rb") as f:
                moved = _token(f.read())
            if moved != stale.get("token"):
                try:  # a rival's new lock, not the stale one: put it back
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                return False
            os.unlink(aside)
        draft = f"{self.path}.{self.mine['token']}"
        with open(draft, "wb") as f:
            f.write(content)
        try:
            os.link(draft, self.path)  # atomic: fails if the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(draft)

    def _renew(self):
        """Every RENEW_SECONDS, renew the lock's time while this process holds it."""
        while not self.stop.wait(RENEW_SECONDS):
            try:
                if self.local:
                    os.utime(self.path)
                else:
                    held = self._read()
                    if held is None or held[0].get("token") != self.mine["token"]:
                        return
                    with self.filesystem.open_output_stream(self.path) as f:
                        f.write(json.dumps(self.mine).encode())
            except OSError:
                return


def _parse(text):
    """The holder a lock file names, {} when it cannot be read as one."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _token(text):
    return _parse(text).get("token")


def _one_attempt(filesystem):
    """The same S3 filesystem, making one attempt per request (pyarrow's default retries a refused
    connection for 6 s); any other filesystem as it is."""
    if not isinstance(filesystem, pyarrow.fs.S3FileSystem):
        return filesystem
    try:
        options = filesystem.__reduce__()[1][0]  # its constructor's arguments, as pickling rebuilds it
        return pyarrow.fs.S3FileSystem(**options, retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1))
    except (TypeError, IndexError, KeyError):  # another pyarrow's pickling: the filesystem as it is
        return filesystem
