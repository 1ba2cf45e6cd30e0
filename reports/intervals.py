"""Is a difference between two configurations more than seed noise? Welch's t interval for the
difference of two means over seeds."""
import math
import statistics

from scipy import stats


def welch_interval(a, b, level=0.95):
    """(delta, low, high, df): delta = mean(a) - mean(b) and its `level` confidence interval by Welch's t
    (variances not assumed equal, df by Welch-Satterthwaite). With fewer than 2 values in either sample
    there is no variance: low, high and df are NaN (delta too if a sample is empty). Two constant samples
    give the zero-width interval [delta, delta] with df NaN."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if not a or not b:
        return math.nan, math.nan, math.nan, math.nan
    delta = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return delta, math.nan, math.nan, math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)  # squared standard errors
    if va + vb == 0:
        return delta, delta, delta, math.nan
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf((1 + level) / 2, df)) * math.sqrt(va + vb)
    return delta, delta - half, delta + half, df
