"""nvae_platform.process_exit: a command ends with its code, its atexit handlers run, and its
objects are frozen rather than collected; repeated stop signals."""
import signal
import subprocess
import sys

CODE = """
import atexit, gc
from nvae_platform.process_exit import exit_with
cycles = [[None] for _ in range(1000)]
for c in cycles:
    c[0] = c  # reference cycles: only the cyclic collector frees them
atexit.register(lambda: print("atexit ran", gc.get_freeze_count() >= 1000, flush=True))
exit_with(3)
"""


def test_exit_with_keeps_the_code_and_atexit_and_freezes_objects():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "atexit ran True"


def test_exit_with_after_triton_is_imported_prints_no_nanobind_leaks():
    triton = "import triton, triton.language\nfrom nvae_platform.process_exit import exit_with\nexit_with(0)"
    done = subprocess.run([sys.executable, "-c", triton], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "leaked" not in done.stderr, done.stderr


STOPS = """
import atexit, signal, time
from nvae_platform.process_exit import stop_once_on_sigint, stop_on_sigterm_as_on_sigint
atexit.register(lambda: print("atexit ran", flush=True))
stop_on_sigterm_as_on_sigint()
stop_once_on_sigint(lambda: print("stopping", flush=True))
for signum in SIGNALS:
    signal.raise_signal(signum)
    time.sleep(0.01)  # the handler runs between bytecodes
print("ended as after one stop", flush=True)
"""


def test_the_first_stop_signal_stops_a_second_is_ignored_and_a_third_ends_at_once_quietly():
    def run(*signals):
        code = STOPS.replace("SIGNALS", repr([int(s) for s in signals]))
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)

    twice = run(signal.SIGINT, signal.SIGINT)
    assert (twice.returncode, twice.stdout, twice.stderr) == (0, "stopping\nended as after one stop\natexit ran\n", "")
    thrice = run(signal.SIGTERM, signal.SIGINT, signal.SIGINT)
    assert (thrice.returncode, thrice.stdout, thrice.stderr) == (143, "stopping\n", "")  # no atexit, no traceback
