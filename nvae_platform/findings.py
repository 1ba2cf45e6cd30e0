"""A finding: a claim of the paper that a study tests, as data beside its factors.

    Finding("bn_beats_wn", "BN has lower test bpd than WN",
            rows={"norm_act": ("BN+ELU", "BN+Swish")}, than={"norm_act": "WN+ELU"}, direction="lower")

A claim compares the study's rows: `rows` against `than` (the same factors, each a level or a tuple
of levels; every pair is one comparison), by a metric the trials log (test_bpd, train_kl,
active_units, ...) or by DIVERGED, the count of diverged trials. It holds at every level of the
factors in `at_every` (one comparison per level), only at the levels `at` fixes (HIGHEST and LOWEST
name a factor's extreme level at every scale), and pooled over every factor it does not name.
Light (no torch, Ray or MLflow): reports read findings back from a study's record (to_json/from_json).
"""
import json
from dataclasses import asdict, dataclass, field
from itertools import product

DIVERGED = "diverged"  # the metric of a claim about the count of diverged trials
HIGHEST, LOWEST = "<highest>", "<lowest>"  # in `at`: a factor's extreme level (numeric order, else declared)
# direction -> (the sign of Δ = rows - than the claim expects, the margin's sign at the boundary)
DIRECTIONS = {"lower": -1, "higher": 1, "not lower": 1, "not higher": -1}
SOURCES = ("summary", "recalled")


@dataclass(frozen=True)
class Finding:
    """One claim of the paper (see module doc). "not lower"/"not higher" claim the rows are not
    lower (higher) than `than` by more than `margin` (in the metric's units); source "recalled" marks a
    claim recalled from the paper, not confirmed against a copy, and every report says so."""

    name: str
    claim: str
    rows: dict
    than: dict
    direction: str = "lower"
    metric: str = "test_bpd"
    at_every: tuple = ()
    at: dict = field(default_factory=dict)
    margin: float = 0.0
    source: str = "summary"

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(f"Finding {self.name!r}: {problem}")

    def problem(self):
        """What is wrong with the finding's form (not its levels), or None."""
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            return "a name is letters, digits, '_' and '-'"
        if self.direction not in DIRECTIONS:
            return f"direction {self.direction!r}: expected one of {', '.join(DIRECTIONS)}"
        if self.source not in SOURCES:
            return f"source {self.source!r}: expected one of {', '.join(SOURCES)}"
        if not self.rows or set(self.rows) != set(self.than):
            return "rows and than name the same factors (at least one)"
        if self.direction.startswith("not") and not self.margin > 0:
            return f"direction {self.direction!r} needs a margin > 0 (the difference that would count)"
        if self.metric == DIVERGED and self.direction.startswith("not"):
            return "a count of diverged trials is claimed 'higher' or 'lower'"
        named = set(self.rows) | set(self.at) | set(self.at_every)
        if len(named) < len(self.rows) + len(self.at) + len(self.at_every):
            return "a factor is named twice among rows, at and at_every"
        return None

    @property
    def sign(self):
        return DIRECTIONS[self.direction]

    @property
    def boundary(self):
        """The Δ the claim is tested against: 0, or -margin for "not lower", +margin for "not higher"."""
        return -self.sign * self.margin if self.direction.startswith("not") else 0.0

    def what(self):
        """The claim in words, marked when recalled."""
        return self.claim + (" (recalled from the paper, not confirmed against a copy)" if self.source == "recalled"
                             else "")


def _levels(spec):
    return list(spec) if isinstance(spec, (tuple, list)) else [spec]


def extreme(levels, which):
    """The highest or lowest of a factor's level names: by value when all are numbers, else declared order."""
    try:
        ordered = sorted(levels, key=float)
    except ValueError:
        ordered = list(levels)
    return ordered[-1] if which == HIGHEST else ordered[0]


def level_errors(finding, levels):
    """The unknown factors and levels a finding names, as lines, given {factor: [level names]}."""
    errors = []
    for part, specs in (("rows", finding.rows), ("than", finding.than), ("at", finding.at),
                        ("at_every", dict.fromkeys(finding.at_every))):
        for factor, spec in specs.items():
            if factor not in levels:
                errors.append(f"finding {finding.name}: {part} names factor {factor!r}, which the study does not "
                              f"vary (its factors: {', '.join(levels)})")
                continue
            unknown = [str(v) for v in _levels(spec) if v is not None and v not in (HIGHEST, LOWEST)
                       and str(v) not in levels[factor]]
            if unknown:
                errors.append(f"finding {finding.name}: {part} names level(s) {', '.join(unknown)} of {factor}, "
                              f"expected some of {', '.join(levels[factor])}")
    return errors


def resolved(finding, levels):
    """The finding with HIGHEST/LOWEST replaced by level names and every level a string."""
    def names(spec, factor):
        values = [extreme(levels[factor], v) if v in (HIGHEST, LOWEST) else str(v) for v in _levels(spec)]
        return values[0] if len(values) == 1 else tuple(values)

    fix = {part: {f: names(spec, f) for f, spec in getattr(finding, part).items()} for part in ("rows", "than", "at")}
    return Finding(**{**asdict(finding), **fix, "at_every": tuple(finding.at_every)})


@dataclass(frozen=True)
class Comparison:
    """One comparison of a claim: label, and per pooled level the cells (level tuples) of each side."""

    label: str
    pairs: tuple  # ((cells of rows, cells of than), ...): one pair per level of the pooled factors


def comparisons(finding, levels):
    """The finding's comparisons over the study's levels ({factor: [names]} in the factors' order)."""
    factors = list(levels)
    pooled = [f for f in factors if f not in finding.rows and f not in finding.at and f not in finding.at_every]
    every = [f for f in factors if f in finding.at_every]
    out = []
    for a, b in product(product(*[_levels(finding.rows[f]) for f in finding.rows]),
                        product(*[_levels(finding.than[f]) for f in finding.than])):
        side_a, side_b = dict(zip(finding.rows, a)), dict(zip(finding.than, b))
        for held in product(*[levels[f] for f in every]):
            fixed = {**{f: str(v) for f, v in finding.at.items()}, **dict(zip(every, held))}
            pairs = []
            for rest in product(*[levels[f] for f in pooled]):
                common = {**fixed, **dict(zip(pooled, rest))}
                pairs.append((tuple({**common, **side_a}[f] for f in factors),
                              tuple({**common, **side_b}[f] for f in factors)))
            where = ", ".join(f"{f}={v}" for f, v in fixed.items())
            label = (" ".join(f"{v}" for v in a) + " vs " + " ".join(f"{v}" for v in b)
                     + (f" at {where}" if where else "") + (f" (pooled over {', '.join(pooled)})" if pooled else ""))
            out.append(Comparison(label, tuple(pairs)))
    return out


def to_json(findings):
    """The findings as JSON, for a study's record."""
    return json.dumps([asdict(f) for f in findings])


def from_json(text):
    """Findings back from to_json's text ('' or None: none)."""
    return [Finding(**{**d, "at_every": tuple(d["at_every"]),
                       **{k: {f: tuple(v) if isinstance(v, list) else v for f, v in d[k].items()}
                          for k in ("rows", "than", "at")}}) for d in json.loads(text or "[]")]
