"""--until-decided: a study in rounds. Each round trains one more seed in every row that an open
finding needs (verdicts.next_round), and the rounds stop when every finding is decided, when a row
would pass --max-seeds, or when the next round would pass --budget-gpu-hours.

Every round judges its verdicts at ALPHA / looks_for(max_seeds), a Bonferroni spending over every
seed count a comparison can be looked at, so stopping at the first decided look keeps each verdict's
error rate (docs/findings.md). All rounds are one study: one folder, one MLflow parent run.
"""
import dataclasses

from nvae_platform.record.outcomes import ended_outcomes
from nvae_platform.study.cost import estimate_cost
from nvae_platform.study.plan import plan_study
from nvae_platform.study.runner import pooled_levels, prepare_study, run_study, trials_frame
from nvae_platform.verdicts import OPEN, looks_for, next_round

DEFAULT_MAX_SEEDS = 10
FIRST_SEEDS = 2  # the fewest seeds per row with a seed spread, so a Welch interval


def check_until_decided(study, settings, max_seeds):
    """Refuse (ValueError) a sequential run that cannot judge: no findings, a search, or --max-seeds
    below the seeds of the first round."""
    if study.search is not None:
        raise ValueError("--until-decided: a search samples its levels; declare a grid study to add seeds per row")
    if not study.findings:
        raise ValueError(f"--until-decided: study {study.name} declares no findings, so nothing decides when to "
                         "stop; add findings=(Finding(...),) to its Study (docs/findings.md), or choose --seeds")
    if max_seeds < max(settings.seeds, FIRST_SEEDS):
        raise ValueError(f"--max-seeds {max_seeds}: below the {max(settings.seeds, FIRST_SEEDS)} seeds per row "
                         "of the first round; raise --max-seeds")


def until_decided_settings(settings, max_seeds):
    """The first round's settings: at least FIRST_SEEDS seeds per row, verdicts judged at its looks."""
    return dataclasses.replace(settings, seeds=max(settings.seeds, FIRST_SEEDS), looks=looks_for(max_seeds))


def run_until_decided(study, settings, prepared, max_seeds, tracking_uri, budget=None, probe=False, first_cost=None):
    """Run the study round after round (see module doc), from until_decided_settings and the first
    round's prepare_study; returns the last round's StudyOutcome. A round that is interrupted, or whose
    record the store did not take, ends the run: the same command resumes it."""
    spent, cost, round_number = 0.0, first_cost, 1
    while True:
        print(f"[study] --until-decided, round {round_number}", flush=True)
        outcome = run_study(study, settings, prepared or prepare_study(study, settings), cost)
        prepared = None  # a later round takes the study's lock again (its Ray stays up)
        if outcome.interrupted or outcome.unrecorded:
            return outcome
        spent += (cost.total_hours() or 0.0) if cost else 0.0
        plan = outcome.plan
        frame = trials_frame(plan, outcome.pooled)
        wanted = next_round(plan.findings, frame, pooled_levels(plan, frame), max_seeds)
        still_open = [v.finding.name for v in outcome.verdicts if v.verdict == OPEN]
        if not wanted:
            verdict = f"open at {max_seeds} seeds: {', '.join(still_open)}" if still_open else "every finding is decided"
            print(f"[study] --until-decided: {verdict} after {round_number} round(s)", flush=True)
            return outcome
        settings = dataclasses.replace(settings, row_seeds={**settings.row_seeds, **wanted})
        cost = estimate_cost(plan_study(study, settings, check_data=False), settings, tracking_uri, probe=probe,
                             ended=ended_outcomes(plan.trials_path))
        if budget is not None and (cost.total_hours() is None or spent + cost.total_hours() > budget):
            need = "unknown hours" if cost.total_hours() is None else f"{cost.total_hours():.3g} {cost.unit}-h"
            print(f"[study] --until-decided: stopped before round {round_number + 1} ({need} more, "
                  f"{spent:.3g} {cost.unit}-h estimated for the rounds run, --budget-gpu-hours {budget:g}); "
                  f"open: {', '.join(still_open)}",
                  flush=True)
            return outcome
        round_number += 1

