"""How long `python -m reports` takes on a large study: a SQLite store with one study of N trial runs
(default 1,000), each with E epochs of per-epoch metrics and the final figures, written through
MLflow's API; then build_report is timed (the issue's target: under 10 s for 1,000 runs).

    python benchmarks/benchmark_reports.py --runs 1000 --epochs 10
"""
import argparse
import json
import os
import tempfile
import time

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from reports.build import build_report


def make_store(folder, runs, epochs):
    """One ablation_norm-shaped study: 3 norm_act levels x 3 depths x runs/9 seeds, 5 % diverged."""
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.create_experiment("bench", artifact_location=f"file://{folder}/art")
    parent = client.create_run(experiment, run_name="bench-small-00000000",
                               tags={"nvae.study": "ablation_norm", "nvae.scale": "small", "nvae.kind": "grid"})
    pid = parent.info.run_id
    params = {"levels.norm_act": "WN+ELU,BN+ELU,BN+Swish", "levels.groups": "10,20,40", "factors": "norm_act,groups",
              "table.columns": "test_bpd", "table.across": "groups",
              "table.baseline": json.dumps({"norm_act": "BN+Swish"})}
    client.log_batch(pid, params=[Param(k, v) for k, v in params.items()])
    now = int(time.time() * 1000)
    for i in range(runs):
        act, groups = ["WN+ELU", "BN+ELU", "BN+Swish"][i % 3], ["10", "20", "40"][(i // 3) % 3]
        status = "diverged" if i % 20 == 7 else "finished"
        run = client.create_run(experiment, run_name=f"norm_act={act},groups={groups},seed={i // 9}", tags={
            "mlflow.parentRunId": pid, "factor.norm_act": act, "factor.groups": groups, "nvae.seed": str(i // 9),
            "nvae.status": status})
        metrics = [Metric(name, 3.5 - 0.01 * e + 0.001 * (i % 7), now, e) for e in range(epochs)
                   for name in ("val_bpd", "train_bpd", "train_kl", "lr", "epoch_seconds")]
        metrics += [Metric(f"train_kl_group_{g}", 0.1 * g, now, epochs - 1) for g in range(int(groups))]
        if status == "finished":
            metrics += [Metric("test_bpd", 3.2 + 0.01 * (i % 5), now, epochs - 1)]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
        client.set_terminated(run.info.run_id)
    client.set_terminated(pid)
    return client.tracking_uri


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        uri = make_store(folder, args.runs, args.epochs)
        print(f"store of {args.runs} runs x {args.epochs} epochs written in {time.perf_counter() - start:.1f} s")
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            paths = build_report("bench", uri, out=os.path.join(folder, "out"))
            timings.append(time.perf_counter() - start)
        print(f"build_report: {len(paths)} files; seconds per build (3 runs): "
              + ", ".join(f"{t:.2f}" for t in timings) + f"; best {min(timings):.2f} s (target < 10 s)")


if __name__ == "__main__":
    main()
