"""nvae_platform.process_exit: a command ends with its code, its atexit handlers run, and its
objects are frozen rather than collected."""
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
