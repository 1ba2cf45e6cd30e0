"""How a study's results are summed up, the same in its printed table and in the report: a mean over
seeds, and the Pareto front of a search. Light: reports import it."""
import statistics


def mean_sd(mean, sd, n):
    """'3.264 ± 0.012' (n > 1: the sample standard deviation), '3.264' for one value."""
    return f"{mean:.4g}" + (f" ± {sd:.2g}" if n > 1 else "")


def mean_sd_of(values):
    """mean_sd of a list of values; '-' when there are none."""
    if not values:
        return "-"
    return mean_sd(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def non_dominated(rows, objectives):
    """The rows (dicts of metrics) no other row beats on every objective ({metric: "min"/"max"});
    rows missing an objective take no part."""
    sign = {k: 1 if mode == "min" else -1 for k, mode in objectives.items()}
    done = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in objectives)]

    def dominates(a, b):
        pairs = [(sign[k] * a[k], sign[k] * b[k]) for k in objectives]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    return [r for r in done if not any(dominates(o, r) for o in done if o is not r)]
