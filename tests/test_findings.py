"""Findings and their verdicts, without Ray: made-up studies written to a real MLflow store (the
report's path), Fisher's test on diverged counts, the seeds an open verdict names (confirmed by an
independent simulation), the sequential rule's error rate (simulated), and bad findings refused."""
import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nvae_core import ConfigError
from nvae_platform.findings import DIVERGED, HIGHEST, LOWEST, Finding, comparisons, from_json, to_json
from nvae_platform.study import Factor, Study, field_factor
from nvae_platform.study.declaration import study_findings
from nvae_platform.verdicts import (
    ALPHA,
    CONTRADICTED,
    OPEN,
    REPRODUCED,
    decide,
    judge,
    looks_for,
    next_round,
    t_p_values,
    welch_contrast,
)
from reports.__main__ import main
from reports.build import build_report
from reports.runs import load_studies
from tests.test_reports import record_study

SEEDS = {"BN+Swish": [3.10, 3.11, 3.12, 3.09, 3.13],  # clearly below BN+ELU
         "BN+ELU": [3.20, 3.24, 3.18, 3.22, 3.21],
         "WN+ELU": [3.25, 3.21, 3.26, 3.19, 3.24]}  # within seed noise of BN+ELU
FINDINGS = [
    Finding("swish_beats_elu", "BN+Swish has lower test bpd than BN+ELU",
            rows={"norm_act": "BN+Swish"}, than={"norm_act": "BN+ELU"}, source="recalled"),
    Finding("elu_beats_swish", "BN+ELU has lower test bpd than BN+Swish",
            rows={"norm_act": "BN+ELU"}, than={"norm_act": "BN+Swish"}),
    Finding("bn_beats_wn", "BN+ELU has lower test bpd than WN+ELU", rows={"norm_act": "BN+ELU"},
            than={"norm_act": "WN+ELU"}),
]


@pytest.fixture()
def store(tmp_path):
    trials = [(name, seed, "finished", value) for name, values in SEEDS.items() for seed, value in enumerate(values)]
    return record_study(tmp_path, {"norm_act": list(SEEDS)}, trials, {"norm_act": "BN+Swish"},
                        extra={"findings": to_json(FINDINGS)})


def test_a_clear_effect_is_reproduced_its_opposite_contradicted_and_noise_open(store):
    uri, _ = store
    study = load_studies("ablation_norm", uri)[0]
    assert study.findings == FINDINGS  # read back from the parent run
    verdicts = {v.finding.name: v for v in judge(study.findings, study.trials, study.levels)}
    assert {name: v.verdict for name, v in verdicts.items()} == {
        "swish_beats_elu": REPRODUCED, "elu_beats_swish": CONTRADICTED, "bn_beats_wn": OPEN}
    delta, low, high, _ = welch_interval_by_hand(SEEDS["BN+Swish"], SEEDS["BN+ELU"])
    assert verdicts["swish_beats_elu"].evidence == [
        f"BN+Swish vs BN+ELU: Δ test_bpd {delta:+.3g} [{low:+.3g}, {high:+.3g}] (95% interval), finished seeds 5 vs 5"]
    open_one = verdicts["bn_beats_wn"]
    assert open_one.settle.startswith("to settle: about ") and "at the effect observed" in open_one.settle
    assert set(open_one.needs) == {("BN+ELU",), ("WN+ELU",)} and verdicts["swish_beats_elu"].settle == ""


def welch_interval_by_hand(a, b):
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    delta = np.mean(a) - np.mean(b)
    return delta, delta - half, delta + half, df


def test_the_seeds_an_open_verdict_names_reach_80_percent_power(store):
    """An independent simulation (scipy's Welch test) at the named seed count, the observed means and spreads."""
    uri, _ = store
    study = load_studies("ablation_norm", uri)[0]
    verdict = next(v for v in judge(FINDINGS, study.trials, study.levels) if v.finding.name == "bn_beats_wn")
    n = verdict.needs[("BN+ELU",)]
    assert 10 < n < 200 and f"about {n} seeds per row" in verdict.settle

    def power(seeds):
        rng = np.random.default_rng(7)
        a = rng.normal(np.mean(SEEDS["BN+ELU"]), np.std(SEEDS["BN+ELU"], ddof=1), (4000, seeds))
        b = rng.normal(np.mean(SEEDS["WN+ELU"]), np.std(SEEDS["WN+ELU"], ddof=1), (4000, seeds))
        return np.mean(stats.ttest_ind(a, b, axis=1, equal_var=False, alternative="less").pvalue <= ALPHA / 2)

    assert 0.78 <= power(n) <= 0.9 and power(max(2, round(n * 0.8))) < 0.8


