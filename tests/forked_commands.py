"""Entry points run as commands without paying for their imports each time (a test helper).

A server process imports the entry points once (run under another name than __main__, so only their
imports and declarations run), then forks a fresh process per command. The fork runs the script as
__main__ with the command's argv, environment, working folder, stdout and stderr, and ends as the
interpreter ends any script (its exit code, a SystemExit message or a traceback on stderr, threads
joined, atexit handlers run) but without tearing the inherited modules down. The saving is the
import of torch, Ray and MLflow (about 5 s a command here) and that teardown (1.5 s);
tests/test_front_door.py checks that a case gives the same answer either way.

    with ForkedCommands([script, ...]) as commands:
        result = commands.run(script, args, cwd=folder, env=environment)  # a CompletedProcess
        process = commands.start([sys.executable, script, *args], folder, environment)  # as Popen gives it
"""
import atexit
import contextlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback


class ForkedCommands:
    """The server, started on entry and stopped on exit; start() is one command, run() one to its end."""

    def __init__(self, scripts):
        self.scripts = [str(s) for s in scripts]
        self.lock = threading.Lock()  # one request at a time on the server's pipes

    def __enter__(self):
        self.server = subprocess.Popen([sys.executable, __file__, *self.scripts], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.server.stdout.readline()
        assert ready.strip() == "ready", f"the command server did not start: {ready!r}"
        return self

    def __exit__(self, *exc):
        self.server.stdin.close()
        self.server.wait(timeout=30)

    def run_argv(self, argv, cwd, env, timeout=120):
        """run() for an argv as subprocess takes it: [sys.executable, script, *args]."""
        assert argv[0] == sys.executable, argv
        return self.run(argv[1], argv[2:], cwd, env, timeout)

    def run(self, script, args, cwd, env, timeout=120):
        """script run as `python script *args` in cwd with env: a CompletedProcess with its text output."""
        process = self.start([sys.executable, str(script), *args], cwd, env, timeout=timeout)
        out, err = process.communicate(timeout=timeout + 30)  # the server kills it after timeout
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def start(self, argv, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900):
        """argv ([sys.executable, script, *args]) started as subprocess.Popen(argv, cwd=cwd, env=env,
        stdout=stdout, stderr=stderr, text=True, start_new_session=True) starts it: a ForkedProcess.
        stdout is PIPE, DEVNULL or an open file; stderr also STDOUT. Killed after timeout seconds."""
        assert argv[0] == sys.executable, argv
        folder = tempfile.TemporaryDirectory(prefix="forked-")
        streams = {"stdout": _stream_path(stdout, folder.name, "stdout"),
                   "stderr": None if stderr == subprocess.STDOUT else _stream_path(stderr, folder.name, "stderr")}
        request = {"script": str(argv[1]), "args": [str(a) for a in argv[2:]], "cwd": str(cwd), "env": env,
                   **streams, "returncode": os.path.join(folder.name, "returncode"), "timeout": timeout}
        with self.lock:
            self.server.stdin.write(json.dumps(request) + "\n")
            # The server opens the pipes' writing ends in this order; each open waits for the other end.
            pipes = {name: open(path) for name, path in streams.items()
                     if path and path.startswith(folder.name)}
            pid = json.loads(self.server.stdout.readline())["pid"]
        return ForkedProcess(argv, pid, folder, request["returncode"], pipes)


def _stream_path(stream, folder, name):
    """Where the fork writes a stream: a named pipe in folder for PIPE, else /dev/null or the file's path."""
    if stream == subprocess.PIPE:
        os.mkfifo(os.path.join(folder, name))
        return os.path.join(folder, name)
    if stream == subprocess.DEVNULL:
        return os.devnull
    return os.path.abspath(stream.name)


class ForkedProcess:
    """A forked command as subprocess.Popen shows one: args, pid (its process group's too), stdout and
    stderr (text pipes, when asked for), returncode, poll(), wait(), communicate(), send_signal().
    Its exit code comes from the server, which is its parent, through a file in folder (held here,
    with its pipes, until the process object goes)."""

    def __init__(self, args, pid, folder, returncode_path, pipes):
        self.args, self.pid, self.folder, self.returncode_path = args, pid, folder, returncode_path
        self.stdout, self.stderr = pipes.get("stdout"), pipes.get("stderr")
        self.returncode, self.output, self.readers = None, {}, None

    def poll(self):
        """The exit code once it has ended, else None."""
        if self.returncode is None and os.path.exists(self.returncode_path):
            with open(self.returncode_path) as f:
                self.returncode = int(f.read())
        return self.returncode

    def wait(self, timeout=None):
        """The exit code, waited for; subprocess.TimeoutExpired after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def communicate(self, timeout=None):
        """(stdout, stderr) read to their ends (None where not a pipe), then the exit code waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.readers is None:
            self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                            for name in ("stdout", "stderr") if getattr(self, name) is not None]
            for reader in self.readers:
                reader.start()
        for reader in self.readers:
            reader.join(_left(deadline))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(_left(deadline))
        return self.output.get("stdout"), self.output.get("stderr")

    def _read(self, name):
        with getattr(self, name) as stream:
            self.output[name] = stream.read()

    def send_signal(self, signum):
        """signum to the command's pid, once it has not ended."""
        if self.poll() is None:
            os.kill(self.pid, signum)


