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
import traceback


class ForkedCommands:
    """The server, started on entry and stopped on exit; run() is one command."""

    def __init__(self, scripts):
        self.scripts = [str(s) for s in scripts]

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
        with tempfile.TemporaryDirectory() as folder:
            request = {"script": str(script), "args": [str(a) for a in args], "cwd": str(cwd), "env": env,
                       "stdout": os.path.join(folder, "stdout"), "stderr": os.path.join(folder, "stderr"),
                       "timeout": timeout}
            self.server.stdin.write(json.dumps(request) + "\n")
            answer = json.loads(self.server.stdout.readline())
            with open(request["stdout"]) as out, open(request["stderr"]) as err:
                return subprocess.CompletedProcess([sys.executable, script, *args], answer["returncode"],
                                                   out.read(), err.read())


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
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _become(request)  # never returns: the script's end is this process's end
        print(json.dumps({"returncode": _wait(pid, request["timeout"])}), flush=True)


def _become(request):
    """In the fork: the command's streams, folder, environment and argv, then the script as __main__."""
    os.setsid()  # its own process group and session, as start_new_session gives a subprocess
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        os.dup2(os.open(path, flags, 0o600), fd)
    os.chdir(request["cwd"])
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
    except BaseException:  # noqa: BLE001 - an uncaught error: its traceback and exit 1
        traceback.print_exc()
        code = 1
    # The interpreter's end without its teardown: non-daemon threads joined, atexit handlers, streams
    # flushed. Tearing down the inherited modules would copy every page of them (1.5 s a command).
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


def _wait(pid, timeout):
    """The fork's exit code, negative for a signal as subprocess gives it; killed after timeout seconds."""
    def kill(*_):
        with contextlib.suppress(ProcessLookupError):  # it ended as the alarm rang
            os.killpg(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, kill)
    signal.alarm(int(timeout))
    _, status = os.waitpid(pid, 0)
    signal.alarm(0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    _serve(sys.argv[1:])