def test_the_report_opens_with_the_findings_everywhere(store, capsys):
    uri, folder = store
    files = {os.path.basename(p): open(p).read() for p in build_report("ablation_norm", uri, out=str(folder / "o"))
             if not p.endswith(".png")}
    markdown = files["table.md"]
    assert markdown.startswith("Findings (docs/findings.md") and markdown.index("bn_beats_wn: OPEN") < markdown.index("| ")
    assert "  swish_beats_elu: REPRODUCED: BN+Swish has lower test bpd than BN+ELU (recalled from the paper" in markdown
    page = files["report.html"]
    assert page.index("<h2>Findings</h2>") < page.index("<table>") and "<b>elu_beats_swish: CONTRADICTED</b>" in page
    assert main(["ablation_norm", "--tracking-uri", uri, "--out", str(folder / "p")]) == 0
    printed = capsys.readouterr().out
    assert printed.index("bn_beats_wn: OPEN") < printed.index("| norm_act")


def test_a_study_without_findings_reports_as_before(tmp_path):
    uri, folder = record_study(tmp_path, {"norm_act": ["BN+Swish", "WN+ELU"]},
                               [("BN+Swish", 0, "finished", 3.10), ("WN+ELU", 0, "finished", 3.20)],
                               {"norm_act": "BN+Swish"})
    markdown = next(open(p).read() for p in build_report("ablation_norm", uri, out=str(folder / "o"))
                    if p.endswith("table.md"))
    assert markdown.startswith("ablation_norm (paper)") and "Findings" not in markdown


def sr_trials(counts):
    """A made-up ablation_sr: {lambda: (diverged, finished)} trials, finished ones at 3.0 bpd."""
    rows = []
    for level, (diverged, finished) in counts.items():
        statuses = ["diverged"] * diverged + ["finished"] * finished + ["failed"]  # a failed trial counts for nothing
        rows += [{"sr_lambda": level, "seed": str(i), "status": s, "metrics.test_bpd": 3.0 if s == "finished" else None}
                 for i, s in enumerate(statuses)]
    return pd.DataFrame(rows)


SR_LEVELS = {"sr_lambda": ["0.0", "0.01", "0.1"]}
STABILIZES = Finding("sr_stabilizes", "lambda 0 diverges more", rows={"sr_lambda": "0.0"},
                     than={"sr_lambda": ("0.01", "0.1")}, metric=DIVERGED, direction="higher")


def test_diverged_counts_are_judged_by_fishers_exact_test():
    found = judge([STABILIZES], sr_trials({"0.0": (5, 0), "0.01": (0, 5), "0.1": (0, 5)}), SR_LEVELS)[0]
    assert found.verdict == REPRODUCED
    p = 1 / math.comb(10, 5)  # all 5 diverged trials on lambda 0's side, by chance
    assert p == pytest.approx(stats.fisher_exact([[5, 0], [0, 5]], alternative="greater")[1])
    assert found.evidence[0] == f"0.0 vs 0.01: diverged 5/5 vs 0/5 (Fisher's exact test: one-sided p {p:.3g}; " \
                                "decides at 0.025)"
    against = judge([STABILIZES], sr_trials({"0.0": (0, 5), "0.01": (5, 0), "0.1": (0, 5)}), SR_LEVELS)[0]
    assert against.verdict == CONTRADICTED  # one comparison significant the other way: p 0.004 <= 0.025 / 2
    few = judge([STABILIZES], sr_trials({"0.0": (1, 0), "0.01": (0, 1), "0.1": (0, 1)}), SR_LEVELS)[0]
    assert few.verdict == OPEN and "at the divergence rates observed" in few.settle
    none = judge([STABILIZES], sr_trials({"0.0": (0, 2), "0.01": (0, 2), "0.1": (0, 2)}), SR_LEVELS)[0]
    assert none.verdict == OPEN and "no difference seen" in none.settle and none.needs == {}


