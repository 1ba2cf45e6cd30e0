"""Run a study: a Ray Tune experiment whose trials are Ray Train runs, recorded in MLflow.

    plan = plan_study(study, StudySettings(scale="smoke"))   # validated; nothing started
    outcome = run_study(study, StudySettings(scale="smoke"))

A grid study is a Tune grid over the factors' levels x seeds; a search study samples levels with
Optuna (OptunaSearch, optionally ASHA early stopping). Each trial is a Tune function that launches
the TorchTrainer of its configuration and forwards every epoch's report to Tune; on a local Ray, a
one-worker trial trains in the trial's own process instead (no Train controller and worker actors
to start per trial: worker_session.py), writing the same checkpoints. Re-running the same
command resumes: Tune restores its experiment, an unfinished trial's Train run resumes from its last
checkpoint, and a trial whose outcome file exists is reported, not retrained.
"""
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import ray
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from nvae_core import ConfigError, data_check
from nvae_core.datasets import check_available
from nvae_core.paths import absolute

from .defaults import default_data_dir, default_storage_path, default_tracking_uri
from .figures import mean_sd_of
from .outcomes import read_outcome, write_outcome
from .pareto import non_dominated
from .preflight import check_local_resources, check_resources, check_storage
from .progress_callback import ProgressCallback
from .ray_output import ray_log_path, send_ray_logs_to
from .scales import run_options
from .study import Study, factor_levels, grid, resolve, trial_key
from .tracking import STORE_ERRORS, MlflowTracker, check_tracking_uri, status_of
from .training_run import (
    RunOptions,
    cluster_address,
    failed_run,
    init_ray,
    make_trainer,
    run_in_this_process,
    summarize,
)

# A trial's own process only launches and waits on its Train run: it takes no CPU from the
# workers, and reserves the memory it does use (Ray rejects an empty request).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 512 * 2**20}
# A cluster's head advertises this resource (cluster.yaml) so that trial processes, and with them
# the Train controllers that Ray keeps on their node, stay on a node that is never scaled down or
# preempted; a lost GPU node then costs its workers only, which resume from the last checkpoint.
TRIAL_DRIVER_RESOURCE = "nvae_trial_driver"
TRIAL_RETRIES = 2  # a trial whose own process is lost (its node died) restarts, resuming its Train run


@dataclass
class StudySettings:
    """The shared flags of every study script."""

    scale: str = "smoke"
    seeds: int = 1
    workers_per_trial: int = None  # None: the scale's default
    gpus_per_worker: float = None
    cpus_per_worker: float = None
    max_concurrent: int = None  # None: as many as a local Ray holds; on a cluster, all (the autoscaler grows)
    tracking_uri: str = None  # None: $MLFLOW_TRACKING_URI, else ./mlflow.db
    experiment: str = None  # MLflow experiment; None: the study's name
    storage_path: str = field(default_factory=default_storage_path)  # $NVAE_STORAGE_PATH, else ./runs
    data_dir: str = field(default_factory=default_data_dir)  # $NVAE_DATA_DIR, else ./data
    download: bool = False
    skip_unreadable: bool = False  # leave unreadable image-folder files out instead of refusing to start
    levels: dict = field(default_factory=dict)  # factor -> level names to keep
    overrides: dict = field(default_factory=dict)  # NVAEConfig fields every trial shares
    samples: int = None  # trials of a search; None: the study's
    address: str = None  # Ray cluster; None: $RAY_ADDRESS or one started on this machine, else a local Ray
    num_cpus: int = None  # CPUs of a local Ray


