"""What the platform adds to each epoch of a run, against the same loop as a plain script.

    python benchmarks/benchmark_platform_overhead.py                      # digits, 2 and 12 epochs, 2 rounds
    python benchmarks/benchmark_platform_overhead.py --epochs 4 24 --rounds 3 --json overhead.json

Three ways to run the very same loop (worker_loop.run_worker: config, data, steps, validation,
final evaluation, a checkpoint saved each epoch):
  script  in this process; each epoch's checkpoint is saved to a temporary folder and dropped;
  trial   as a study trial on a local Ray trains: in one Ray process (a task here, a Tune trial
          actor in a study), checkpoints written to storage;
  train   Ray Train on one worker actor of a fresh local Ray: reports through its controller,
          checkpoints uploaded to storage and waited for.
After a warm-up run, each round runs every mode with few and with many epochs, modes alternating.
Start-up and final evaluation cost the same both times, so (wall(many) - wall(few)) / (many - few)
is the wall time of one epoch. It splits into the training pass (the loop's own epoch_seconds) and
the rest (validation, checkpoint, report, commit wait). A platform can cost in both ways: a fixed
time per epoch (the rest, over the script's) and a slower training pass (Ray's processes taking CPU
from the loop, which grows with the epoch). The overhead of a 30-second epoch is therefore
(pass / script's pass - 1) x 30 s + (rest - script's rest), medians over the rounds.

The pass's part is the noisier, so the CPU that Ray's processes other than the loop's use while it
trains (the many-epoch runs, start-up and final evaluation left out) is measured directly, and that
of an idle local Ray: on a machine whose loop uses every core, that share is what the pass loses.
"""
import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import tempfile
import threading
import time

import psutil
import ray
import torch

from nvae_platform.machine import cpu_model
from nvae_platform.ray_cluster import init_ray, shutdown_ray
from nvae_platform.train.run import prepare_run, run_in_this_process, run_training
from nvae_platform.train.scales import run_config, run_options
from nvae_platform.train.worker_loop import run_worker

EPOCH_SECONDS = 30.0  # the epoch length the overhead target is stated for


class ScriptSession:
    """A plain script: the loop's checkpoints go nowhere; its reports are kept."""

    def __init__(self):
        self.reports = []

    def device(self):
        return torch.device("cpu")

    def node(self):
        return platform.node()

    def latest_checkpoint(self):
        return None

    def report(self, metrics, folder=None):
        self.reports.append(metrics)

    def wait_committed(self):
        pass


def _training_seconds(reports):
    return sum(m.get("epoch_seconds", 0.0) for m in reports)


def script(cfg, options):
    session = ScriptSession()
    run_worker(cfg, prepare_run(cfg, options), session)
    return _training_seconds(session.reports)


def trial(cfg, options):
    @ray.remote(num_cpus=options.cpus_per_worker)
    def trial_process():
        reports = []
        run_in_this_process(cfg, options, reports.append)
        return _training_seconds(reports)

    return _on_local_ray(options.threads_per_worker, lambda: ray.get(trial_process.remote()))


def train(cfg, options):
    return _on_local_ray(options.threads_per_worker, lambda: _training_seconds(run_training(cfg, options).history))


def _on_local_ray(num_cpus, fn):
    """fn() on a fresh local Ray of num_cpus CPUs, as a study on this machine starts one."""
    shutdown_ray()
    init_ray(num_cpus=num_cpus, log_to_driver=False)
    try:
        return fn()
    finally:
        shutdown_ray()


def _cpu_seconds_of_children():
    """{pid: CPU seconds} of every process this one started (a local Ray's daemons and workers)."""
    times = {}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            times[child.pid] = t.user + t.system
    return times


def _busy_share(before, after, seconds, but_busiest=False):
    """Cores' worth of CPU the processes in both samples used between them, optionally leaving out
    the busiest one (the process that runs the loop)."""
    used = sorted(after[pid] - before[pid] for pid in after if pid in before)
    return sum(used[:-1] if but_busiest and used else used) / seconds


def idle_ray_share(threads, seconds=20.0):
    """The share of one core that an idle local Ray's processes (its daemons and idle workers) use,
    over `seconds` after its start-up: a floor under the training pass's slow-down wherever the
    loop uses every core."""
    def measure():
        time.sleep(5.0)  # its start-up over
        before = _cpu_seconds_of_children()
        time.sleep(seconds)
        return _busy_share(before, _cpu_seconds_of_children(), seconds)

    return _on_local_ray(threads, measure)


