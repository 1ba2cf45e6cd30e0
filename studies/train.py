"""Train one NVAE configuration on Ray Train, record it in MLflow and print its final figures.

    python studies/train.py --dataset digits --scale smoke --workers 2
    python studies/train.py --dataset cifar10 --scale small --workers 2 --data-dir /data
    python studies/train.py --dataset cifar10 --scale paper --set num_flows=0 --set epochs=100

The run is named by what it trains, <--name>-<digest of the config and workers>, and checkpoints
each epoch under --storage-path/<run name>: the same command again resumes it (or says it is
finished), a changed --set starts a new run. To continue a run with a changed config (say more
epochs), name it with --resume-from. A worker that dies is replaced and training continues from the
latest checkpoint (--max-failures times). Ctrl-C or SIGTERM (to its pid or its process group) stops it
(exit 130 or 143), its MLflow run marked KILLED; so does a lost local Ray (exit 1); the same command
resumes it. A second invocation of the same run while it trains is
refused (a lock file in its folder). MLflow gets one run per run name (experiment "train"):
params, per-epoch metrics, final figures, config.json, the sample grid and the final checkpoint.
The console shows the run's own lines; Ray's messages (start-up, its processes' output and logs,
a failed worker's traceback) go to ray.log in the run's folder (~/.nvae/logs/ for s3:// storage).
"""
import argparse
import json
import sys
from dataclasses import replace

import ray

from nvae_core import ConfigError
from nvae_core.data_check import check_data
from nvae_core.dataset_registry import DATASETS
from nvae_core.datasets import DatasetNotFoundError
from nvae_core.paths import absolute
from nvae_platform.defaults import default_data_dir, default_storage_path, default_tracking_uri
from nvae_platform.folder_lock import FolderLock
from nvae_platform.preflight import (
    FAILURE_COUNT,
    CommandLine,
    at_least,
    check_local_resources,
    check_storage,
    label,
    parse_pairs,
    parse_value,
)
from nvae_platform.process_exit import (
    end_now,
    exit_with,
    interrupted_code,
    stop_on_sigterm_as_on_sigint,
    stopped_by_signal,
)
from nvae_platform.ray_cluster import add_ray_arguments, cluster_address, init_ray_for_run, local_ray_watched
from nvae_platform.ray_output import ray_log_path, send_ray_logs_to
from nvae_platform.record.tracking import StoreWriteError, check_tracking_uri
from nvae_platform.record.train_record import TrainRecord, describe_changes, resume_changes, run_name
from nvae_platform.train.data_cache import is_remote
from nvae_platform.train.memory import check_memory, cluster_memory_warning, smoke_warning
from nvae_platform.train.run import run_training
from nvae_platform.train.scales import SCALES, run_config, run_options


