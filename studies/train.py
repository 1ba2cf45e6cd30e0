"""Train one NVAE configuration on Ray Train and print its final figures.

    python studies/train.py --dataset digits --scale smoke --workers 2
    python studies/train.py --dataset cifar10 --scale small --workers 2 --data-dir /data
    python studies/train.py --dataset cifar10 --scale paper --set num_flows=0 --set epochs=100

Each epoch writes a checkpoint under --storage-path/--name; re-running the same command after an
interruption resumes from it. A worker that dies is replaced and training continues from the
latest checkpoint (--max-failures times).
"""
import argparse
import json
import sys

import ray

from nvae_core import ConfigError
from nvae_core.dataset_registry import DATASETS
from nvae_core.datasets import DatasetNotFoundError
from nvae_core.paths import absolute
from nvae_platform.defaults import default_data_dir, default_storage_path
from nvae_platform.preflight import CommandLine, at_least, check_local_resources, check_resources, check_storage
from nvae_platform.scales import SCALES, run_config, run_options
from nvae_platform.study_cli import parse_pairs, parse_value
from nvae_platform.training_run import cluster_address, init_ray, run_training


def build_parser():
    parser = CommandLine(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="digits", choices=sorted(DATASETS))
    add("--scale", default="smoke", choices=SCALES)
    add("--workers", type=at_least(1), help="data-parallel workers (default: the scale's)")
    add("--gpus-per-worker", type=at_least(0, float), help="0 trains on CPUs")
    add("--cpus-per-worker", type=at_least(0, float, strictly=True))
    add("--data-dir", default=default_data_dir(),
        help="where datasets live, or are downloaded to (default: $NVAE_DATA_DIR, else data)")
    add("--download", action="store_true", help="download the dataset if it is missing")
    add("--storage-path", default=default_storage_path(),
        help="checkpoints and trial state, local or s3:// (default: $NVAE_STORAGE_PATH, else runs)")
    add("--name", help="run name under the storage path (default: dataset-scale)")
    add("--max-failures", type=at_least(0, note="; Ray's -1 (unlimited) is refused: a failure that repeats would "
                                              "be retried forever"), default=2,
        help="restarts of the worker group from the latest checkpoint after a lost worker (default: 2; "
             "Ray's -1, unlimited, is refused)")
    add("--iw-samples", type=at_least(1), help="K of the importance-weighted test NLL")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override an NVAEConfig field, e.g. --set normalization=weight_norm")
    add("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a cluster started "
                          "on this machine with `ray start`, else a new local Ray)")
    add("--num-cpus", type=at_least(1), help="CPUs of a new local Ray instance")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {k: parse_value(v) for k, v in parse_pairs(parser, args.set, "--set").items()}
    option_overrides = {k: v for k, v in dict(
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        iw_samples=args.iw_samples).items() if v is not None}
    try:  # every check before Ray starts
        cfg = run_config(args.dataset, args.scale, **overrides)
        options = run_options(args.dataset, args.scale, data_dir=absolute(args.data_dir), download=args.download,
                              storage_path=args.storage_path, name=args.name or f"{args.dataset}-{args.scale}",
                              max_failures=args.max_failures, **option_overrides)
        options.validate(cfg)
        joining = cluster_address(args.address, args.num_cpus) is not None
        check_storage(absolute(options.storage_path))
        if not joining:  # a local Ray cannot grow: refuse what it could never schedule
            check_local_resources(options.workers, options.cpus_per_worker, options.gpus_per_worker,
                                  args.num_cpus, "--workers")
        init_ray(args.address, num_cpus=args.num_cpus)
        if joining:  # a cluster may autoscale: say what the run waits for
            check_resources(options.workers, options.cpus_per_worker, options.gpus_per_worker,
                            ray.cluster_resources(), "--workers", on_cluster=True, where="the Ray cluster")
    except (ConfigError, ValueError, DatasetNotFoundError) as error:
        parser.error(str(error))
    print(f"[nvae] training {args.dataset} at scale {args.scale} on {options.workers} worker(s); "
          f"checkpoints in {options.storage_path}/{options.name}", flush=True)
    result = run_training(cfg, options)
    figures = {k: result.metrics[k] for k in ("test_bpd", "test_nats", "val_bpd", "train_bpd", "active_units",
                                               "active_units_kl", "epoch", "step") if k in result.metrics}
    print(json.dumps({"status": result.status, **figures, "samples": result.samples_path,
                      "checkpoint": result.checkpoint_path}, indent=2))
    return 0 if result.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
