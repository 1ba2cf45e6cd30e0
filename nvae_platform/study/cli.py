"""The command line every study script shares: `python studies/ablation_norm.py --help`."""
import argparse
import sys

from nvae_core import ConfigError
from nvae_core.datasets import DatasetNotFoundError
from nvae_platform.defaults import DATA_ENV, STORAGE_ENV, default_data_dir, default_storage_path, default_tracking_uri
from nvae_platform.preflight import FAILURE_COUNT, CommandLine, at_least, label, parse_pairs, parse_value
from nvae_platform.process_exit import exit_with, interrupted_code, stop_on_sigterm_as_on_sigint
from nvae_platform.ray_cluster import add_ray_arguments
from nvae_platform.record.outcomes import ended_outcomes
from nvae_platform.study.cost import check_budget, describe_cost, estimate_cost
from nvae_platform.study.plan import MAX_TRIALS
from nvae_platform.study.runner import (
    StudySettings,
    describe_plan,
    plan_study,
    prepare_study,
    run_study,
    stop_once_on_ctrl_c,
)
from nvae_platform.study.until_decided import (
    DEFAULT_MAX_SEEDS,
    check_until_decided,
    run_until_decided,
    until_decided_settings,
)
from nvae_platform.train.failures import StorageError
from nvae_platform.train.scales import SCALES

STUDY_DATA_HINT = " In a study: add --download, or run --scale smoke, which needs no files."


def build_parser(study):
    parser = CommandLine(
        prog=f"{study.name}.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{study.description}\n\nFactors: " + "; ".join(
            f"{f.name} in {{{', '.join(f.levels)}}}" + (f" (smoke: {{{', '.join(f.smoke_levels)}}})"
                                                        if f.smoke_levels else "") for f in study.factors),
        epilog="Re-running the same command resumes an interrupted study. Results: MLflow (./mlflow.db unless "
               "--tracking-uri or $MLFLOW_TRACKING_URI) and checkpoints under --storage-path.")
    add = parser.add_argument
    add("--scale", default="smoke", choices=SCALES,
        help="smoke: offline data, tiny model, minutes on a CPU; small: CIFAR-10, one GPU per trial; "
             "paper: the paper's settings, multi-GPU trials (default: smoke)")
    add("--seeds", type=at_least(1), default=1,
        help="seeds per level combination (default: 1); more later trains only the new seeds")
    add("--workers-per-trial", type=at_least(1), help="data-parallel workers of each trial (default: the scale's)")
    add("--gpus-per-worker", type=at_least(0, float), help="0 trains on CPUs (default: the scale's)")
    add("--cpus-per-worker", type=at_least(0, float, strictly=True), help="default: the scale's")
    add("--max-concurrent", type=at_least(1),
        help="trials running at once, >= 1 (default: as many as the cluster holds)")
    add("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db)")
    add("--experiment", type=label, help=f"MLflow experiment name (default: {study.name})")
    add("--storage-path", default=default_storage_path(),
        help=f"checkpoints and Tune state: a folder or s3:// gs:// URI (default: ${STORAGE_ENV}, else runs)")
    add("--data-dir", default=default_data_dir(),
        help=f"where datasets live, or are downloaded to with --download (default: ${DATA_ENV}, else data)")
    add("--download", action="store_true", help="download a missing dataset")
    add("--skip-unreadable", action="store_true",
        help="train without the image-folder files that cannot be read (default: refuse to start, naming them)")
    add("--levels", action="append", default=[], metavar="FACTOR=L1,L2",
        help="run only these levels of a factor, e.g. --levels groups=10,20; others later join the same study")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override an NVAEConfig field in every trial, e.g. --set epochs=50")
    add("--samples", type=at_least(1), help="trials of a search (default: the study's)")
    add("--max-trials", type=at_least(1), default=MAX_TRIALS,
        help=f"refuse a plan of more trials than this, before building it (default: {MAX_TRIALS:,})")
    add("--max-failures", type=FAILURE_COUNT, default=2,
        help="restarts of a trial after a lost worker or trial process, each from its latest checkpoint "
             "(default: 2)")
    add_ray_arguments(parser)
    add("--dry-run", action="store_true", help="print the trials, their resources and their hours; start nothing")
    add("--probe", action="store_true",
        help="time a few training steps and the evaluation of each distinct model on one worker where the study "
             "runs, for the hours of a model no earlier run in the MLflow store measured (seconds per model)")
    add("--until-decided", action="store_true",
        help="train in rounds, each adding one seed to the rows an open finding needs, until every finding is "
             "decided, --max-seeds, or --budget-gpu-hours (a sequential design: stopping early keeps each "
             "verdict's error rate; docs/findings.md)")
    add("--max-seeds", type=at_least(2), default=DEFAULT_MAX_SEEDS,
        help=f"with --until-decided: the most seeds of any row (default: {DEFAULT_MAX_SEEDS})")
    add("--budget-gpu-hours", type=at_least(0, float, strictly=True), metavar="H",
        help="refuse, before anything trains, a plan estimated above H GPU-hours (wall hours x GPUs reserved; "
             "for trials on CPUs: CPU-hours, wall hours x CPUs reserved)")
    return parser


