"""What a study costs before it starts: GPU-hours per trial and in all (CPU-hours when it trains on
CPUs), from the measured speed of each distinct model on the kind of device it will run on.

A trial's hours are its wall hours x the GPUs it reserves (workers x GPUs per worker), or on CPUs x
the CPUs it reserves. Its wall seconds are epochs x (steps per epoch x seconds per step + the
validation and checkpoint of an epoch) + what a trial does once (set-up, the first steps' warm-up or
compiling, the final evaluation and sample grid, and a trial's own overhead in Ray Tune and MLflow).
The seconds come from earlier finished runs of the same model on that kind of device in the
MLflow store (record/timings.py), else from a probe (--probe: train/probe.py), else they are
unknown. A study on a local Ray adds its start-up and shutdown for the resources it holds.
"""
import json
import statistics
from dataclasses import dataclass, field

import ray
import torch

from nvae_platform.preflight import local_resources
from nvae_platform.ray_cluster import cluster_address, init_ray
from nvae_platform.record.timings import earlier_timings
from nvae_platform.study.plan import estimated_work
from nvae_platform.study.progress_view import duration
from nvae_platform.train.probe import WARMUP_STEPS, probe_speed

# Measured at smoke scale on 2 CPU cores (docs/studies.md, "Cost before it starts"): a local Ray's
# start-up and shutdown around a study, and what a trial takes beside its training and evaluation
# (its Tune trial's start and end, the MLflow record of its epochs and outcome).
RAY_START_SECONDS = 12.0
TRIAL_OVERHEAD_SECONDS = 1.0
UNITS = "GPU-hours = wall hours x GPUs reserved per trial; CPU-hours, for trials on CPUs, = wall hours x CPUs"


@dataclass
class Speed:
    """The measured seconds of one model on one worker of its device."""

    step_s: float
    steps_per_epoch: float
    epoch_extra_s: float  # each epoch beside its steps: validation, checkpoint
    once_s: float  # once per trial: set-up, warm-up or compiling, final evaluation, the trial's overhead
    source: str  # where they were measured, in words

    def seconds(self, epochs):
        """A trial's wall seconds at this many epochs."""
        return epochs * (self.steps_per_epoch * self.step_s + self.epoch_extra_s) + self.once_s

    def describe(self, epochs):
        return (f"{epochs} epochs x ({self.steps_per_epoch:.0f} steps x {self.step_s:.3g} s + {self.epoch_extra_s:.2g} s)"
                f" + {self.once_s:.0f} s once")


def speed_from_probe(probe, workers):
    """The Speed of a trial of `workers` data-parallel workers from one worker's probe_speed seconds:
    each worker takes 1/workers of the steps and of the test set (the all-reduce is not timed)."""
    first_steps = max(probe["warmup_s"] - WARMUP_STEPS * probe["step_s"], 0.0)  # compiling, warm-up
    once = probe["set_up_s"] + first_steps + probe["final_s"] / workers + TRIAL_OVERHEAD_SECONDS
    return Speed(probe["step_s"], probe["steps_per_epoch"] // workers, probe["validation_s"] / workers
                 + probe["checkpoint_s"], once, f"a probe on {probe['device']} (first steps +{first_steps:.1f} s)")


def speed_from_runs(runs):
    """The Speed of earlier runs (record.timings.earlier_timings): the medians of their seconds per step
    and per epoch; all else they took (their wall time beside training) counts once per trial."""
    epoch_s = statistics.median(r["train_s"] / r["epochs"] for r in runs)
    step_s = statistics.median(r["step_s"] for r in runs)
    once = statistics.median(max(r["wall_s"] - r["train_s"], 0.0) for r in runs)
    devices = sorted({r["device"] for r in runs})
    return Speed(step_s, epoch_s / step_s, 0.0, once, f"{len(runs)} earlier run(s) on {', '.join(devices)}")


@dataclass
class Estimate:
    """A plan's hours: each trial's wall seconds (None: unknown), the resources each reserves, and the
    study's own start-up (a local Ray's) for the trials that run at once (lanes)."""

    unit: str  # "GPU" or "CPU"
    per_trial: float  # GPUs (CPUs) a trial reserves
    trial_seconds: dict  # trial key -> wall seconds, or None when unknown
    models: dict = field(default_factory=dict)  # label of a distinct model -> (Speed or None, trials, epochs)
    start_s: float = 0.0
    lanes: int = 1
    unknown_why: str = ""  # why some seconds are unknown, and how to know them

    @property
    def known(self):
        return all(s is not None for s in self.trial_seconds.values())

    def hours(self, seconds):
        return seconds * self.per_trial / 3600

    def total_hours(self):
        """Every trial's hours, plus the start-up for the resources of the trials at once; None if unknown."""
        if not self.known:
            return None
        busy = min(self.lanes, len(self.trial_seconds))
        return self.hours(sum(self.trial_seconds.values()) + self.start_s * busy)

    def wall_seconds(self):
        """The study's wall time: start-up, then the trials, longest first, each on the lane free first."""
        lanes = [0.0] * max(min(self.lanes, len(self.trial_seconds)), 1)
        for seconds in sorted(self.trial_seconds.values(), reverse=True):
            lanes[lanes.index(min(lanes))] += seconds
        return self.start_s + max(lanes)


def reserved(options):
    """("GPU", GPUs) a trial of these RunOptions reserves, or ("CPU", CPUs) when it trains on CPUs."""
    if options.gpus_per_worker > 0:
        return "GPU", options.workers * options.gpus_per_worker
    return "CPU", options.workers * options.cpus_per_worker


def _model_label(trial):
    return ",".join(f"{k}={v}" for k, v in trial.levels.items()) or trial.key