def test_a_comparison_pools_over_the_factors_it_does_not_name_and_holds_at_every_level_of_at_every():
    levels = {"norm_act": ["WN+ELU", "BN+Swish"], "groups": ["2", "4", "8"], "flows": ["0", "1"]}
    finding = Finding("f", "BN lower", rows={"norm_act": "BN+Swish"}, than={"norm_act": "WN+ELU"},
                      at_every=("groups",), at={"flows": HIGHEST})
    from nvae_platform.findings import resolved
    found = comparisons(resolved(finding, levels), levels)
    assert [c.label for c in found] == [f"BN+Swish vs WN+ELU at flows=1, groups={g}" for g in ("2", "4", "8")]
    assert found[0].pairs == ((("BN+Swish", "2", "1"), ("WN+ELU", "2", "1")),)
    pooled = comparisons(Finding("g", "BN lower", rows={"norm_act": "BN+Swish"}, than={"norm_act": "WN+ELU"}), levels)
    assert len(pooled) == 1 and len(pooled[0].pairs) == 6 and pooled[0].label.endswith("(pooled over groups, flows)")


def test_a_pooled_difference_is_the_mean_of_its_levels_differences():
    rows = []
    for group, shift in (("2", 0.0), ("4", 1.0)):  # the levels differ a lot; the effect is 0.1 at each
        for seed, noise in enumerate((-0.01, 0.0, 0.01)):
            rows += [{"norm_act": "BN", "groups": group, "seed": seed, "status": "finished",
                      "metrics.test_bpd": 3.0 + shift + noise},
                     {"norm_act": "WN", "groups": group, "seed": seed, "status": "finished",
                      "metrics.test_bpd": 3.1 + shift - noise}]
    levels = {"norm_act": ["BN", "WN"], "groups": ["2", "4"]}
    found = judge([Finding("f", "BN lower", rows={"norm_act": "BN"}, than={"norm_act": "WN"})], pd.DataFrame(rows),
                  levels)[0]
    assert found.verdict == REPRODUCED and "Δ test_bpd -0.1 [" in found.evidence[0]


def test_findings_at_each_scale_name_levels_that_exist_there():
    study = Study("s", factors=(field_factor("groups", "num_groups_per_scale", [10, 20, 40], smoke_values=[2, 4, 8]),
                                Factor("act", {"ELU": {"activation": "elu"}, "Swish": {"activation": "swish"}})),
                  findings=(Finding("deep", "Swish lower at most groups", rows={"act": "Swish"}, than={"act": "ELU"},
                                    at={"groups": HIGHEST}),
                            Finding("shallow", "Swish lower at fewest", rows={"act": "Swish"}, than={"act": "ELU"},
                                    at={"groups": LOWEST})))
    assert [f.at for f in study_findings(study, "smoke")] == [{"groups": "8"}, {"groups": "2"}]
    assert [f.at for f in study_findings(study, "paper")] == [{"groups": "40"}, {"groups": "10"}]
    assert from_json(to_json(study_findings(study, "paper"))) == list(study_findings(study, "paper"))


@pytest.mark.parametrize("finding, message", [
    (Finding("x", "c", rows={"actv": "Swish"}, than={"actv": "ELU"}), ("finding x: rows names factor 'actv', which "
     "the study does not vary")),
    (Finding("x", "c", rows={"act": "GELU"}, than={"act": "ELU"}), r"finding x: rows names level\(s\) GELU of act, expected some of ELU, Swish"),
    (Finding("x", "c", rows={"act": "Swish"}, than={"act": "ELU"}, at={"groups": "40"}),
     r"finding x: at names level\(s\) 40 of groups, expected some of 2, 4, 8 \(at scale smoke\)"),
    (Finding("x", "c", rows={"act": "Swish"}, than={"act": "ELU"}, at_every=("group",)), "at_every names factor"),
])
def test_a_finding_naming_an_unknown_factor_or_level_is_refused_when_planned(finding, message):
    study = Study("s", factors=(field_factor("groups", "num_groups_per_scale", [10, 20, 40], smoke_values=[2, 4, 8]),
                                Factor("act", {"ELU": {"activation": "elu"}, "Swish": {"activation": "swish"}})),
                  findings=(finding,))
    with pytest.raises(ConfigError, match=message):
        study_findings(study, "smoke")