class RayShareMeter:
    """While a run goes on, the CPU that the local Ray's processes other than the loop's use: sampled
    every second in a thread; share() is taken between `skip` seconds after the start and the
    last sample, leaving start-up and the final evaluation out."""

    def __init__(self, skip=15.0):
        self.skip, self.samples, self.stop = skip, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.perf_counter()
        while not self.stop.wait(1.0):
            if time.perf_counter() - start >= self.skip:
                self.samples.append((time.perf_counter(), _cpu_seconds_of_children()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def share(self, tail=3):
        """Cores' worth used by Ray's other processes, or None when the run was too short to tell."""
        if len(self.samples) < tail + 2:
            return None
        (t0, first), (t1, last) = self.samples[0], self.samples[-1 - tail]  # the final evaluation left out
        return _busy_share(first, last, t1 - t0, but_busiest=True)


def timed(fn, *args):
    """(wall seconds, training seconds, Ray's other processes' CPU in cores or None) of fn(*args),
    which returns the training seconds."""
    start = time.perf_counter()
    with RayShareMeter() as meter:
        training = fn(*args)
    return time.perf_counter() - start, training, meter.share()


MODES = (script, trial, train)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, nargs=2, default=(2, 12), metavar=("FEW", "MANY"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    few, many = args.epochs
    if not 1 <= few < many:
        parser.error(f"--epochs {few} {many}: expected 1 <= FEW < MANY")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")
    storage = tempfile.mkdtemp(prefix="nvae-overhead-")
    script(run_config(args.dataset, "smoke", epochs=1), run_options(args.dataset, "smoke", storage_path=storage,
                                                                    name="warm-up"))  # first-use costs
    per_epoch = {m.__name__: {"pass": [], "rest": []} for m in MODES}
    ray_shares = {"trial": [], "train": []}  # cores' worth used by Ray's processes beside the loop's
    for round_ in range(args.rounds):
        runs = {}
        for epochs in (few, many):
            cfg = run_config(args.dataset, "smoke", epochs=epochs)
            for mode in MODES:
                options = run_options(args.dataset, "smoke", workers=1, cpus_per_worker=float(args.threads),
                                      threads_per_worker=args.threads, storage_path=storage,
                                      name=f"{mode.__name__}-{epochs}-{round_}")
                wall, training, ray_share = timed(mode, cfg, options)
                runs[mode.__name__, epochs] = wall, training
                if ray_share is not None and mode is not script and epochs == many:
                    ray_shares[mode.__name__].append(ray_share)
                print(f"round {round_ + 1}: {mode.__name__:>6}, {epochs:>3} epochs: {wall:.1f} s "
                      f"({training:.1f} s training)", flush=True)
        for name in per_epoch:
            (wall_few, pass_few), (wall_many, pass_many) = runs[name, few], runs[name, many]
            epoch_pass = (pass_many - pass_few) / (many - few)
            per_epoch[name]["pass"].append(epoch_pass)
            per_epoch[name]["rest"].append((wall_many - wall_few) / (many - few) - epoch_pass)
    median = {name: {part: statistics.median(values) for part, values in parts.items()}
              for name, parts in per_epoch.items()}
    row = {"dataset": args.dataset, "epochs": [few, many], "rounds": args.rounds, "threads": args.threads,
           "cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
           "per_epoch_s": {name: {part: [round(v, 3) for v in values] for part, values in parts.items()}
                           for name, parts in per_epoch.items()}}
    base = median["script"]
    print(f"script: training pass {base['pass']:.2f} s, the rest {base['rest']:.3f} s per epoch "
          f"(medians of {args.rounds} rounds)")
    for name in ("trial", "train"):
        slower = median[name]["pass"] / base["pass"] - 1
        fixed = median[name]["rest"] - base["rest"]
        share = (slower * EPOCH_SECONDS + fixed) / EPOCH_SECONDS
        others = statistics.median(ray_shares[name]) if ray_shares[name] else math.nan
        row[name] = {"pass_slower": round(slower, 4), "rest_over_script_s": round(fixed, 3),
                     "overhead_of_30s_epoch": round(share, 4), "ray_other_processes_cores": round(others, 4)}
        print(f"{name}: training pass {slower:+.1%}, the rest {fixed:+.3f} s per epoch over the script's: "
              f"{share:+.2%} of a {EPOCH_SECONDS:.0f}-second epoch; while it trained, Ray's other processes "
              f"used {others:.1%} of a core ({others / args.threads:.1%} of the {args.threads} the loop runs on)")
    row["idle_ray_core_share"] = round(idle_ray_share(args.threads), 4)
    print(f"an idle local Ray's processes use {row['idle_ray_core_share']:.1%} of a core "
          f"({row['idle_ray_core_share'] / args.threads:.1%} of the {args.threads} the loop runs on)")
    print(f"CPU {row['cpu']}, ISA {row['isa']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