def _left(deadline):
    """Seconds to a time.monotonic() deadline (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# Ray reads its authentication mode once per process, as it is imported; ray.init then writes it to
# os.environ (RAY_AUTH_MODE=token), so a test process that ran Ray passes it on. A fork keeps the
# server's mode, whatever its command's environment says.
_RAY_AUTH_MODE = "RAY_AUTH_MODE"
_SERVER_AUTH_MODE = None  # the server's, read before it imports Ray


def _serve(scripts):
    global _SERVER_AUTH_MODE
    _SERVER_AUTH_MODE = os.environ.get(_RAY_AUTH_MODE)
    for script in scripts:
        runpy.run_path(script, run_name="preloaded")  # imports and declarations, not the command
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # a pipe waits for its reader
        stderr = stdout if request["stderr"] is None else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT |
                                                                  os.O_APPEND, 0o600)
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _become(request, stdout, stderr)  # never returns: the script's end is this process's end
        for fd in {stdout, stderr}:
            os.close(fd)
        threading.Thread(target=_reap, args=(pid, request), daemon=True).start()
        print(json.dumps({"pid": pid}), flush=True)


def _become(request, stdout, stderr):
    """In the fork: the command's streams, folder, environment and argv, then the script as __main__."""
    os.setsid()  # its own process group and session, as start_new_session gives a subprocess
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    for fd in {stdout, stderr} - {1, 2}:
        os.close(fd)
    os.chdir(request["cwd"])
    tempfile.tempdir = None  # read again from the command's TMPDIR
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(_RAY_AUTH_MODE, None)
    if _SERVER_AUTH_MODE is not None:
        os.environ[_RAY_AUTH_MODE] = _SERVER_AUTH_MODE
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
    try:
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as end:  # as the interpreter reads it
        code = end.code if isinstance(end.code, int) else 0 if end.code is None else 1
        if not isinstance(end.code, int | None):
            print(end.code, file=sys.stderr)
    except KeyboardInterrupt:  # uncaught: the interpreter ends by SIGINT, as Python 3.8+ does
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - an uncaught error: its traceback and exit 1
        traceback.print_exc()
        code = 1
    # The interpreter's end without its teardown: non-daemon threads joined, atexit handlers, streams
    # flushed. Tearing down the inherited modules would copy every page of them (1.5 s a command).
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _reap(pid, request):
    """Wait for the fork's end (killed, with its process group, after its timeout); its exit code,
    negative for a signal as subprocess gives it, written to the request's returncode file."""
    def kill():
        with contextlib.suppress(ProcessLookupError):  # it ended as the timer rang
            os.killpg(pid, signal.SIGKILL)

    timer = threading.Timer(request["timeout"], kill)
    timer.daemon = True  # the server's end does not wait for it
    timer.start()
    _, status = os.waitpid(pid, 0)
    timer.cancel()
    with open(request["returncode"] + ".part", "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(request["returncode"] + ".part", request["returncode"])  # whole, or not there


if __name__ == "__main__":
    _serve(sys.argv[1:])
