"""The machine a benchmark's figures were measured on: speed claims are ratios on one machine."""
import platform
import resource

import torch


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def reset_peak_memory(device):
    """Start the peak memory from now: CUDA's allocator peak, or the process's peak RSS (VmHWM)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets the process's peak resident set size
    except OSError:
        pass  # elsewhere the process's peak since its start (ru_maxrss)


def peak_memory_gb(device):
    """GB at the peak since reset_peak_memory: CUDA max allocated, or the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB on Linux