@dataclass
class StudyPlan:
    """Everything a trial and the tracker need, fixed before anything starts (picklable)."""

    study: Study
    scale: str
    seeds: list
    levels: dict  # factor -> level names
    overrides: dict
    options: RunOptions  # resources and evaluation of every trial; name set per trial
    trials: list  # the grid's Trials (every combination, also for a search: all validated)
    storage_path: str  # the study's storage root (local folder or URI)
    experiment_dir: str  # Tune experiment name under storage_path: study-scale-digest
    num_samples: int
    train_in_trial: bool = False  # set by prepare_study: one-worker trials on a local Ray train in the trial's process

    @property
    def is_search(self):
        return self.study.search is not None

    @property
    def study_key(self):
        return f"{self.storage_path}/{self.experiment_dir}"

    @property
    def trial_count(self):
        return self.num_samples if self.is_search else len(self.trials)

    @property
    def trials_path(self):
        return f"{self.study_key}/trials"

    def param_space(self):
        if self.is_search:
            return {name: tune.choice(levels) for name, levels in self.levels.items()}
        return {**{name: tune.grid_search(self.longest_first(name)) for name in self.levels},
                "seed": tune.grid_search(self.seeds)}

    def longest_first(self, factor):
        """The factor's levels, those whose trials look longest first (estimated_work): Tune starts a
        grid's trials in order, and a study that ends on one long trial leaves the other slots idle."""
        def mean_work(level):
            works = [estimated_work(t.config) for t in self.trials if t.levels[factor] == level]
            return -sum(works) / len(works)

        return sorted(self.levels[factor], key=mean_work)  # stable: equal levels keep their order

    def levels_and_seed(self, config):
        """({factor: level}, seed) of a Tune trial config."""
        return {name: config[name] for name in self.levels}, config.get("seed", self.seeds[0])

    def describe_config(self, config):
        """(levels, seed, NVAEConfig) of a Tune trial config."""
        levels, seed = self.levels_and_seed(config)
        return levels, seed, resolve(self.study, self.scale, levels, seed, self.overrides)

    def describe(self, trial):
        return self.describe_config(trial.config)

    def key_for(self, config, trial_id):
        key = trial_key(*self.levels_and_seed(config))
        return f"{trial_id},{key}" if self.is_search else key  # a search may sample a level set twice

    def key_of(self, trial):
        return self.key_for(trial.config, trial.trial_id)

    def option_params(self):
        return self.options.params()

    def study_tags(self):
        return {"nvae.study": self.study.name, "nvae.scale": self.scale,
                "nvae.dataset": self.study.dataset_at(self.scale), "nvae.kind": "search" if self.is_search else "grid",
                "nvae.storage": self.study_key, "mlflow.note.content": self.study.description}

    def study_params(self):
        params = {f"levels.{name}": ",".join(levels) for name, levels in self.levels.items()}
        params.update({"seeds": ",".join(map(str, self.seeds)), "scale": self.scale,
                       "trials": self.trial_count})
        params.update({f"set.{k}": v for k, v in self.overrides.items()})
        params.update({"factors": ",".join(self.levels), "table.columns": ",".join(self.study.columns),
                       "table.across": self.study.across or "",
                       "table.baseline": json.dumps(self.study.baseline or {})})
        if self.is_search:
            params["objectives"] = ",".join(f"{k}:{v}" for k, v in self.study.search.objectives.items())
        return params


def estimated_work(cfg):
    """A rough measure of a configuration's training time (a scheduling hint, not a prediction):
    epochs x latent groups x cells per group x channels^2 x (1 + flows)."""
    cells = cfg.num_cell_per_cond_enc + cfg.num_cell_per_cond_dec
    return cfg.epochs * cfg.num_groups * cells * cfg.num_channels_enc ** 2 * (1 + cfg.num_flows)


