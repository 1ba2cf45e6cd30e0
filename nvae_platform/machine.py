"""The machine a benchmark's figures were measured on: speed claims are ratios on one machine."""
import platform


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
