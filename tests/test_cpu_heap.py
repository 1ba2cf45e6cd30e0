"""A CPU training process keeps its freed activation memory instead of faulting it in every step."""
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
from nvae_core.cpu_heap import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # warm-up steps
    activations = [torch.ones(2_000_000) for _ in range(10)]  # 10 x 8 MB, freed at the step's end
    del activations
before = faults()
for _ in range(3):
    activations = [torch.ones(2_000_000) for _ in range(10)]
    del activations
print(applied, faults() - before)
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    """80 MB of activations per step: ~20k page faults a step by default, none once kept."""
    pages_per_step = 10 * 8_000_000 // 4096
    _, default = _faults("default")
    applied, kept = _faults("keep")
    assert default > pages_per_step, "glibc's default returns the freed heap top to the kernel"
    assert applied == "True"
    assert kept < 0.05 * pages_per_step