def plan_study(study, settings, check_data=True):
    """Resolve and validate every trial and option (and that the dataset is there, if check_data);
    raise ConfigError/ValueError/DatasetNotFoundError naming the problem."""
    for flag, value in (("--seeds", settings.seeds), ("--max-concurrent", settings.max_concurrent),
                        ("--samples", settings.samples), ("--num-cpus", settings.num_cpus)):
        if value is not None and value < 1:
            raise ValueError(f"argument {flag}: {value} is not allowed: expected an integer >= 1")
    if study.search is not None and settings.seeds != 1:
        raise ValueError("--seeds: a search trains one seed per trial; repeat its best trials as a grid study")
    seeds = list(range(settings.seeds))
    levels = factor_levels(study, settings.scale, settings.levels)
    trials = grid(study, settings.scale, seeds, settings.levels, settings.overrides)
    dataset = study.dataset_at(settings.scale)
    resources = {k: v for k, v in dict(workers=settings.workers_per_trial, gpus_per_worker=settings.gpus_per_worker,
                                       cpus_per_worker=settings.cpus_per_worker).items() if v is not None}
    options = run_options(dataset, settings.scale, data_dir=absolute(settings.data_dir), download=settings.download,
                          storage_path="", **resources)
    for trial in trials:  # precision against device; the dataset's files are checked once below
        dataclasses.replace(options, download=True).validate(trial.config)
    if check_data and not options.download:
        first = trials[0].config
        check_available(first.dataset, options.data_dir, seed=first.seed, image_size=first.image_size)
        skipped = data_check.check_data(first.dataset, options.data_dir, seed=first.seed,
                                        image_size=first.image_size, evaluation_split=first.evaluation_split,
                                        skip_unreadable=settings.skip_unreadable)
        options = dataclasses.replace(options, skip_files=tuple(skipped))
    num_samples = 0
    if study.across is not None:
        study.factor(study.across)
    for name, level in (study.baseline or {}).items():
        if level not in study.factor(name).at(settings.scale):
            raise ConfigError(f"study {study.name}: baseline {name}={level} is not a level of {name}")
    if study.search is not None:
        num_samples = settings.samples or (study.search.smoke_samples if settings.scale == "smoke"
                                           else study.search.num_samples)
        if len(study.search.objectives) > 1 and study.search.early_stopping:
            raise ValueError(f"study {study.name}: early stopping (ASHA) ranks trials by one metric; "
                             "use one objective or early_stopping=False")
    storage = absolute(settings.storage_path)
    identity = json.dumps({"levels": levels, "seeds": seeds, "configs": [t.config.to_dict() for t in trials],
                           "workers": options.workers, "samples": num_samples}, sort_keys=True)
    digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
    plan = StudyPlan(study, settings.scale, seeds, levels, dict(settings.overrides), options, trials, storage,
                     f"{study.name}-{settings.scale}-{digest}", num_samples)
    plan.options = dataclasses.replace(options, storage_path=plan.trials_path)
    return plan


def run_trial(config, plan):
    """One Tune trial: train its configuration with Ray Train, forwarding each epoch to Tune.
    The last report carries the outcome (finished, diverged at step S, or failed: error)."""
    key = plan.key_for(config, tune.get_context().get_trial_id())
    done = read_outcome(plan.trials_path, key)
    if done is not None:  # finished in an earlier invocation whose Tune state was not saved in time
        tune.report(done)
        return
    _, _, cfg = plan.describe_config(config)
    options = dataclasses.replace(plan.options, name=key)
    if plan.train_in_trial:
        run = run_in_this_process(cfg, options, tune.report)
    else:
        trainer = make_trainer(cfg, options, callbacks=[TuneReportCallback()])
        try:
            run = summarize(trainer.fit())
        except ray.train.TrainingFailedError as error:
            run = failed_run(error, options)
    outcome = {**run.metrics, "status": run.status, "samples_path": run.samples_path, "trial_key": key,
               "checkpoint_path": run.checkpoint_path,
               "training_hours": sum(m.get("epoch_seconds", 0.0) for m in run.history) / 3600}
    write_outcome(plan.trials_path, key, outcome)
    tune.report(outcome)


class FinalOptunaSearch(OptunaSearch):
    """Optuna learns a trial's objectives at its end: test bpd exists only then, and ASHA, not an
    Optuna pruner, judges the epochs in between."""

    def on_trial_result(self, trial_id, result):
        pass


def _tune_config(plan, max_concurrent):
    search = plan.study.search
    if search is None:
        return tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True)
    metrics, modes = list(search.objectives), list(search.objectives.values())
    searcher = FinalOptunaSearch(metric=metrics if len(metrics) > 1 else metrics[0],
                                 mode=modes if len(modes) > 1 else modes[0], seed=0)
    scheduler = None
    if search.early_stopping:
        # One Tune result per epoch, then the trial's outcome report: epochs + 1 iterations in all.
        scheduler = ASHAScheduler(metric="val_bpd", mode="min", time_attr="training_iteration", grace_period=1,
                                  max_t=max(t.config.epochs for t in plan.trials) + 1)
    return tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                           max_concurrent_trials=max_concurrent, reuse_actors=True)


def trial_resources(plan):
    """What each trial's own process reserves: its worker's CPUs and GPUs when it trains itself; else
    only memory, pinned to the nodes advertising TRIAL_DRIVER_RESOURCE when the cluster has any."""
    if plan.train_in_trial:
        o = plan.options
        return {"CPU": o.cpus_per_worker, **({"GPU": o.gpus_per_worker} if o.gpus_per_worker else {})}
    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) >= 1:
        return {**TRIAL_DRIVER_RESOURCES, TRIAL_DRIVER_RESOURCE: 1}
    return dict(TRIAL_DRIVER_RESOURCES)


