"""Throughput of this checkout as a ratio against another commit, measured on this machine.

    python benchmarks/benchmark_against.py HEAD~1 --rounds 3
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/benchmark_against.py HEAD~1

The reference commit is checked out in a temporary git worktree; the two trees run
benchmarks/benchmark_throughput.py in alternation (reference, this, reference, this, ...) so that
drifts of the machine fall on both. Prints the CPU model, the ISA torch dispatches to, each run's
figures and the median ratios (this / reference) of train and eval images/s and of peak memory.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nvae_platform.machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmark_throughput.py"
FIGURES = ("train_images_per_s", "eval_images_per_s", "peak_rss_gb")


def run_benchmark(tree, configs, steps, out):
    """benchmark_throughput.py of `tree` (its own nvae_core first on the path) -> rows by config."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    script = next(p for p in (tree / "benchmarks" / SCRIPT, tree / "studies" / SCRIPT) if p.exists())  # studies/ before the move
    command = [sys.executable, str(script), "--config", *configs,
               "--steps", str(steps), "--precision", "fp32", "--json", str(out)]
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return {row["config"]: row for row in json.loads(out.read_text())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="the commit to compare with, e.g. HEAD~1")
    parser.add_argument("--config", nargs="+", default=["cifar-small", "cifar-small-nf1", "mnist-small"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}; ISA: {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference"
        subprocess.run(["git", "worktree", "add", "--detach", str(reference), args.reference], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            runs = {"reference": [], "this": []}
            for round_ in range(args.rounds):
                for name, tree in (("reference", reference), ("this", ROOT)):
                    rows = run_benchmark(tree, args.config, args.steps, Path(tmp) / f"{name}{round_}.json")
                    runs[name].append(rows)
                    print(f"round {round_ + 1} {name:<9} " + "  ".join(
                        f"{c}: {rows[c]['train_images_per_s']:.2f}/{rows[c]['eval_images_per_s']:.1f} img/s "
                        f"{rows[c]['peak_rss_gb']:.2f} GB" for c in args.config), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, check=False)
    print(f"\nmedian over {args.rounds} rounds, this / {args.reference}:")
    print(f"{'config':<18}" + "".join(f"{f:>26}" for f in FIGURES))
    for config in args.config:
        ratios = []
        for figure in FIGURES:
            ref = statistics.median(r[config][figure] for r in runs["reference"])
            this = statistics.median(r[config][figure] for r in runs["this"])
            ratios.append(f"{this:.2f} / {ref:.2f} = {this / ref:.3f}")
        print(f"{config:<18}" + "".join(f"{r:>26}" for r in ratios))


if __name__ == "__main__":
    main()
