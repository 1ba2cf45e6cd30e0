"""A verdict on each finding of a study: reproduced, contradicted or open, with its evidence.

    verdicts = judge(findings, trials, levels)                   # one-shot: the end of a study, a report
    lines = verdict_lines(verdicts)                              # the 'Findings' block
    wanted = next_round(findings, trials, levels, max_seeds=8)   # {row's levels tuple: seeds it needs}

`trials` is a pandas DataFrame, one row per trial: a column per factor (level names as strings),
`seed`, `status` ("finished", "diverged", "failed", ...) and `metrics.<name>` columns (as
reports/runs.py loads them). `levels` is {factor: [level names]} in the study's order; findings
are nvae_platform.findings.Finding, their levels resolved (findings.resolved).

The statistics (docs/findings.md says why):
- a metric comparison: Δ = mean(rows) - mean(than) over finished seeds, pooled over a factor as the
  mean of its levels' differences; Welch's t (Welch-Satterthwaite df) for the test and interval;
- a count of diverged trials: diverged / (finished + diverged) on each side, Fisher's exact test,
  one-sided in the claimed direction;
- reproduced: every comparison of the claim significant in the claimed direction at one-sided level
  a (an intersection-union test: no correction needed); contradicted: some comparison significant
  in the opposite direction at a / (number of comparisons) (Bonferroni); else open;
- a = ALPHA / 2 / looks: at most 2.5% false "reproduced" and 2.5% false "contradicted" per finding
  (5% in all), however many looks of a sequential run (`--until-decided`: Bonferroni spending over
  looks = looks_for(max_seeds); each look judges a comparison on the seeds all its rows share, so
  the looks are indexed by the seed count);
- an open finding says how many seeds per row would settle it: the smallest n whose simulated
  probability of a decided verdict reaches POWER, at the observed seed spread, for the effect the
  paper reports (`reference`, where it holds every row) or else the one observed.
"""
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from nvae_platform.findings import DIVERGED, comparisons

ALPHA = 0.05  # wrong decided verdicts per finding, both directions together
POWER = 0.8
MAX_ESTIMATE = 1000  # seeds per row beyond which an estimate says "more than"
SIMULATIONS = 2000
REPRODUCED, CONTRADICTED, OPEN = "reproduced", "contradicted", "open"
ENDED = ("finished", "diverged")  # outcomes of a trial; failed or interrupted ones say nothing of the claim


def looks_for(max_seeds):
    """Looks of a sequential run that adds seeds one at a time up to max_seeds (one per seed count)."""
    return max(1, int(max_seeds))


def level_key(cell, factors):
    """'norm_act=BN+Swish,groups=20': a row's name, as in the reference file."""
    return ",".join(f"{f}={v}" for f, v in zip(factors, cell))


@dataclass
class Verdict:
    """A finding's verdict and its evidence: a line per comparison, and for an open one what would settle
    it (`settle`, a line) and the seeds per row that would (`needs`: {row's levels tuple: seeds})."""

    finding: object
    verdict: str
    evidence: list
    settle: str = ""
    needs: dict = field(default_factory=dict)
    undecided: list = field(default_factory=list)  # the comparisons (findings.Comparison) not yet decided


# The statistics on arrays: a leading dimension holds simulated studies; one study is a 0-d array.

def welch_contrast(means, variances, counts, weights):
    """(estimate, squared standard error, Welch-Satterthwaite df) of sum(weights * means), the last
    axis holding the rows; variances are the rows' sample variances over counts seeds."""
    means, variances, counts = (np.asarray(x, dtype=float) for x in (means, variances, counts))
    terms = np.asarray(weights, dtype=float) ** 2 * variances / counts
    se2 = terms.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = se2**2 / (terms**2 / (counts - 1)).sum(-1)
    return (np.asarray(weights) * means).sum(-1), se2, df