def _default_concurrency(plan, settings, joined):
    """Trials at once: as many as the local Ray holds; on a cluster, unlimited (pending trials are
    the demand its autoscaler grows from); --max-concurrent wins."""
    opts, have = plan.options, ray.cluster_resources()
    need = check_resources(opts.workers, opts.cpus_per_worker, opts.gpus_per_worker, have, "--workers-per-trial",
                           on_cluster=joined, where="the Ray cluster" if joined else "the local Ray")
    if settings.max_concurrent or joined:
        return settings.max_concurrent
    fits = [have.get(kind, 0) // amount for kind, amount in need.items() if amount > 0]
    return max(1, int(min(fits))) if fits else 1


def describe_plan(plan, max_concurrent=None):
    """The trials and their resources, as printed by --dry-run."""
    o = plan.options
    lines = [f"study {plan.study.name} at scale {plan.scale}: {plan.study.description}".rstrip(": "),
             (f"  dataset {plan.study.dataset_at(plan.scale)}; each trial: {o.workers} worker(s) x "
             f"{o.cpus_per_worker:g} CPU, {o.gpus_per_worker:g} GPU; "
             f"max concurrent trials: {max_concurrent or 'as many as the cluster holds'}"),
             f"  checkpoints: {plan.trials_path}"]
    if o.skip_files:
        lines.append(f"  --skip-unreadable: {len(o.skip_files)} unreadable image file(s) left out, e.g. "
                     f"{o.skip_files[0]} (all named in each run's unreadable_files.txt)")
    if plan.is_search:
        s = plan.study.search
        lines.append(f"  Optuna search: {plan.num_samples} trials over {len(plan.trials)} level combinations; "
                     f"objectives {s.objectives}; early stopping {'ASHA on val_bpd' if s.early_stopping else 'off'}")
        lines += [f"  {name}: {', '.join(levels)}" for name, levels in plan.levels.items()]
    else:
        lines.append(f"  {len(plan.trials)} trials (grid over {' x '.join(plan.levels)} x seed):")
        for trial in plan.trials:
            c = trial.config
            lines.append(f"    {trial.key:<40} epochs {c.epochs}, groups {c.num_groups}, "
                         f"channels {c.num_channels_enc}, batch {c.batch_size}")
    return "\n".join(lines)


def summary_table(plan, results):
    """Markdown table of the trials, each level combination averaged over its finished seeds."""
    columns = list(plan.study.columns)
    rows = {}
    order = {key: i for i, key in enumerate(t.key for t in plan.trials)}
    results = sorted(results, key=lambda r: order.get(trial_key(*plan.levels_and_seed(r.config)), 0))
    for result in results:
        metrics = result.metrics or {}
        levels = {name: result.config.get(name) for name in plan.levels}
        status = status_of(metrics, "ERROR" if result.error else "TERMINATED")
        label = tuple(levels.values())
        if plan.is_search:
            label = (metrics.get("trial_id", ""), *label)
        row = rows.setdefault(label, {"statuses": [], **{c: [] for c in columns}})
        row["statuses"].append(status)
        for c in columns:
            if status == "finished" and isinstance(metrics.get(c), (int, float)) and math.isfinite(metrics[c]):
                row[c].append(metrics[c])
    names = (["trial"] if plan.is_search else []) + list(plan.levels)
    lines = ["| " + " | ".join(names + columns + ["trials"]) + " |", "|" + "---|" * (len(names) + len(columns) + 1)]
    for label, row in rows.items():
        cells = [mean_sd_of(row[c]) for c in columns]
        counts = {s: row["statuses"].count(s) for s in dict.fromkeys(row["statuses"])}
        lines.append("| " + " | ".join(list(label) + cells + [", ".join(f"{n} {s}" for s, n in counts.items())]) + " |")
    return "\n".join(lines)


def pareto_front(results, objectives):
    """The finished Tune results no other finished result beats on every objective."""
    front = non_dominated([r.metrics or {} for r in results], objectives)
    return [r for r in results if any(r.metrics is m for m in front)]


@dataclass
class StudyOutcome:
    plan: StudyPlan
    results: list  # ray.tune Results, one per trial
    table: str
    tracking_uri: str
    parent_run_id: str
    interrupted: bool


def prepare_study(study, settings):
    """Every check that needs no trial, before Ray starts: plan (numbers, configs, data), storage,
    the resources of a local Ray, and last the tracking store (a write probe). Raises
    ConfigError/ValueError/DatasetNotFoundError naming the problem; records nothing."""
    plan = plan_study(study, settings)
    joining = cluster_address(settings.address, settings.num_cpus) is not None
    check_storage(plan.storage_path)
    if not joining:  # a local Ray cannot grow: refuse what it could never schedule, before starting it
        opts = plan.options
        check_local_resources(opts.workers, opts.cpus_per_worker, opts.gpus_per_worker, settings.num_cpus,
                              "--workers-per-trial")
    check_tracking_uri(settings.tracking_uri or default_tracking_uri(), settings.experiment or study.name)
    send_ray_logs_to(ray_log_path(plan.study_key, plan.experiment_dir))  # Ray's start-up messages included
    joined = init_ray(settings.address, num_cpus=settings.num_cpus)
    # On a cluster every trial is a Train run: its controller stays on the head, and a lost node costs
    # only its workers.
    plan.train_in_trial = not joined and plan.options.workers == 1
    try:
        return plan, _default_concurrency(plan, settings, joined)
    except ValueError:
        ray.shutdown()
        raise


def run_study(study, settings, prepared=None):
    """Run the study on Ray Tune and record it in MLflow (see module doc); prepared is
    prepare_study's (plan, max_concurrent), computed here if not given."""
    plan, max_concurrent = prepared or prepare_study(study, settings)
    tracking_uri = settings.tracking_uri or default_tracking_uri()
    print(describe_plan(plan, max_concurrent), flush=True)

    experiment = settings.experiment or study.name
    tracker = MlflowTracker(plan, tracking_uri, experiment)  # Tune opens it (its setup hook), also on a restore
    progress = ProgressCallback(plan, max_concurrent, ray_log_path(plan.study_key, plan.experiment_dir))
    # A trial reports test_bpd only with its last epoch; Tune otherwise rejects a search's earlier reports.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune's own output engine prints its experiment table even at verbose=0; the legacy one is silent.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune saves which trials ended at most every 10 s by default; a driver killed sooner restarts them
    # (they report their outcome files without training, but show as started again).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), trial_resources(plan))
    path = plan.study_key  # the Tune experiment folder
    if tune.Tuner.can_restore(path):
        print(f"[study] resuming {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=plan.param_space(), tune_config=_tune_config(plan, max_concurrent),
                           run_config=tune.RunConfig(name=plan.experiment_dir, storage_path=plan.storage_path,
                                                     callbacks=[progress, tracker], verbose=0,
                                                     failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)))
    try:
        grid_results = tuner.fit()
    except BaseException:
        try:
            MlflowTracker(plan, tracking_uri, experiment).open().close()  # no run stays RUNNING; resumable
        except STORE_ERRORS:
            pass  # the store still refuses writes: the next invocation's tracker completes the record
        raise
    results = [grid_results[i] for i in range(len(grid_results))]
    results = [r for r in results if r.config]  # a trial never started has no config
    record = MlflowTracker(plan, tracking_uri, experiment).open()  # what the store holds now
    interrupted = record.interrupted
    record.close()
    table = summary_table(plan, results)
    print(f"\n{study.name} at scale {settings.scale}: bits/dim of the finished trials\n{table}")
    if study.search is not None and len(study.search.objectives) > 1:
        front = pareto_front(results, study.search.objectives)
        print("\nPareto front (" + " vs ".join(study.search.objectives) + "):")
        for r in sorted(front, key=lambda r: r.metrics[next(iter(study.search.objectives))]):
            print("  " + ", ".join(f"{k} {r.metrics[k]:.4g}" for k in study.search.objectives) + "  "
                  + trial_key({n: r.config[n] for n in plan.levels}, plan.seeds[0]))
    if interrupted:
        print("\nThe study was interrupted: re-run the same command to resume it.")
    print(f"\nMLflow: experiment {experiment!r}, parent run {record.parent_id}; browse with\n"
          f"  mlflow ui --backend-store-uri {tracking_uri}", flush=True)
    return StudyOutcome(plan, results, table, tracking_uri, record.parent_id, interrupted)
