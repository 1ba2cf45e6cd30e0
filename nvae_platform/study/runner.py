"""Run a study: a Ray Tune experiment whose trials are Ray Train runs, recorded in MLflow.

    plan = plan_study(study, StudySettings(scale="smoke"))   # validated; nothing started
    outcome = run_study(study, StudySettings(scale="smoke"))

A grid study is a Tune grid over the factors' levels x seeds; a search study samples levels with
Optuna (OptunaSearch, optionally ASHA early stopping). Each trial is a Tune function that launches
the TorchTrainer of its configuration and forwards every epoch's report to Tune; on a local Ray, a
one-worker trial trains in the trial's own process instead (no Train controller and worker actors
to start per trial: worker_session.py), writing the same checkpoints. Re-running the same
command resumes: Tune restores its experiment, an unfinished trial's Train run resumes from its last
checkpoint, and a trial whose outcome file exists is reported, not retrained. A command that asks
for more seeds or levels of a study (plan.py: its identity) is a new Tune experiment of the trials
that have not ended yet, under the same MLflow parent run; its closing table pools every ended trial.
"""
import math
import os
import signal
import sys
from dataclasses import dataclass

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from nvae_platform.defaults import default_tracking_uri
from nvae_platform.folder_lock import FolderLock
from nvae_platform.preflight import check_local_resources, check_resources, check_storage
from nvae_platform.process_exit import end_now, interrupted_code, stop_once_on_sigint, stopped_by_signal
from nvae_platform.ray_cluster import cluster_address, init_ray, local_ray_watched, shutdown_ray
from nvae_platform.ray_output import ray_log_path, send_ray_logs_to
from nvae_platform.record.outcomes import ended_outcomes
from nvae_platform.record.store import open_in_background
from nvae_platform.record.tracking import STORE_ERRORS, MlflowTracker, check_tracking_uri, first_line, status_of
from nvae_platform.study.declaration import trial_key
from nvae_platform.study.plan import StudyPlan, StudySettings, estimated_work, plan_study
from nvae_platform.study.progress_callback import ProgressCallback
from nvae_platform.study.trial import run_trial
from nvae_platform.summaries import mean_sd_of, non_dominated
from nvae_platform.train.failures import StorageError, storage_stopped
from nvae_platform.train.memory import check_memory, cluster_memory_warning, smoke_warning
from nvae_platform.verdicts import judge, verdict_lines

# A trial's own process only launches and waits on its Train run: it takes no CPU from the
# workers, and reserves the memory it does use (Ray rejects an empty request).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 512 * 2**20}
# A cluster's head advertises this resource (cluster.yaml) so that trial processes, and with them
# the Train controllers that Ray keeps on their node, stay on a node that is never scaled down or
# preempted; a lost GPU node then costs its workers only, which resume from the last checkpoint.
TRIAL_DRIVER_RESOURCE = "nvae_trial_driver"



class FinalOptunaSearch(OptunaSearch):
    """Optuna learns a trial's objectives at its end: test bpd exists only then, and ASHA, not an
    Optuna pruner, judges the epochs in between."""

    def on_trial_result(self, trial_id, result):
        pass


def _tune_config(plan, max_concurrent, pending):
    search = plan.study.search
    if search is None:  # the grid's trials that have not ended, as points of its space
        points = plan.grid_points(pending)
        return tune.TuneConfig(search_alg=BasicVariantGenerator(points_to_evaluate=points,
                                                                max_concurrent=max_concurrent or 0),
                               num_samples=len(points), reuse_actors=True)
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


def describe_plan(plan, max_concurrent=None, ended=()):
    """The trials and their resources, as printed by --dry-run; `ended`: keys of the study's trials that
    ended before (ended_outcomes), marked as such: they are not trained again."""
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
        before = sum(t.key in ended for t in plan.trials)
        lines.append(f"  {len(plan.trials)} trials (grid over {' x '.join(plan.levels)} x seed)"
                     + (f", {before} ended before (not trained again)" if before else "") + ":")
        for trial in plan.trials:
            c = trial.config
            lines.append(f"    {trial.key:<40} epochs {c.epochs}, groups {c.num_groups}, "
                         f"channels {c.num_channels_enc}, batch {c.batch_size}"
                         + ("  (ended before)" if trial.key in ended else ""))
    return "\n".join(lines)


def result_status(plan, result):
    """The status of a trial's Tune result: one without an outcome stopped early under a search's
    early stopping (ASHA), and otherwise was interrupted."""
    early = plan.is_search and plan.study.search.early_stopping
    return status_of(result.metrics, "ERROR" if result.error else "TERMINATED" if early else "INTERRUPTED")