def t_p_values(estimate, se2, df, boundary=0.0):
    """One-sided p-values (Δ below boundary, Δ above it); NaN where there is no variance to judge by,
    and 0/1 where the variance is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (estimate - boundary) / np.sqrt(se2)
        df = np.where(se2 == 0, 1.0, df)  # a constant sample: t is +-inf, any df gives 0 or 1
        return stats.t.cdf(t, df), stats.t.sf(t, df)


def fisher_p_values(diverged_a, ended_a, diverged_b, ended_b):
    """One-sided p-values of Fisher's exact test (rows diverge less, rows diverge more than `than`)."""
    total, hits = np.add(ended_a, ended_b), np.add(diverged_a, diverged_b)
    return (stats.hypergeom.cdf(diverged_a, total, hits, ended_a),
            stats.hypergeom.sf(np.subtract(diverged_a, 1), total, hits, ended_a))


def decide(finding, p_values, alpha):
    """REPRODUCED/CONTRADICTED/OPEN (arrays of them) from each comparison's (p below, p above): the rule
    of the module doc at one-sided level alpha. A NaN p-value decides nothing."""
    claim = [np.nan_to_num(p[0] if finding.sign < 0 else p[1], nan=1.0) for p in p_values]
    against = [np.nan_to_num(p[1] if finding.sign < 0 else p[0], nan=1.0) for p in p_values]
    reproduced = np.all([p <= alpha for p in claim], axis=0)
    contradicted = np.any([p <= alpha / len(p_values) for p in against], axis=0)
    return np.where(reproduced, REPRODUCED, np.where(contradicted, CONTRADICTED, OPEN))


# One study, from its trials.

def _cells(trials, factors):
    """{row's levels tuple: its trials}."""
    frame = trials.assign(seed=trials["seed"].astype(str))
    return {tuple(str(v) for v in (key if isinstance(key, tuple) else (key,))): group
            for key, group in frame.groupby(factors, sort=False)}


def _seeds(cells, cell):
    frame = cells.get(cell)
    return set() if frame is None else set(frame.loc[frame["status"].isin(ENDED), "seed"])


def _metric_row(frame, metric, seeds):
    """(finished values, diverged, ended) of a row's trials, restricted to `seeds` when given."""
    if frame is None:
        return [], 0, 0
    if seeds is not None:
        frame = frame[frame["seed"].isin(seeds)]
    column = f"metrics.{metric}"
    finished = frame[frame["status"] == "finished"]
    values = [] if column not in frame else [float(v) for v in finished[column] if not math.isnan(v)]
    return values, int((frame["status"] == "diverged").sum()), int(frame["status"].isin(ENDED).sum())


@dataclass
class _Measured:
    """A comparison's statistics in one study."""

    comparison: object
    pairs: tuple  # the level pairs judged: those with 2 finished seeds or more on both sides (metrics)
    estimate: float
    low: float
    high: float
    p: tuple
    text: str


