"""How a mean over seeds is written, the same in a study's printed table and in the report."""
import statistics


def mean_sd(mean, sd, n):
    """'3.264 ± 0.012' (n > 1: the sample standard deviation), '3.264' for one value."""
    return f"{mean:.4g}" + (f" ± {sd:.2g}" if n > 1 else "")


def mean_sd_of(values):
    """mean_sd of a list of values; '-' when there are none."""
    if not values:
        return "-"
    return mean_sd(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