def build_parser():
    parser = CommandLine(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="digits", choices=sorted(DATASETS))
    add("--scale", default="smoke", choices=SCALES)
    add("--workers", type=at_least(1), help="data-parallel workers (default: the scale's)")
    add("--gpus-per-worker", type=at_least(0, float), help="0 trains on CPUs")
    add("--cpus-per-worker", type=at_least(0, float, strictly=True))
    add("--data-dir", default=default_data_dir(),
        help="where datasets live, or are downloaded to, or an s3:// prefix each node copies once "
             "(default: $NVAE_DATA_DIR, else data)")
    add("--download", action="store_true", help="download the dataset if it is missing")
    add("--skip-unreadable", action="store_true",
        help="train without the image-folder files that cannot be read (default: refuse to start, naming them)")
    add("--storage-path", default=default_storage_path(),
        help="checkpoints and trial state, local or s3:// (default: $NVAE_STORAGE_PATH, else runs)")
    add("--name", type=label, help="start of the run's name, which ends with a digest of the config (default: dataset-scale)")
    add("--resume-from", type=label, metavar="RUN",
        help="continue this run (its folder name under --storage-path) with the config given here, e.g. "
             "--set epochs=50 to extend it; fields that change the model's shapes are refused")
    add("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db)")
    add("--experiment", default="train", type=label, help="MLflow experiment (default: train)")
    add("--max-failures", type=FAILURE_COUNT, default=2,
        help="restarts of the worker group from the latest checkpoint after a lost worker (default: 2; "
             "Ray's -1, unlimited, is refused)")
    add("--iw-samples", type=at_least(1), help="K of the importance-weighted test NLL")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override an NVAEConfig field, e.g. --set normalization=weight_norm")
    add_ray_arguments(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {k: parse_value(v) for k, v in parse_pairs(parser, args.set, "--set").items()}
    if "dataset" in overrides:
        parser.error("--set dataset: choose the dataset with --dataset")
    option_overrides = {k: v for k, v in dict(
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        iw_samples=args.iw_samples).items() if v is not None}
    try:  # every check before Ray starts
        cfg = run_config(args.dataset, args.scale, **overrides)
        options = run_options(args.dataset, args.scale, data_dir=absolute(args.data_dir), download=args.download,
                              storage_path=absolute(args.storage_path), max_failures=args.max_failures,
                              **option_overrides)
        options = replace(options, name=args.resume_from or run_name(args.name or f"{args.dataset}-{args.scale}",
                                                                     cfg, options))
        local = cluster_address(args.address, args.num_cpus) is None
        if local:  # resources before data: a GPU scale on a machine without one is told so first
            check_local_resources(options.workers, options.cpus_per_worker, options.gpus_per_worker, args.num_cpus,
                                  "--workers")
        options.validate(cfg)
        if not options.download and not is_remote(options.data_dir):  # every image's header, or a batch of a
            # pickled set, before Ray starts (a remote data dir is only listed: each node reads its own copy)
            options = replace(options, skip_files=tuple(check_data(
                cfg.dataset, options.data_dir, seed=cfg.seed, image_size=cfg.image_size,
                evaluation_split=cfg.evaluation_split, skip_unreadable=args.skip_unreadable)))
        options.check_batch(cfg)
        if local:  # a cluster's nodes are not known here
            check_memory(cfg, options.workers, options.gpus_per_worker > 0)
        if args.scale == "smoke" and smoke_warning(cfg):
            print(f"[nvae] {smoke_warning(cfg)}", file=sys.stderr, flush=True)
        check_storage(options.storage_path)
        tracking_uri = args.tracking_uri or default_tracking_uri()
        check_tracking_uri(tracking_uri, args.experiment)
        record = TrainRecord(tracking_uri, args.experiment, options.storage_path, cfg, options,
                             tags={"nvae.kind": "train", "nvae.dataset": args.dataset, "nvae.scale": args.scale})
        changes = resume_changes(record.run_folder, cfg) if args.resume_from else {}
        lock = FolderLock(record.run_folder, f"run {options.name}")  # AlreadyRunning: another invocation trains it
        gone = lock.acquire()  # released at exit
        ray_log = ray_log_path(record.run_folder, options.name)
        send_ray_logs_to(ray_log, console_prefix="[nvae] ")  # the workers' own lines still reach the console
        if init_ray_for_run(args.address, args.num_cpus, options.workers, options.cpus_per_worker,
                            options.gpus_per_worker, "--workers"):  # joined a cluster: its nodes are known now
            warning = cluster_memory_warning(cfg, options.gpus_per_worker > 0, ray.nodes())
            if warning:
                print(f"[nvae] {warning}", file=sys.stderr, flush=True)
        stop_on_sigterm_as_on_sigint()
    except (ConfigError, ValueError, DatasetNotFoundError) as error:
        parser.error(str(error))
    try:
        record.open(changes)
    except StoreWriteError as error:
        print(f"[nvae] stopped: {error}", file=sys.stderr, flush=True)
        return 1
    if gone:
        print(f"[nvae] taking over from pid {gone.get('pid')} on host {gone.get('host')}, which is gone", flush=True)
    if record.finished_before:
        print(f"[nvae] run {options.name} is already finished (MLflow run {record.run_id}); to train it longer: "
              f"--resume-from {options.name} --set epochs=N", flush=True)
        return 0
    if changes:
        print(f"[nvae] continuing run {options.name} with {describe_changes(changes)} (the learning-rate "
              "schedule follows the new config from the next epoch)", flush=True)
    if options.skip_files:
        print(f"[nvae] --skip-unreadable: {len(options.skip_files)} unreadable image file(s) left out, e.g. "
              f"{options.skip_files[0]} (all named in the MLflow run's unreadable_files.txt)", flush=True)
    print(f"[nvae] training {args.dataset} at scale {args.scale} on {options.workers} worker(s); "
          f"run {options.name}, checkpoints in {record.run_folder}; MLflow run {record.run_id}; Ray's own "
          f"messages go to {ray_log}", flush=True)
    try:
        with record.watching(), local_ray_watched(lambda what: _end_when_local_ray_lost(record, lock, what)):
            result = run_training(cfg, options)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (a job manager) turned into one; Ray Train's
        # own SIGINT handler aborts the run, then raises SystemExit
        _interrupted(record)
        return interrupted_code()
    try:
        record.finish(result)
    except StoreWriteError as error:
        print(f"[nvae] stopped: {error}", file=sys.stderr, flush=True)
        return 1
    figures = {k: result.metrics[k] for k in ("test_bpd", "test_nats", "val_bpd", "train_bpd", "active_units",
                                               "active_units_kl", "epoch", "step") if k in result.metrics}
    print(json.dumps({"status": result.status, **figures, "samples": result.samples_path,
                      "checkpoint": result.checkpoint_path, "mlflow_run": record.run_id}, indent=2))
    return 0 if result.status == "finished" else 1


def _interrupted(record):
    """Mark the run KILLED and say how to resume it."""
    try:
        record.interrupt()
    except StoreWriteError as error:
        print(f"[nvae] {error}", file=sys.stderr, flush=True)
    print("[nvae] the run was interrupted: re-run the same command to resume it.", flush=True)


def _end_when_local_ray_lost(record, lock, what):
    """The local Ray is lost, and with it the run (the driver's Ray ends this process within seconds):
    end it here, as interrupted; exit 1 (143 or 130 when a stop signal came too)."""
    print(f"[nvae] the local Ray was lost: {what}; the run stops", file=sys.stderr, flush=True)
    try:
        _interrupted(record)
    finally:
        lock.release()
        end_now(interrupted_code() if stopped_by_signal() else 1)


if __name__ == "__main__":
    exit_with(main())