def main(study, argv=None):
    """Parse the shared flags, then plan (--dry-run) or run the study. Returns the exit code."""
    parser = build_parser(study)
    args = parser.parse_args(argv)
    levels = {k: [v for v in vs.split(",") if v] for k, vs in parse_pairs(parser, args.levels, "--levels").items()}
    overrides = {k: parse_value(v) for k, v in parse_pairs(parser, args.set, "--set").items()}
    settings = StudySettings(
        scale=args.scale, seeds=args.seeds, workers_per_trial=args.workers_per_trial,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        max_concurrent=args.max_concurrent, tracking_uri=args.tracking_uri, experiment=args.experiment,
        storage_path=args.storage_path, data_dir=args.data_dir, download=args.download,
        skip_unreadable=args.skip_unreadable, levels=levels,
        overrides=overrides, samples=args.samples, address=args.address, num_cpus=args.num_cpus,
        max_trials=args.max_trials, max_failures=args.max_failures)
    tracking_uri = settings.tracking_uri or default_tracking_uri()
    try:  # every check before anything is recorded or trained
        if args.until_decided:
            check_until_decided(study, settings, args.max_seeds)
            settings = until_decided_settings(settings, args.max_seeds)
        if args.dry_run:
            plan = plan_study(study, settings, check_data=False)
            ended = ended_outcomes(plan.trials_path)
            print(describe_plan(plan, args.max_concurrent, ended))
            try:
                plan_study(study, settings)
            except DatasetNotFoundError as error:
                print(f"  note: {error}{STUDY_DATA_HINT}")
                if args.probe:
                    print("  cost: unknown: the probe trains on the data, which is not there (see the note)")
                    return 0
            cost = estimate_cost(plan, settings, tracking_uri, probe=args.probe, ended=ended)
            print(describe_cost(cost))
            check_budget(cost, args.budget_gpu_hours)
            return 0
        plan = plan_study(study, settings, check_data=False)
        cost = estimate_cost(plan, settings, tracking_uri, probe=args.probe, ended=ended_outcomes(plan.trials_path))
        check_budget(cost, args.budget_gpu_hours)
        prepared = prepare_study(study, settings)
    except DatasetNotFoundError as error:
        parser.error(f"{error}{STUDY_DATA_HINT}")
    except (ConfigError, ValueError) as error:
        parser.error(str(error))
    stop_on_sigterm_as_on_sigint()
    stop_once_on_ctrl_c()
    try:
        if args.until_decided:
            outcome = run_until_decided(study, settings, prepared, args.max_seeds, tracking_uri,
                                        args.budget_gpu_hours, args.probe, cost)
        else:
            outcome = run_study(study, settings, prepared, cost)
    except StorageError as error:  # the study's folder (full, or not reachable): its trials are resumable
        print(f"[study] {error}", file=sys.stderr, flush=True)
        return 1
    if outcome.unrecorded:
        print(outcome.unrecorded, file=sys.stderr, flush=True)
        return 1
    failed, all_failed = outcome.failed_line()
    if failed:
        print(failed, flush=True)
    if outcome.interrupted:
        return interrupted_code()
    return 1 if all_failed else 0


def run(study):
    """Entry point of a study script: exit with main(study)'s code."""
    exit_with(main(study))