def _measure(finding, comparison, cells, alpha, balanced):
    """A comparison's Δ, interval at level 1 - 2 alpha, p-values and evidence line."""
    all_cells = [c for pair in comparison.pairs for c in pair]
    seeds = set.intersection(*[_seeds(cells, c) for c in all_cells]) if balanced else None
    rows = {c: _metric_row(cells.get(c), finding.metric, seeds) for c in all_cells}
    if finding.metric == DIVERGED:
        a = [sum(rows[p[0]][i] for p in comparison.pairs) for i in (1, 2)]
        b = [sum(rows[p[1]][i] for p in comparison.pairs) for i in (1, 2)]
        p = tuple(float(x) for x in fisher_p_values(a[0], a[1], b[0], b[1])) if a[1] and b[1] else (math.nan,) * 2
        rate = [x / n if n else math.nan for x, n in (a, b)]
        shown = f"{p[1] if finding.sign > 0 else p[0]:.3g}" if a[1] and b[1] else "-"
        text = (f"{comparison.label}: diverged {a[0]}/{a[1]} vs {b[0]}/{b[1]} (Fisher's exact test: one-sided p "
                f"{shown}; decides at {alpha:.3g})")
        return _Measured(comparison, comparison.pairs, rate[0] - rate[1], math.nan, math.nan, p, text)
    usable = [pair for pair in comparison.pairs if all(len(rows[c][0]) >= 2 for c in pair)]
    k = len(usable)
    left_out = len(comparison.pairs) - k
    note = f"; {left_out} of its {len(comparison.pairs)} level pairs left out (fewer than 2 finished seeds)" \
        if left_out and k else ""
    seeds_text = " vs ".join("+".join(str(len(rows[pair[i]][0])) for pair in comparison.pairs) for i in (0, 1))
    if not k:
        text = (f"{comparison.label}: too few finished seeds to judge (finished seeds {seeds_text}; 2 per row "
                "needed)")
        return _Measured(comparison, comparison.pairs, math.nan, math.nan, math.nan, (math.nan, math.nan), text)
    used = [c for pair in usable for c in pair]
    weights = [w / k for _ in usable for w in (1, -1)]
    estimate, se2, df = welch_contrast([np.mean(rows[c][0]) for c in used],
                                       [np.var(rows[c][0], ddof=1) for c in used], [len(rows[c][0]) for c in used],
                                       weights)
    estimate, se2, df = float(estimate), float(se2), float(df)
    half = float(stats.t.ppf(1 - alpha, df)) * math.sqrt(se2) if se2 > 0 else 0.0
    p = tuple(float(x) for x in t_p_values(estimate, se2, df, finding.boundary))
    text = (f"{comparison.label}: Δ {finding.metric} {estimate:+.3g} [{estimate - half:+.3g}, {estimate + half:+.3g}] "
            f"({100 * (1 - 2 * alpha):.4g}% interval), finished seeds {seeds_text}{note}")
    return _Measured(comparison, tuple(usable), estimate, estimate - half, estimate + half, p, text)


def judge(findings, trials, levels, looks=1, reference=None, study="", power=True):
    """A Verdict per finding (see module doc); `reference` {(study, level key, metric): value} gives the
    paper's effects for the seeds an open finding needs; power=False skips that estimate."""
    factors = list(levels)
    cells = _cells(trials, factors) if len(trials) else {}
    alpha = ALPHA / 2 / looks
    verdicts = []
    for finding in findings:
        measured = [_measure(finding, c, cells, alpha, looks > 1) for c in comparisons(finding, levels)]
        verdict = str(decide(finding, [m.p for m in measured], alpha))
        claimed = [np.nan_to_num(m.p[0] if finding.sign < 0 else m.p[1], nan=1.0) <= alpha for m in measured]
        undecided = [m.comparison for m, ok in zip(measured, claimed) if not ok]
        found = Verdict(finding, verdict, [m.text for m in measured], undecided=undecided if verdict == OPEN else [])
        if verdict == OPEN and power:
            found.settle, found.needs = seeds_to_settle(finding, measured, cells, factors, alpha, reference, study)
        verdicts.append(found)
    return verdicts


def _row_spread(cells, cell, metric):
    values = _metric_row(cells.get(cell), metric, None)[0]
    return (float(np.mean(values)), float(np.std(values, ddof=1))) if len(values) >= 2 else None


def _simulate(finding, measured, means, sds, n, alpha, rng):
    """The share of SIMULATIONS studies with n seeds per row whose verdict is decided."""
    draws = {}
    for cell, mean in means.items():
        if finding.metric == DIVERGED:
            draws[cell] = rng.binomial(n, mean, SIMULATIONS)
        else:
            draws[cell] = (rng.normal(mean, sds[cell] / math.sqrt(n), SIMULATIONS),
                           sds[cell] ** 2 * rng.chisquare(n - 1, SIMULATIONS) / (n - 1))
    p_values = []
    for m in measured:
        pairs = m.pairs
        if finding.metric == DIVERGED:
            a, b = sum(draws[p[0]] for p in pairs), sum(draws[p[1]] for p in pairs)
            p_values.append(fisher_p_values(a, n * len(pairs), b, n * len(pairs)))
        else:
            used = [c for pair in pairs for c in pair]
            weights = [w / len(pairs) for _ in pairs for w in (1, -1)]
            estimate, se2, df = welch_contrast(np.stack([draws[c][0] for c in used], -1),
                                               np.stack([draws[c][1] for c in used], -1), [n] * len(used), weights)
            p_values.append(t_p_values(estimate, se2, df, finding.boundary))
    return float(np.mean(decide(finding, p_values, alpha) != OPEN))


