"""Train one NVAE configuration on Ray Train and print its final figures.

    python studies/train.py --dataset digits --preset smoke --workers 2
    python studies/train.py --dataset cifar10 --preset small --workers 2 --data-dir /data
    python studies/train.py --dataset cifar10 --preset paper --set num_flows=0 --set epochs=100

Each epoch writes a checkpoint under --storage-path/--name; re-running the same command after an
interruption resumes from it. A worker that dies is replaced and training continues from the
latest checkpoint (--max-failures times).
"""
import argparse
import json
import os
import sys

import ray

from nvae_core import ConfigError
from nvae_core.datasets import DatasetNotFoundError
from nvae_platform.defaults import default_data_dir, default_storage_path
from nvae_platform.presets import DATA_FIELDS, SCALES, run_config, run_options
from nvae_platform.study_cli import parse_value
from nvae_platform.training_run import init_ray, run_training


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=sorted(DATA_FIELDS))
    parser.add_argument("--preset", default="smoke", choices=SCALES)
    parser.add_argument("--workers", type=int, help="data-parallel workers (default: the preset's)")
    parser.add_argument("--gpus-per-worker", type=float, help="0 trains on CPUs")
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="where datasets live, or are downloaded to (default: $NVAE_DATA_DIR, else data)")
    parser.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    parser.add_argument("--storage-path", default=default_storage_path(),
                        help="checkpoints and trial state, local or s3:// (default: $NVAE_STORAGE_PATH, else runs)")
    parser.add_argument("--name", help="run name under the storage path (default: dataset-preset)")
    parser.add_argument("--max-failures", type=int, default=2)
    parser.add_argument("--iw-samples", type=int, help="K of the importance-weighted test NLL")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an NVAEConfig field, e.g. --set normalization=weight_norm")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a cluster started "
                                          "on this machine with `ray start`, else a new local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a new local Ray instance")
    args = parser.parse_args(argv)

    overrides = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        overrides[key] = parse_value(value)
    option_overrides = {k: v for k, v in dict(
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        iw_samples=args.iw_samples).items() if v is not None}
    try:
        cfg = run_config(args.dataset, args.preset, **overrides)
        data_dir = os.path.abspath(os.path.expanduser(args.data_dir))  # Ray workers start elsewhere
        options = run_options(args.dataset, args.preset, data_dir=data_dir, download=args.download,
                              storage_path=args.storage_path, name=args.name or f"{args.dataset}-{args.preset}",
                              max_failures=args.max_failures, **option_overrides)
        options.validate(cfg)
    except (ConfigError, ValueError, DatasetNotFoundError) as error:
        parser.error(str(error))

    try:
        joined = init_ray(args.address, num_cpus=args.num_cpus)
    except ValueError as error:
        parser.error(str(error))
    wanted, have = options.workers * options.gpus_per_worker, ray.cluster_resources().get("GPU", 0)
    if not joined and wanted > have:  # a local Ray cannot grow; a cluster may autoscale
        ray.shutdown()
        parser.error(f"--preset {args.preset} asks for {wanted:g} GPU(s) and this machine has {have:g}: "
                     "add --gpus-per-worker 0 to train on CPUs, or --address to join a GPU cluster")
    print(f"[nvae] training {args.dataset} at preset {args.preset} on {options.workers} worker(s); "
          f"checkpoints in {options.storage_path}/{options.name}", flush=True)
    result = run_training(cfg, options)
    figures = {k: result.metrics[k] for k in ("test_bpd", "test_nats", "val_bpd", "train_bpd", "active_units",
                                               "epoch", "step") if k in result.metrics}
    print(json.dumps({"status": result.status, **figures, "samples": result.samples_path,
                      "checkpoint": result.checkpoint_path}, indent=2))
    return 0 if result.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
