"""Pareto fronts: which results no other beats on every objective (light: reports import it)."""


def non_dominated(rows, objectives):
    """The rows (dicts of metrics) no other row beats on every objective ({metric: "min"/"max"});
    rows missing an objective take no part."""
    sign = {k: 1 if mode == "min" else -1 for k, mode in objectives.items()}
    done = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in objectives)]

    def dominates(a, b):
        pairs = [(sign[k] * a[k], sign[k] * b[k]) for k in objectives]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    return [r for r in done if not any(dominates(o, r) for o in done if o is not r)]
