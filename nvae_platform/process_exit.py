"""Ending a command's process without the interpreter's final garbage collections.

A study's driver holds about 600,000 Python objects (torch, Ray, Tune, MLflow). The collections the
interpreter runs while it tears down its modules took 1.5 s on a 2-core machine, after every result
was recorded and Ray had shut down: a tenth of a smoke study's time outside training. Once triton is
imported (torchvision imports it; image-folder commands use torchvision) they run: nanobind, which
binds triton, prints a "leaked" line for every object of its types still alive when it unloads, and
it has no switch to silence them that Python can reach.
"""
import gc
import os
import signal
import sys


def exit_with(code):
    """sys.exit(code) with every live object frozen (gc.freeze): atexit handlers, Ray's shutdown
    among them, still run, and nothing is left for the final collections to walk."""
    if "triton" not in sys.modules:  # its nanobind bindings call every object alive at exit leaked: ~30 lines
        gc.freeze()
    sys.exit(code)


def end_now(code):
    """End the process at once with code, its output flushed: no atexit handler, no cleanup."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_TERMINATED = []  # set once SIGTERM arrived
_INTERRUPTS = []  # each SIGINT stop_once_on_sigint took


def stop_on_sigterm_as_on_sigint():
    """From now on SIGTERM (what `ray job stop`, Slurm, Kubernetes and systemd send) stops the command
    as Ctrl-C does: the same handler runs (Tune's, which ends the study cleanly). Call it after
    ray.init, whose own handler prints C++ lines and exits 1."""
    def on_sigterm(signum, frame):
        _TERMINATED.append(signum)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, on_sigterm)


def stop_once_on_sigint(stop):
    """From now on the first SIGINT (Ctrl-C, or SIGTERM turned into one) calls stop(), a second is
    ignored while the command ends as after one, and a third ends the process at once, quietly.
    An impatient user's second Ctrl-C otherwise interrupts the cleanup the first one started.
    (Python runs a handler between bytecodes: signals that arrive while the main thread waits in C
    code count as one.)"""
    def on_sigint(signum, frame):
        _INTERRUPTS.append(signum)
        if len(_INTERRUPTS) == 1:
            stop()
        elif len(_INTERRUPTS) >= 3:
            end_now(interrupted_code())

    signal.signal(signal.SIGINT, on_sigint)


def stopped_by_signal():
    """Whether SIGTERM, or a SIGINT that stop_once_on_sigint took, has arrived."""
    return bool(_TERMINATED or _INTERRUPTS)


def interrupted_code():
    """The exit code of an interrupted command: 143 after SIGTERM (128 + 15), else 130 (Ctrl-C)."""
    return 128 + signal.SIGTERM if _TERMINATED else 128 + signal.SIGINT
