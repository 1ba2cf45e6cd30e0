"""Training and evaluation throughput and peak memory of named NVAE configs.

    python benchmarks/benchmark_throughput.py --config cifar-small --device cpu --json out.json
    python benchmarks/benchmark_throughput.py --config cifar-small cifar10 --device cuda \
        --precision fp32 bf16 fp16 --compile both

A training step is the full one (forward, loss with KL balancing, SR and BN regularization,
backward, Adamax); evaluation is forward + NELBO without gradients. Each figure is the median of
--steps timed steps after --warmup steps. The first train and eval steps are timed on their own:
with torch.compile they hold the compilation, and "compile s" is their excess over the median
steps (eager's own first-step excess shown likewise). Every combination runs in a fresh process so
that its peak memory (RSS on CPU, CUDA max allocated on GPU) is its own; --rounds N runs the whole
list N times in turn (eager, compiled, eager, ...), so that a shared machine's load falls on both.

Model FLOP utilisation (MFU) = FLOPs per step / step time / the matmul FLOP/s measured in the same
process (a square matmul in the run's precision). FLOPs come from torch.utils.flop_counter on the
eager model's forward pass (its convolutions and matmuls); a training step counts 3x that, the
backward pass being a gradient of the input and one of the weights, each the forward's count
(torch's counter multiplies a grouped convolution's backward by the group count, so it is not used
there; the regularizers' power iterations add well under 1%).
"""
import argparse
import itertools
import json
import multiprocessing as mp
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from nvae_core import NVAE, PRESETS, TrainStep, autocast, preset
from nvae_platform.machine import cpu_model, peak_memory_gb

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fake_batch(cfg, batch, device):
    """Images on the config's data grid: binary for Bernoulli, num_x_bits levels otherwise."""
    x = torch.rand(batch, cfg.image_channels, cfg.image_size, cfg.image_size, device=device)
    levels = 2 ** cfg.num_x_bits - 1
    return torch.round(x * levels) / levels


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_seconds(fn, warmup, steps, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_s(device, precision, n=2048, steps=5):
    """The FLOP/s of an n x n matmul in the run's precision on this device (median of `steps`)."""
    a = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    b = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    return 2 * n ** 3 / _median_seconds(lambda: a @ b, 2, steps, device)


def count_flops(model, x, precision, device):
    """(train, eval) FLOPs of one step of the eager model on x: 3x the forward pass, the forward pass."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast(precision, device):
        model(x)
    forward = counter.get_total_flops()
    return 3 * forward, forward


def measure(config, device, precision, compiled, batch, warmup, steps, threads):
    """One combination, in this process: a dict of figures with self-describing keys."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(0)
    cfg = preset(config, precision=precision, **({"batch_size": batch} if batch else {}))
    model = NVAE(cfg).to(device)
    runner = torch.compile(model) if compiled else model
    x = fake_batch(cfg, cfg.batch_size, device)
    step = TrainStep(runner, steps_per_epoch=1000, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_first_s = _timed(lambda: step(x), device)
    train_s = _median_seconds(lambda: step(x), warmup, steps, device)

    def evaluate():
        with torch.no_grad(), autocast(precision, device):
            runner(x).nelbo.mean().item()

    runner.eval()
    eval_first_s = _timed(evaluate, device)
    eval_s = _median_seconds(evaluate, warmup, steps, device)
    peak_gb = peak_memory_gb(device)  # read before the FLOP count and the matmul probe, which are not the model's
    train_flops, eval_flops = count_flops(model, x, precision, device)
    peak_flops = matmul_flops_per_s(device, precision)
    memory_key = "peak_cuda_allocated_gb" if device.type == "cuda" else "peak_rss_gb"
    return {"config": config, "device": str(device), "precision": precision,
            "compiled": compiled, "batch_size": cfg.batch_size, "threads": torch.get_num_threads(),
            "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_images_per_s": cfg.batch_size / train_s, "train_step_s": train_s,
            "eval_images_per_s": cfg.batch_size / eval_s, "eval_step_s": eval_s, memory_key: peak_gb,
            "train_first_step_s": train_first_s, "eval_first_step_s": eval_first_s,
            "compile_s": train_first_s - train_s + eval_first_s - eval_s,
            "train_gflop_per_step": train_flops / 1e9, "eval_gflop_per_step": eval_flops / 1e9,
            "matmul_gflop_per_s": peak_flops / 1e9, "train_mfu": train_flops / train_s / peak_flops,
            "eval_mfu": eval_flops / eval_s / peak_flops,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _child(queue, kwargs):
    try:
        queue.put(measure(**kwargs))
    except Exception as error:  # noqa: BLE001  reported as a row, so one failing combination keeps the others
        queue.put({**kwargs, "error": f"{type(error).__name__}: {error}"})


def run_isolated(**kwargs):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["cifar-small", "cifar-small-nf1", "mnist-small"],
                        choices=sorted(PRESETS), help="preset names to measure")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                        help="eager, torch.compile, or both")
    parser.add_argument("--batch", type=int, default=0, help="override the preset's per-worker batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="run every combination this many times, in turn")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if "fp16" in args.precision and not args.device.startswith("cuda"):
        parser.error("--precision fp16 needs --device cuda (fp16 training uses a CUDA gradient scaler)")
    compiled = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    rows = []
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model()
    print(f"device: {device_name}; CPU: {cpu_model()}; ISA: {torch.backends.cpu.get_cpu_capability()}; "
          f"torch {torch.__version__}; threads {args.threads or torch.get_num_threads()}")
    header = (f"{'config':<18}{'prec':<6}{'compile':<9}{'batch':>6}{'train img/s':>13}{'eval img/s':>12}"
              f"{'peak GB':>9}{'train MFU':>11}{'eval MFU':>10}{'matmul GFLOP/s':>16}{'compile s':>11}")
    print(header)
    combinations = list(itertools.product(args.config, args.precision, compiled))
    for round_, (config, precision, comp) in itertools.product(range(args.rounds), combinations):
        row = run_isolated(config=config, device=args.device, precision=precision, compiled=comp,
                           batch=args.batch, warmup=args.warmup, steps=args.steps, threads=args.threads)
        rows.append({**row, "round": round_})
        if args.json:  # after every row: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        if "error" in row:
            print(f"{config:<18}{precision:<6}{comp!s:<9} failed: {row['error']}")
            continue
        peak = row.get("peak_rss_gb", row.get("peak_cuda_allocated_gb"))
        print(f"{config:<18}{precision:<6}{comp!s:<9}{row['batch_size']:>6}{row['train_images_per_s']:>13.1f}"
              f"{row['eval_images_per_s']:>12.1f}{peak:>9.2f}{row['train_mfu']:>11.1%}{row['eval_mfu']:>10.1%}"
              f"{row['matmul_gflop_per_s']:>16.0f}{row['compile_s']:>11.1f}", flush=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
