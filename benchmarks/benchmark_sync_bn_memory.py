"""Peak memory per worker of NVAE training steps: 2 CPU workers (gloo, DDP, synchronized BN) against
1 worker at the same per-worker batch, with the fused BN-act-conv path on and off.

    python benchmarks/benchmark_sync_bn_memory.py --config cifar-small --steps 3

Each worker is set up as the platform's (nvae_platform.train.worker_loop): the same seed on every rank,
NVAE + TrainStep, then DistributedDataParallel around synchronize_batchnorm(model) when there are 2;
every worker is single-threaded and trains on its own fake batch. Per worker it reports the peak
RSS of its process, and the peak of the training steps above the RSS just before them (Linux:
VmHWM reset through /proc/self/clear_refs). "unfused" runs NormActConv as separate modules, which
is what synchronized BN did before it joined the fused path.
"""
import argparse
import os
import resource
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from benchmark_throughput import fake_batch
from torch import nn

from nvae_core import NVAE, PRESETS, TrainStep, layers, preset
from nvae_core.layers import synchronize_batchnorm
from nvae_platform.machine import cpu_model


def _unfused_forward(self, x):
    """NormActConv.forward without the fused path: BN, activation, upsampling and conv as modules."""
    a = layers._activate(self.act, x if self.bn is None else self.bn(x))
    return self.conv(layers.upsample2(a) if self.upsample else a)


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak():
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(rank, world, port, config, steps, fused, queue):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if not fused:
        layers.NormActConv.forward = _unfused_forward
    cfg = preset(config)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = NVAE(cfg)
    step = TrainStep(model, steps_per_epoch=1000)
    if world > 1:
        step.model = nn.parallel.DistributedDataParallel(synchronize_batchnorm(model))
    torch.manual_seed(1000 + rank)
    x = fake_batch(cfg, cfg.batch_size, "cpu")
    before_kb = _status_kb("VmRSS")
    resettable = _reset_peak()
    for _ in range(steps):
        step(x)
    step_peak_gb = (_status_kb("VmHWM") - before_kb) / 1e6 if resettable else float("nan")
    queue.put({"rank": rank, "step_peak_gb": step_peak_gb,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6})
    if world > 1:
        dist.destroy_process_group()


def measure(world, config, steps, fused):
    """Figures of each worker of one run (fresh processes): a list of dicts, rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(world, port, config, steps, fused, queue), nprocs=world, join=True)
    return sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar-small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=3, help="training steps per worker")
    args = parser.parse_args(argv)
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cores), ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}")
    print(f"{args.config}, per-worker batch {PRESETS[args.config]['batch_size']}, {args.steps} steps, 1 thread each")
    print(f"{'path':<9}{'workers':>8}{'peak RSS GB (per worker)':>28}{'step peak GB (per worker)':>29}")
    runs = {}
    for fused in (True, False):
        for world in (1, 2):
            rows = runs[fused, world] = measure(world, args.config, args.steps, fused)
            rss, step = (" ".join(f"{r[key]:.3f}" for r in rows) for key in ("peak_rss_gb", "step_peak_gb"))
            print(f"{'fused' if fused else 'unfused':<9}{world:>8}{rss:>28}{step:>29}", flush=True)

    def ratio(key, fused):
        return max(r[key] for r in runs[fused, 2]) / runs[True, 1][0][key]

    for key in ("peak_rss_gb", "step_peak_gb"):
        print(f"{key}, 2 workers / 1 worker (fused): synced fused {ratio(key, True):.3f}x, "
              f"synced unfused (before) {ratio(key, False):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
