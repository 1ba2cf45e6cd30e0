"""What the platform adds to each epoch of a run, against the same loop as a plain script.

    python studies/benchmark_platform_overhead.py                      # digits, 2 and 12 epochs
    python studies/benchmark_platform_overhead.py --epochs 4 24 --json overhead.json

Three ways to run the very same loop (worker_loop.run_worker: config, data, steps, validation,
final evaluation, a checkpoint saved each epoch):
  script  in this process; each epoch's checkpoint is saved to a temporary folder and dropped;
  trial   as a study trial on a local Ray trains: in one Ray process (a task here, a Tune trial
          actor in a study), checkpoints written to storage;
  train   Ray Train on one worker actor of a fresh local Ray: reports through its controller,
          checkpoints uploaded to storage and waited for.
After a warm-up run, each runs twice, with few and with many epochs; start-up and final
evaluation cost the same both times, so (wall(many) - wall(few)) / (many - few) is the wall time of one epoch, and its excess
over the script's is the platform's per-epoch overhead, also given as a share of a 30-second epoch.
"""
import argparse
import json
import platform
import sys
import tempfile
import time

import ray
import torch

from nvae_platform.machine import cpu_model
from nvae_platform.scales import run_config, run_options
from nvae_platform.training_run import init_ray, prepare_run, run_in_this_process, run_training, shutdown_ray
from nvae_platform.worker_loop import run_worker

EPOCH_SECONDS = 30.0  # the epoch length the overhead target is stated for


class ScriptSession:
    """A plain script: the loop's reports and checkpoints go nowhere."""

    def device(self):
        return torch.device("cpu")

    def node(self):
        return platform.node()

    def latest_checkpoint(self):
        return None

    def report(self, metrics, folder=None):
        pass

    def wait_committed(self):
        pass


def script(cfg, options):
    return run_worker(cfg, prepare_run(cfg, options), ScriptSession())


def trial(cfg, options):
    @ray.remote(num_cpus=options.cpus_per_worker)
    def trial_process():
        return run_in_this_process(cfg, options, lambda metrics: None).status

    return _on_local_ray(options, lambda: ray.get(trial_process.remote()))


def train(cfg, options):
    return _on_local_ray(options, lambda: run_training(cfg, options).status)


def _on_local_ray(options, fn):
    """fn() on a fresh local Ray, as a study on this machine starts one."""
    shutdown_ray()
    init_ray(num_cpus=options.threads_per_worker, log_to_driver=False)
    try:
        return fn()
    finally:
        shutdown_ray()


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, nargs=2, default=(2, 12), metavar=("FEW", "MANY"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    few, many = args.epochs
    if not 1 <= few < many:
        parser.error(f"--epochs {few} {many}: expected 1 <= FEW < MANY")
    storage = tempfile.mkdtemp(prefix="nvae-overhead-")
    walls = {}
    script(run_config(args.dataset, "smoke", epochs=1), run_options(args.dataset, "smoke", storage_path=storage,
                                                                    name="warm-up"))  # first-use costs
    for epochs in (few, many):
        cfg = run_config(args.dataset, "smoke", epochs=epochs)
        for mode in (script, trial, train):
            options = run_options(args.dataset, "smoke", workers=1, cpus_per_worker=float(args.threads),
                                  threads_per_worker=args.threads, storage_path=storage,
                                  name=f"{mode.__name__}-{epochs}")
            walls[mode.__name__, epochs] = timed(mode, cfg, options)
            print(f"{mode.__name__:>6}, {epochs:>3} epochs: {walls[mode.__name__, epochs]:.1f} s", flush=True)
    per_epoch = {mode: (walls[mode, many] - walls[mode, few]) / (many - few) for mode in ("script", "trial", "train")}
    row = {"dataset": args.dataset, "epochs": [few, many], "threads": args.threads,
           "cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
           "wall_s": {f"{m}_{e}": round(w, 2) for (m, e), w in walls.items()},
           "epoch_s": {m: round(s, 3) for m, s in per_epoch.items()}}
    for mode in ("trial", "train"):
        extra = per_epoch[mode] - per_epoch["script"]
        row[f"{mode}_overhead_per_epoch_s"] = round(extra, 3)
        row[f"{mode}_overhead_of_30s_epoch"] = round(extra / EPOCH_SECONDS, 4)
        print(f"{mode}: {extra:+.3f} s per epoch over the script's {per_epoch['script']:.2f} s "
              f"({extra / per_epoch['script']:+.1%} here; {extra / EPOCH_SECONDS:+.2%} of a {EPOCH_SECONDS:.0f}-second epoch)")
    print(f"CPU {row['cpu']}, ISA {row['isa']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