def test_plan_study_refuses_a_bad_finding_and_records_good_ones():
    from nvae_platform.study.plan import StudySettings, plan_study

    factors = (Factor("act", {"ELU": {"activation": "elu"}, "Swish": {"activation": "swish"}}),)
    good = Finding("swish", "Swish lower", rows={"act": "Swish"}, than={"act": "ELU"})
    plan = plan_study(Study("s", factors=factors, findings=(good,)), StudySettings(), check_data=False)
    assert from_json(plan.study_params()["findings"]) == [good]
    twice = Study("s", factors=factors, findings=(good, good))
    with pytest.raises(ConfigError, match="two findings are named 'swish'"):
        plan_study(twice, StudySettings(), check_data=False)


@pytest.mark.parametrize("fields, message", [
    (dict(direction="below"), "direction 'below': expected one of lower, higher"),
    (dict(source="memory"), "source 'memory': expected one of summary, recalled"),
    (dict(than={"groups": "4"}), "rows and than name the same factors"),
    (dict(direction="not lower"), "needs a margin > 0"),
    (dict(name="a b"), "a name is letters"),
    (dict(at={"act": "ELU"}), "a factor is named twice"),
])
def test_a_malformed_finding_is_refused_where_it_is_declared(fields, message):
    with pytest.raises(ValueError, match=message):
        Finding(**{"name": "x", "claim": "c", "rows": {"act": "Swish"}, "than": {"act": "ELU"}, **fields})


def test_the_ablation_studies_declare_their_findings_at_every_scale():
    import importlib.util

    declared = {}
    for name in ("ablation_norm", "ablation_cells", "ablation_residual_normal", "ablation_sr"):
        spec = importlib.util.spec_from_file_location(name, f"studies/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for scale in ("smoke", "small", "paper"):
            findings = study_findings(module.STUDY, scale)
        declared[name] = {f.name: f.source for f in findings}
    assert declared == {
        "ablation_norm": {"bn_beats_wn": "summary", "bn_gain_grows_with_groups": "recalled",
                          "swish_beats_elu": "recalled", "wn_unstable_deep": "recalled"},
        "ablation_cells": {"separable_helps_top_down": "summary", "separable_not_bottom_up": "summary"},
        "ablation_residual_normal": {"residual_normal_helps": "summary", "residual_normal_lowers_kl": "recalled"},
        "ablation_sr": {"sr_stabilizes": "summary", "sr_improves_bpd": "summary"}}


# Seeds until decided (--until-decided): one seed per round to the rows an open finding needs.

def sequential(delta, sd, max_seeds, studies, rng):
    """Simulated sequential studies of one comparison (two rows, normal seeds): at each seed count 2..max
    the rule of verdicts.decide at ALPHA / 2 / looks; returns (verdict, seeds taken) per study."""
    finding = Finding("f", "rows lower", rows={"a": "1"}, than={"a": "0"})
    a = rng.normal(delta, sd, (studies, max_seeds))
    b = rng.normal(0.0, sd, (studies, max_seeds))
    verdict = np.full(studies, OPEN, dtype=object)
    taken = np.full(studies, max_seeds)
    alpha = ALPHA / 2 / looks_for(max_seeds)
    for n in range(2, max_seeds + 1):
        estimate, se2, df = welch_contrast(np.stack([a[:, :n].mean(1), b[:, :n].mean(1)], -1),
                                           np.stack([a[:, :n].var(1, ddof=1), b[:, :n].var(1, ddof=1)], -1),
                                           [n, n], [1, -1])
        now = decide(finding, [t_p_values(estimate, se2, df)], alpha)
        newly = (verdict == OPEN) & (now != OPEN)
        verdict[newly], taken[newly] = now[newly], n
    return verdict, taken


def test_stopping_when_decided_keeps_false_verdicts_at_the_stated_rate():
    studies, max_seeds = 20000, 10
    verdict, _ = sequential(0.0, 1.0, max_seeds, studies, np.random.default_rng(0))
    false = np.mean(verdict != OPEN)
    assert false <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / studies)  # at most 5%, within Monte Carlo error
    for wrong in (REPRODUCED, CONTRADICTED):
        assert np.mean(verdict == wrong) <= ALPHA / 2 + 3 * math.sqrt(ALPHA / 2 / studies)


