"""How much of a study's wall time is training: run a study script from an empty folder and compare.

    python benchmarks/benchmark_study.py                       # ablation_norm at smoke scale, no flags
    python benchmarks/benchmark_study.py --study ablation_sr --json study.json

The study runs as a user runs it (`python studies/<study>.py`, no flags) in a fresh temporary folder
with its own Ray temp folder, so nothing is resumed. Training seconds are the sum of every trial's
epoch_seconds (its training passes, from its outcome file); the ideal wall time is that sum divided
by the trials that run at once (the local Ray's CPUs / CPUs per trial: 2 on a 2-core machine).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from nvae_platform.machine import cpu_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training_seconds(folder):
    """(sum of the trials' training seconds, trial count, their statuses) from the outcome files."""
    outcomes = []
    for path in glob.glob(os.path.join(folder, "runs", "*", "trials", "*", "outcome.json")):
        with open(path) as f:
            outcomes.append(json.load(f))
    return sum(o.get("training_hours", 0.0) * 3600 for o in outcomes), len(outcomes), [o["status"] for o in outcomes]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="ablation_norm", help="a script in studies/, without .py")
    parser.add_argument("--concurrent", type=int, default=None,
                        help="trials at once (default: this machine's CPUs, as the study's local Ray)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("args", nargs="*", help="flags passed on to the study (after --)")
    args = parser.parse_args(argv)
    script = os.path.join(REPO, "studies", f"{args.study}.py")
    if not os.path.isfile(script):
        parser.error(f"--study {args.study}: no studies/{args.study}.py; name a script in {os.path.join(REPO, 'studies')}")
    concurrent = args.concurrent or os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="nvae-study-bench-") as folder:
        env = {**os.environ, "RAY_TMPDIR": os.path.join(folder, "ray")}
        for name in ("MLFLOW_TRACKING_URI", "NVAE_STORAGE_PATH", "RAY_ADDRESS"):
            env.pop(name, None)  # the study's defaults: ./mlflow.db, ./runs, a local Ray
        os.makedirs(env["RAY_TMPDIR"])
        start = time.perf_counter()
        done = subprocess.run([sys.executable, script, *args.args], check=False, cwd=folder, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{args.study} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        trained, trials, statuses = training_seconds(folder)
    ideal = trained / concurrent
    row = {"study": args.study, "flags": args.args, "trials": trials, "statuses": sorted(set(statuses)),
           "wall_s": round(wall, 1), "training_s": round(trained, 1), "concurrent": concurrent,
           "ideal_s": round(ideal, 1), "wall_over_ideal": round(wall / ideal, 3),
           "cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "load_after": os.getloadavg()[0]}
    print(f"{args.study}: {trials} trials, wall {wall:.0f} s, training {trained:.0f} s, ideal {ideal:.0f} s "
          f"({trained:.0f} / {concurrent}), wall / ideal = {wall / ideal:.2f}")
    print(f"CPU {row['cpu']}, ISA {row['isa']}, load average after {row['load_after']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