def _lanes(plan, settings, joined):
    """Trials at once: --max-concurrent; else all on a cluster; else what a local Ray holds."""
    if settings.max_concurrent or joined:
        return settings.max_concurrent or plan.trial_count
    o, have = plan.options, local_resources(settings.num_cpus)
    need = {"CPU": o.workers * o.cpus_per_worker, "GPU": o.workers * o.gpus_per_worker}
    return max(1, int(min(have[kind] // amount for kind, amount in need.items() if amount > 0)))


def _probe(cfg, options, joined):
    """probe_speed on one worker where the study runs: this process, or a Ray task on the cluster."""
    if joined:
        task = ray.remote(probe_speed).options(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)
        return ray.get(task.remote(cfg, options))
    if options.gpus_per_worker > 0 and not torch.cuda.is_available():
        raise ValueError("--probe: the trials train on GPUs and this machine has none; probe where the study "
                         "runs (--address of its Ray cluster), or estimate from earlier runs (drop --probe)")
    return probe_speed(cfg, options)


def estimate_cost(plan, settings, tracking_uri, probe=False, ended=()):
    """The Estimate of a plan's trials that have not ended (`ended`: keys of those an earlier command
    ran): each distinct model's Speed from earlier runs in tracking_uri, else from a probe when asked
    (on a cluster, a Ray task), else unknown. Raises ValueError naming a probe that cannot run here."""
    joined = cluster_address(settings.address, settings.num_cpus) is not None
    unit, per_trial = reserved(plan.options)
    options = plan.options
    models = {}
    # A search trains num_samples of its combinations, which Optuna picks as it goes: each is counted
    # at the combination that looks longest (an upper bound; ASHA may stop trials early too).
    longest = max(plan.trials, key=lambda t: estimated_work(t.config))
    for trial in [longest] if plan.is_search else [t for t in plan.trials if t.key not in ended]:
        identity = json.dumps({k: v for k, v in trial.config.to_dict().items() if k != "seed"}, sort_keys=True)
        models.setdefault(identity, []).append(trial)
    estimate = Estimate(unit, per_trial, {}, start_s=0.0 if joined else RAY_START_SECONDS,
                        lanes=_lanes(plan, settings, joined))
    if probe and joined:
        init_ray(settings.address)
    for trials in models.values():
        cfg = trials[0].config
        runs = earlier_timings(tracking_uri, cfg, options, on_gpu=options.gpus_per_worker > 0)
        speed = speed_from_runs(runs) if runs else None
        if speed is None and probe:
            speed = speed_from_probe(_probe(cfg, options, joined), options.workers)
        keys = [f"trial {i + 1}" for i in range(plan.num_samples)] if plan.is_search else [t.key for t in trials]
        label = _model_label(trials[0]) + (" (the search's longest combination, for each trial)" if plan.is_search else "")
        estimate.models[label] = (speed, len(keys), cfg.epochs)
        for key in keys:
            estimate.trial_seconds[key] = speed.seconds(cfg.epochs) if speed else None
    if not estimate.known:
        device = "GPUs" if unit == "GPU" else "CPUs"
        estimate.unknown_why = (f"no earlier finished run of {'these models' if len(models) > 1 else 'this model'} "
                                f"on {device} in {tracking_uri}; add --probe to time a few steps of each model "
                                "here (seconds each)")
    return estimate


def describe_cost(estimate):
    """The lines --dry-run prints: each distinct model's hours per trial, then the total."""
    unit = f"{estimate.unit}-h"
    if not any(speed for speed, _, _ in estimate.models.values()):
        return f"  cost: unknown: {estimate.unknown_why}"
    other = "; trials on GPUs: GPU-hours, x the GPUs" if estimate.unit == "CPU" else ""
    header = (f"  cost in {estimate.unit}-hours (wall hours x the {estimate.per_trial:g} {estimate.unit}(s) each "
              f"trial reserves{other}):")
    lines = [header]
    for label, (speed, trials, epochs) in estimate.models.items():
        if speed is None:
            lines.append(f"    {label}: unknown")
            continue
        seconds = speed.seconds(epochs)
        lines.append(f"    {label}: {estimate.hours(seconds):.3g} {unit} per trial x {trials} "
                     f"({seconds:.0f} s: {speed.describe(epochs)}; from {speed.source})")
    total = estimate.total_hours()
    if total is None:
        lines.append(f"  total: unknown: {estimate.unknown_why}")
        return "\n".join(lines)
    start = (f", with a local Ray's start-up ({estimate.start_s:.0f} s x "
             f"{min(estimate.lanes, len(estimate.trial_seconds))} trial(s) at once)" if estimate.start_s else "")
    lines.append(f"  total: {total:.3g} {unit} for {len(estimate.trial_seconds)} trial(s){start}; about "
                 f"{duration(estimate.wall_seconds())} of wall time at {estimate.lanes} trial(s) at once")
    return "\n".join(lines)


def check_budget(estimate, budget):
    """Raise ValueError, in one line naming the estimate and the fix, when the plan's hours are above
    budget (GPU-hours; CPU-hours for trials on CPUs) or unknown."""
    if budget is None:
        return
    total = estimate.total_hours()
    flag = f"--budget-gpu-hours {budget:g}"
    if total is None:
        raise ValueError(f"{flag}: the plan's hours are unknown ({estimate.unknown_why}), so the budget cannot "
                         "be checked")
    if total > budget:
        cpus = " (its trials train on CPUs: the budget caps CPU-hours)" if estimate.unit == "CPU" else ""
        raise ValueError(f"{flag}: the plan is estimated at {total:.3g} {estimate.unit}-hours for "
                         f"{len(estimate.trial_seconds)} trial(s){cpus}, above the budget; train fewer trials "
                         "(--levels, --seeds) or fewer epochs (--set epochs=N), or raise the budget")