def test_an_effect_of_the_papers_size_is_decided_and_the_seeds_it_took_are_reported():
    # BN+Swish against BN+ELU at L = 40: 3.16 against 3.22 bpd; a seed spread of 0.03 bpd assumed
    verdict, taken = sequential(-0.06, 0.03, 10, 4000, np.random.default_rng(1))
    reproduced = np.mean(verdict == REPRODUCED)
    print(f"\nan effect of -0.06 bpd at sd 0.03: reproduced in {reproduced:.1%} of studies, "
          f"{taken.mean():.2f} seeds per row on average (max 10)")
    assert reproduced > 0.85 and np.mean(verdict == CONTRADICTED) == 0 and 2 <= taken.mean() < 10


def test_next_round_adds_a_seed_to_the_rows_an_open_finding_needs_until_decided():
    rng = np.random.default_rng(3)
    levels = {"norm_act": ["BN+Swish", "BN+ELU", "WN+ELU"]}
    means = {"BN+Swish": 3.10, "BN+ELU": 3.20, "WN+ELU": 3.20}
    findings = [FINDINGS[0], FINDINGS[2]]  # a clear effect; none at all
    seeds = {name: 2 for name in means}
    for _ in range(12):
        trials = pd.DataFrame([{"norm_act": name, "seed": str(s), "status": "finished",
                                "metrics.test_bpd": means[name] + 0.03 * rng.standard_normal()}
                               for name in means for s in range(seeds[name])])
        wanted = next_round(findings, trials, levels, max_seeds=6)
        if not wanted:
            break
        assert all(n == seeds[cell[0]] + 1 for cell, n in wanted.items())
        seeds.update({cell[0]: n for cell, n in wanted.items()})
    verdicts = judge(findings, trials, levels, looks=looks_for(6), power=False)
    assert seeds["WN+ELU"] == 6 and verdicts[1].verdict == OPEN  # no effect: open at max seeds
    assert verdicts[0].verdict == REPRODUCED


def test_an_open_finding_is_planned_for_the_papers_effect_where_the_reference_holds_its_rows(store):
    uri, _ = store
    study = load_studies("ablation_norm", uri)[0]
    reference = {("ablation_norm", "norm_act=BN+ELU", "test_bpd"): 3.20,
                 ("ablation_norm", "norm_act=WN+ELU", "test_bpd"): 3.30}
    verdict = judge([FINDINGS[2]], study.trials, study.levels, reference=reference, study="ablation_norm")[0]
    assert verdict.verdict == OPEN and "at the effect the paper reports" in verdict.settle
    assert verdict.needs[("WN+ELU",)] < judge([FINDINGS[2]], study.trials, study.levels)[0].needs[("WN+ELU",)]


def test_not_lower_holds_within_its_margin_and_is_contradicted_below_it():
    levels = {"cell": ["regular", "separable"]}
    finding = Finding("f", "separable not lower", rows={"cell": "separable"}, than={"cell": "regular"},
                      direction="not lower", margin=0.05)

    def trials(shift):
        return pd.DataFrame([{"cell": cell, "seed": s, "status": "finished",
                              "metrics.test_bpd": 3.0 + (shift if cell == "separable" else 0) + 0.01 * (s % 3 - 1)}
                             for cell in levels["cell"] for s in range(6)])

    assert judge([finding], trials(0.0), levels)[0].verdict == REPRODUCED  # equal: not lower by 0.05
    assert judge([finding], trials(-0.2), levels)[0].verdict == CONTRADICTED
    assert judge([finding], trials(-0.05), levels)[0].verdict == OPEN  # at the margin
