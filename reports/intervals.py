"""Is a difference between two configurations more than seed noise? Welch's t interval for the
difference of two means over seeds (nvae_platform.verdicts.welch_contrast, which the findings'
verdicts use too)."""
import math
import statistics

from scipy import stats

from nvae_platform.verdicts import welch_contrast


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
    _, se2, df = welch_contrast([0.0, 0.0], [statistics.variance(a), statistics.variance(b)], [len(a), len(b)], [1, -1])
    if se2 == 0:
        return delta, delta, delta, math.nan
    half = float(stats.t.ppf((1 + level) / 2, float(df))) * math.sqrt(se2)
    return delta, delta - half, delta + half, float(df)
