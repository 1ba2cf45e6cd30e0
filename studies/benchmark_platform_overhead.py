"""Platform overhead of one training run: Ray Train on a fresh local Ray vs the same loop in-process.

    python studies/benchmark_platform_overhead.py --epochs 60 --json overhead.json

"direct" runs the very same train function through Ray Train's local mode (num_workers=0: this
process, no Ray cluster, no worker actors); "platform" starts Ray and runs it on one worker actor,
with per-epoch checkpoints persisted to storage and reports through the controller. Both use the
same config, data, steps and evaluation; the difference is start-up, checkpointing and reporting.
"""
import argparse
import json
import sys
import tempfile
import time

import ray
import ray.train
from ray.train.torch import TorchTrainer

from nvae_platform.scales import run_config, run_options
from nvae_platform.training_run import init_ray, make_trainer, summarize
from nvae_platform.worker_loop import train_loop_per_worker


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=60, help="about 4 s per digits epoch on 2 cores")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    cfg = run_config(args.dataset, "smoke", epochs=args.epochs)
    storage = tempfile.mkdtemp(prefix="nvae-overhead-")
    options = run_options(args.dataset, "smoke", workers=1, cpus_per_worker=float(args.threads),
                          threads_per_worker=args.threads, storage_path=storage)

    def direct():
        trainer = make_trainer(cfg, options)
        local = TorchTrainer(train_loop_per_worker, train_loop_config=trainer.train_loop_config,
                             scaling_config=ray.train.ScalingConfig(num_workers=0),
                             run_config=ray.train.RunConfig(name="direct", storage_path=storage))
        return summarize(local.fit())

    def platform():
        init_ray(num_cpus=args.threads, log_to_driver=False)
        try:
            return summarize(make_trainer(cfg, options).fit())
        finally:
            ray.shutdown()

    direct_s, direct_result = timed(direct)
    platform_s, platform_result = timed(platform)
    row = {"dataset": args.dataset, "epochs": args.epochs, "threads": args.threads,
           "direct_wall_s": direct_s, "platform_wall_s": platform_s,
           "overhead_s": platform_s - direct_s, "overhead_fraction": (platform_s - direct_s) / platform_s,
           "direct_status": direct_result.status, "platform_status": platform_result.status,
           "direct_test_bpd": direct_result.metrics.get("test_bpd"),
           "platform_test_bpd": platform_result.metrics.get("test_bpd")}
    print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