def summary_table(plan, results):
    """Markdown table of the trials, each level combination averaged over its finished seeds, in the
    study's level order."""
    columns = list(plan.study.columns)
    rows = {}
    declared = plan.declared_levels

    def order(result):
        return tuple(declared[f].index(result.config[f]) for f in plan.levels) + (result.config.get("seed", 0),)

    results = sorted(results, key=order)
    for result in results:
        metrics = result.metrics or {}
        levels = {name: result.config.get(name) for name in plan.levels}
        status = result_status(plan, result)
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


def trials_frame(plan, results):
    """The trials of Tune results as nvae_platform.verdicts judges them (and reports/runs.py loads
    them): a column per factor, seed, status and metrics.<name>."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        levels, seed = plan.levels_and_seed(result.config)
        rows.append({**{k: str(v) for k, v in levels.items()}, "seed": str(seed),
                     "status": result_status(plan, result),
                     **{f"metrics.{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
    return pd.DataFrame(rows, columns=[*plan.levels, "seed", "status"] if not rows else None)


def pooled_levels(plan, frame):
    """{factor: levels} of this command's plan and of the pooled trials (trials_frame), in the study's
    order: trials of earlier commands may hold levels this command's --levels left out."""
    return {name: [level for level in plan.study.factor(name).at(plan.scale)
                   if level in chosen or level in set(frame.get(name, ()))] for name, chosen in plan.levels.items()}


def study_verdicts(plan, results):
    """The verdict of each of the study's findings on its results (nvae_platform.verdicts.judge)."""
    if not plan.findings or plan.is_search:
        return []
    frame = trials_frame(plan, results)
    return judge(plan.findings, frame, pooled_levels(plan, frame), looks=plan.looks, study=plan.study.name)


def pareto_front(results, objectives):
    """The finished Tune results no other finished result beats on every objective."""
    front = non_dominated([r.metrics or {} for r in results], objectives)
    return [r for r in results if any(r.metrics is m for m in front)]


@dataclass
class EndedTrial:
    """A trial of the study that ended in an earlier invocation, as a Tune result shows one."""

    config: dict  # {factor: level, "seed": seed}
    metrics: dict  # its outcome file
    error: object = None


def earlier_trials(plan, ended, results):
    """EndedTrials of the ended outcomes ({key: outcome}) of a grid's trials not among the results."""
    if plan.is_search:
        return []
    seen = {plan.key_for(r.config, None) for r in results}
    parsed = {key: plan.parse_key(key) for key in ended if key not in seen}
    return [EndedTrial({**found[0], "seed": found[1]}, ended[key]) for key, found in parsed.items() if found]


@dataclass
class StudyOutcome:
    plan: StudyPlan
    results: list  # ray.tune Results, one per trial of this invocation's Tune experiment
    table: str
    tracking_uri: str
    parent_run_id: str  # None when the store did not take the record
    interrupted: bool
    unrecorded: str = None  # the line saying the store did not take the record, and what to do
    pooled: list = None  # results and EndedTrials: every trial of the study that this table holds
    verdicts: list = None  # nvae_platform.verdicts.Verdict of each finding of the study

    def failed_line(self):
        """The study's closing line when some of its trials failed (None when none did), and whether
        every one of them failed."""
        statuses = [result_status(self.plan, r) for r in self.pooled or self.results]
        failed = statuses.count("failed")
        if not failed:
            return None, False
        return (f"[study] {failed} of {len(statuses)} trial(s) failed: the reason of each is in its progress line "
                "above and in its MLflow run (error.txt)"), failed == len(statuses)