def seeds_to_settle(finding, measured, cells, factors, alpha, reference=None, study=""):
    """(a line saying what would settle an open finding, {row: seeds per row}); see module doc."""
    rows = list(dict.fromkeys(c for m in measured for pair in m.pairs for c in pair))
    need_rows = list(dict.fromkeys(c for m in measured for pair in m.pairs for c in pair
                                   if not _claimed(finding, m, alpha)))
    names = ", ".join(level_key(c, factors) for c in need_rows)
    if finding.metric == DIVERGED:
        means = {}
        for c in rows:
            _, diverged, ended = _metric_row(cells.get(c), DIVERGED, None)
            means[c] = diverged / ended if ended else math.nan
        sds, source = {}, "the divergence rates observed"
        if any(math.isnan(v) for v in means.values()):
            return f"to settle: at least one ended trial in each of {names}", {c: 1 for c in need_rows}
    else:
        spread = {c: _row_spread(cells, c, finding.metric) for c in rows}
        missing = [c for c, s in spread.items() if s is None]
        if missing:
            where = ", ".join(level_key(c, factors) for c in missing)
            return f"to settle: 2 finished seeds or more in {where} (to measure the seed spread)", {c: 2 for c in missing}
        sds = {c: s[1] for c, s in spread.items()}
        paper = {c: (reference or {}).get((study, level_key(c, factors), finding.metric)) for c in rows}
        if all(v is not None for v in paper.values()):
            means, source = paper, "the effect the paper reports"
        else:
            means, source = {c: s[0] for c, s in spread.items()}, "the effect observed"
    if len({round(v, 12) for v in means.values()}) == 1 and finding.boundary == 0:
        return f"to settle: no difference seen ({source}: none); no seed count can be estimated", {}
    rng = np.random.default_rng(0)
    n = max(2, min(MAX_ESTIMATE, max(len(_metric_row(cells.get(c), finding.metric, None)[0]) for c in rows) + 1))
    while _simulate(finding, measured, means, sds, n, alpha, rng) < POWER:
        if n >= MAX_ESTIMATE:
            return (f"to settle: more than {MAX_ESTIMATE} seeds per row at {source}",
                    {c: MAX_ESTIMATE for c in need_rows})
        n = min(MAX_ESTIMATE, n + max(1, n // 8))
    spread = "" if finding.metric == DIVERGED else " and the seed spread observed"
    return (f"to settle: about {n} seeds per row ({POWER:.0%} power, simulated, at {source}{spread}) in {names}",
            {c: n for c in need_rows})


def _claimed(finding, m, alpha):
    return np.nan_to_num(m.p[0] if finding.sign < 0 else m.p[1], nan=1.0) <= alpha


def next_round(findings, trials, levels, max_seeds):
    """{row's levels tuple: seed count} to train next in a sequential run: each row of an undecided
    comparison of an open finding gets one seed more than the fewest any row of that comparison has
    (so its rows stay level), up to max_seeds; {} when every finding is decided or at max_seeds."""
    factors = list(levels)
    cells = _cells(trials, factors) if len(trials) else {}
    wanted = {}
    for verdict in judge(findings, trials, levels, looks=looks_for(max_seeds), power=False):
        for comparison in verdict.undecided:
            rows = [c for pair in comparison.pairs for c in pair]
            target = min(max_seeds, min(len(_seeds(cells, c)) for c in rows) + 1)
            for c in rows:
                if len(_seeds(cells, c)) < target:
                    wanted[c] = max(wanted.get(c, 0), target)
    return wanted


def verdict_lines(verdicts):
    """The 'Findings' block: a line per finding, its evidence indented under it."""
    if not verdicts:
        return []
    rate = f"{ALPHA / 2:.1%}"
    lines = [f"Findings (docs/findings.md: at most {rate} false 'reproduced' and {rate} false 'contradicted' each):"]
    for v in verdicts:
        lines.append(f"  {v.finding.name}: {v.verdict.upper()}: {v.finding.what()}")
        lines += [f"    {line}" for line in v.evidence + ([v.settle] if v.settle else [])]
    return lines
