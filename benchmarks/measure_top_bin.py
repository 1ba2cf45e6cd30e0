"""How much the authors' logistic-mixture top bin lowers bits/dim: train a model briefly, then score
the same forward passes with both likelihoods (logistic_top_bin "exact" and "authors").

    python benchmarks/measure_top_bin.py                                  # photo-patches, offline; 14 min on 2 cores
    python benchmarks/measure_top_bin.py --dataset cifar10 --data-dir data --steps 2000

The authors' threshold (x > 0.99) gives 8-bit level 254 all the mass above 253.5, so only images
with 254-valued subpixels score differently, and the difference is a gain the data did not earn.
"""
import argparse
import math

import torch
from torch.utils.data import DataLoader

from nvae_core import NVAE, TrainStep, preset
from nvae_core.datasets import Batches, load_dataset
from nvae_core.distributions import reconstruction_nll


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="photo-patches", choices=["photo-patches", "cifar10"])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", type=int, default=300, help="training steps before scoring")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train = load_dataset(args.dataset, "train", args.data_dir)
    test = load_dataset(args.dataset, "test", args.data_dir)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    epochs = max(1, math.ceil(args.steps / len(loader)))
    cfg = preset("cifar-small", dataset=args.dataset, epochs=epochs, batch_size=args.batch_size, warmup_epochs=0.5)
    model = NVAE(cfg)
    step = TrainStep(model, steps_per_epoch=len(loader))
    prepare = Batches(cfg, "cpu", seed=1, train=True)
    while step.step < args.steps:
        for x in loader:
            stats = step(prepare(x))
            if step.step >= args.steps:
                break
    print(f"trained {step.step} steps on {args.dataset}: last train NELBO {float(stats['nelbo']) / (cfg.num_dims * math.log(2)):.3f} bpd")

    authors = cfg.replace(logistic_top_bin="authors")
    model.eval()
    totals = {"exact": 0.0, "authors": 0.0}
    count = level_254 = subpixels = 0
    prepare = Batches(cfg, "cpu", seed=2)
    with torch.no_grad():
        for x in DataLoader(test, batch_size=64):
            x = prepare(x)
            result = model(x)
            totals["exact"] += (result.recon_nll + result.kl.sum(1)).sum().item()
            totals["authors"] += (reconstruction_nll(authors, result.output, x) + result.kl.sum(1)).sum().item()
            count += x.shape[0]
            level_254 += int((torch.round(x * 255) == 254).sum())
            subpixels += x.numel()
    bpd = {k: v / count / (cfg.num_dims * math.log(2)) for k, v in totals.items()}
    print(f"{args.dataset} test ({count} images; {100 * level_254 / subpixels:.3f}% of subpixels are 254): "
          f"NELBO {bpd['exact']:.4f} bpd exact, {bpd['authors']:.4f} bpd with the authors' top bin, "
          f"difference {bpd['exact'] - bpd['authors']:+.4f} bpd")


if __name__ == "__main__":
    main()