def stop_once_on_ctrl_c():
    """For a study's command: from now on the first Ctrl-C stops it, its table printed (Tune stops its
    run on SIGUSR1, which it listens to while it runs; before that, KeyboardInterrupt); a second is
    ignored, and a third may end it at once (process_exit.stop_once_on_sigint). Tune's own SIGINT
    handler, which lets a second Ctrl-C break its cleanup with a traceback, is left out."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    def stop():
        if callable(signal.getsignal(signal.SIGUSR1)):  # Tune's handler, set when its run starts
            signal.raise_signal(signal.SIGUSR1)
        else:
            raise KeyboardInterrupt

    stop_once_on_sigint(stop)


def prepare_study(study, settings):
    """Every check that needs no trial, before Ray starts: the resources of a local Ray (before the
    data), plan (numbers, configs, data), storage, a local worker's memory, the tracking store (a
    write probe), and last the study folder's lock (no other invocation runs this study there). Returns (plan, max concurrent trials, the held
    FolderLock). Raises ConfigError/ValueError/DatasetNotFoundError (AlreadyRunning) naming the
    problem; records nothing."""
    joining = cluster_address(settings.address, settings.num_cpus) is not None
    if not joining:  # a local Ray cannot grow: refuse what it could never schedule, before the data is checked
        opts = plan_study(study, settings, check_data=False).options
        check_local_resources(opts.workers, opts.cpus_per_worker, opts.gpus_per_worker, settings.num_cpus,
                              "--workers-per-trial")
    plan = plan_study(study, settings)
    check_storage(plan.storage_path)
    if not joining:
        opts = plan.options
        for trial in plan.trials:  # each distinct model and batch estimated once
            check_memory(trial.config, opts.workers, opts.gpus_per_worker > 0)
    warnings = {smoke_warning(t.config) for t in plan.trials} - {None} if plan.scale == "smoke" else set()
    for warning in sorted(warnings):
        print(f"[study] {warning}", file=sys.stderr, flush=True)
    check_tracking_uri(settings.tracking_uri or default_tracking_uri(), settings.experiment or study.name)
    lock = FolderLock(plan.study_key, f"study {plan.experiment_dir}")  # AlreadyRunning: a second invocation
    gone = lock.acquire()
    try:
        if gone:
            print(f"[study] taking over from pid {gone.get('pid')} on host {gone.get('host')}, which is gone",
                  flush=True)
        send_ray_logs_to(ray_log_path(plan.study_key, plan.experiment_dir))  # Ray's start-up messages included
        store = open_in_background(settings.tracking_uri or default_tracking_uri())  # while Ray starts
        joined = init_ray(settings.address, num_cpus=settings.num_cpus)
        store.join()
        # On a cluster every trial is a Train run: its controller stays on the head, and a lost node costs
        # only its workers.
        plan.train_in_trial = not joined and plan.options.workers == 1
        if joined:
            gpus, nodes = plan.options.gpus_per_worker > 0, ray.nodes()
            for warning in sorted({cluster_memory_warning(t.config, gpus, nodes) for t in plan.trials} - {None}):
                print(f"[study] {warning}", file=sys.stderr, flush=True)
        try:
            return plan, _default_concurrency(plan, settings, joined), lock
        except ValueError:
            shutdown_ray()
            raise
    except BaseException:
        lock.release()
        raise


def run_study(study, settings, prepared=None, cost=None):
    """Run the study on Ray Tune and record it in MLflow (see module doc); prepared is
    prepare_study's (plan, max_concurrent, lock), computed here if not given; cost (a cost.Estimate)
    gives the progress line its projected hours. The lock is released when the study ends, however
    it ends."""
    plan, max_concurrent, lock = prepared or prepare_study(study, settings)
    try:
        with local_ray_watched(_end_when_local_ray_lost(study, settings, plan, lock)):
            return _run_prepared(study, settings, plan, max_concurrent, cost)
    finally:
        lock.release()


def _run_prepared(study, settings, plan, max_concurrent, cost=None):
    tracking_uri = settings.tracking_uri or default_tracking_uri()
    ended = ended_outcomes(plan.trials_path)  # by any invocation of the study
    print(describe_plan(plan, max_concurrent, ended), flush=True)

    experiment = settings.experiment or study.name
    tracker = MlflowTracker(plan, tracking_uri, experiment)  # Tune opens it (its setup hook), also on a restore
    progress = ProgressCallback(plan, max_concurrent, ray_log_path(plan.study_key, plan.experiment_dir), cost)
    # A trial reports test_bpd only with its last epoch; Tune otherwise rejects a search's earlier reports.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune's own output engine prints its experiment table even at verbose=0; the legacy one is silent.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune saves which trials ended at most every 10 s by default; a driver killed sooner restarts them
    # (they report their outcome files without training, but show as started again).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), trial_resources(plan))
    path = plan.tune_path  # this command's Tune experiment, in the study's folder
    pending = plan.trials if plan.is_search else [t for t in plan.trials if t.key not in ended]
    if tune.Tuner.can_restore(path):
        print(f"[study] resuming {path}", flush=True)
        with MlflowTracker.restoring_to(tracking_uri, experiment):
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    elif pending:
        # A trial whose own process is lost (its node died) restarts, resuming its Train run.
        retries = tune.FailureConfig(max_failures=plan.options.max_failures)
        tuner = tune.Tuner(trainable, param_space=plan.param_space(pending),
                           tune_config=_tune_config(plan, max_concurrent, pending),
                           run_config=tune.RunConfig(name=plan.tune_name, storage_path=plan.study_key,
                                                     callbacks=[progress, tracker], verbose=0, failure_config=retries))
    else:
        tuner = None
        print(f"[study] all {len(plan.trials)} trials ended before: nothing to train", flush=True)
    try:
        grid_results = tuner.fit() if tuner else []
    except BaseException as error:
        try:
            MlflowTracker(plan, tracking_uri, experiment).open().close()  # no run stays RUNNING; resumable
        except STORE_ERRORS:
            pass  # the store still refuses writes: the next invocation's tracker completes the record
        # Tune saves its state to the study's folder as it ends, and reads it back: a store that is
        # down (or a full disk) meets it there, after the trials have said so
        said = storage_stopped(error, plan.study_key, "study") if isinstance(error, OSError) else None
        if said:
            raise StorageError(said) from None
        raise
    results = [grid_results[i] for i in range(len(grid_results))]
    results = [r for r in results if r.config]  # a trial never started has no config
    return _close_study(study, settings, plan, results, ended)


def _close_study(study, settings, plan, results, ended):
    """Complete the record of the study's trials (this command's Tune results, and those that ended
    before: ended_outcomes), print their table and verdicts, and say how to go on: its StudyOutcome."""
    tracking_uri = settings.tracking_uri or default_tracking_uri()
    experiment = settings.experiment or study.name
    pooled = results + earlier_trials(plan, ended, results)
    verdicts = study_verdicts(plan, pooled)
    record, unrecorded = _complete_record(plan, tracking_uri, experiment, pooled, verdicts)
    table = summary_table(plan, pooled)
    print(f"\n{study.name} at scale {settings.scale}: bits/dim of the finished trials\n{table}")
    if verdicts:
        print("\n" + "\n".join(verdict_lines(verdicts)), flush=True)
    if study.search is not None and len(study.search.objectives) > 1:
        front = pareto_front(results, study.search.objectives)
        print("\nPareto front (" + " vs ".join(study.search.objectives) + "):")
        for r in sorted(front, key=lambda r: r.metrics[next(iter(study.search.objectives))]):
            print("  " + ", ".join(f"{k} {r.metrics[k]:.4g}" for k in study.search.objectives) + "  "
                  + trial_key({n: r.config[n] for n in plan.levels}, plan.seeds[0]))
    if unrecorded:
        return StudyOutcome(plan, results, table, tracking_uri, None, False, unrecorded, pooled, verdicts)
    if record.interrupted:
        print("\nThe study was interrupted: re-run the same command to resume it.")
    browse = tracking_uri if tracking_uri.startswith("http") else f"mlflow ui --backend-store-uri {tracking_uri}"
    print(f"\nMLflow: experiment {experiment!r}, parent run {record.parent_id}; browse with\n  {browse}", flush=True)
    return StudyOutcome(plan, results, table, tracking_uri, record.parent_id, record.interrupted, pooled=pooled,
                        verdicts=verdicts)


def _end_when_local_ray_lost(study, settings, plan, lock):
    """on_lost for local_ray_watched: the driver's Ray is about to end this process, so the study ends
    here, from what its folder and the MLflow store hold: the table of the trials that ended, the
    re-run line, the unfinished runs KILLED; exit 1 (143 or 130 when a stop signal came too: a job
    manager that signals every process of the job stops Ray with the driver)."""
    def end(what):
        print(f"[study] the local Ray was lost: {what}; the study stops", file=sys.stderr, flush=True)
        code = interrupted_code() if stopped_by_signal() else 1
        try:
            outcome = _close_study(study, settings, plan, [], ended_outcomes(plan.trials_path))
            if outcome.unrecorded:
                print(outcome.unrecorded, file=sys.stderr, flush=True)
        finally:
            lock.release()
            end_now(code)
    return end


def _complete_record(plan, tracking_uri, experiment, results, verdicts=()):
    """(the tracker, None) once the store holds every trial's record, completed from the results,
    checkpoints and outcome files, and the parent run each finding's verdict (a tag); (None, the line
    that says why not) when the store refuses."""
    try:
        record = MlflowTracker(plan, tracking_uri, experiment).open()  # what the store holds now
        for result in results:
            record.record_result(result)
        record.tag_verdicts({v.finding.name: v.verdict for v in verdicts}, plan.looks)
        record.close()
        return record, None
    except STORE_ERRORS as error:
        return None, (f"[study] the trials ended, but the MLflow store {tracking_uri} did not take their record "
                      f"({first_line(error)}): once it answers, run the same command again; it completes the "
                      "record and retrains nothing")


__all__ = ["EndedTrial", "StudyOutcome", "StudyPlan", "StudySettings", "check_storage", "estimated_work", "pareto_front",
           "plan_study", "pooled_levels", "prepare_study", "run_study", "run_trial", "stop_once_on_ctrl_c", "study_verdicts",
           "summary_table", "trials_frame"]
