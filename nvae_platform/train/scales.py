"""Scales of a run: smoke (offline, minutes on a CPU), small (one GPU), paper (the paper's model).

A scale picks the model size and run options for a dataset; a study or the train command then
overrides the fields it varies.
"""
from nvae_core import NVAEConfig, preset
from nvae_core.config import ConfigError
from nvae_core.dataset_registry import DATASETS
from nvae_platform.train.run_options import RunOptions

SCALES = ("smoke", "small", "paper")

SMOKE_MODEL = dict(num_channels_enc=16, num_channels_dec=16, num_latent_scales=1, num_groups_per_scale=4,
                   num_latent_per_group=8, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1,
                   num_preprocess_blocks=1, num_preprocess_cells=1, num_postprocess_blocks=1,
                   num_postprocess_cells=1, num_mixtures=3, num_flows=0, epochs=3, batch_size=32,
                   warmup_epochs=0.5)
PAPER_PRESET = {"mnist": "mnist", "cifar10": "cifar10", "celeba64": "celeba64"}
SMALL_EPOCHS = {"mnist": 40, "cifar10": 30, "celeba64": 15}
PAPER_WORKERS = {"mnist": 2, "cifar10": 8, "celeba64": 8}


def run_config(dataset, scale, model=None, **overrides):
    """The NVAEConfig of a dataset at a scale, with overrides (validated). model names the
    nvae_core preset used at the small and paper scales (default: the dataset's paper model)."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}: expected one of {', '.join(SCALES)}")
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    data = DATASETS[dataset].data_fields()
    if scale == "smoke":
        return NVAEConfig().replace(**{**SMOKE_MODEL, **data, **overrides})
    if dataset not in PAPER_PRESET:
        raise ConfigError(f"scale {scale!r} is defined for {', '.join(PAPER_PRESET)}; "
                          f"use --scale smoke with {dataset!r}")
    if scale == "small":
        name = model or ("cifar10-ablation" if dataset == "cifar10" else PAPER_PRESET[dataset])
        return preset(name, **{"epochs": SMALL_EPOCHS[dataset], **overrides})
    return preset(model or PAPER_PRESET[dataset], **overrides)


def run_options(dataset, scale, **overrides):
    """RunOptions for a scale: CPU workers and a quick evaluation for smoke, GPUs beyond; compile='auto'
    compiles (on CUDA, with a compiler) at the small and paper scales only."""
    if scale == "smoke":
        # The tiny model's evaluation is per-call bound: its 256 test images go in one batch, and
        # the importance samples in chunks of 1024 images.
        base = dict(workers=1, iw_samples=10, max_test_images=256, eval_batch_size=256, iw_max_batch=1024,
                    sample_count=8)
    elif scale == "small":
        base = dict(workers=1, gpus_per_worker=1.0, cpus_per_worker=4.0, iw_samples=100, loader_workers=2,
                    bn_readjust_batches=20, auto_compiles=True)
    else:
        base = dict(workers=PAPER_WORKERS.get(dataset, 8), gpus_per_worker=1.0, cpus_per_worker=4.0,
                    iw_samples=1000, iw_max_batch=1024, loader_workers=2, bn_readjust_batches=500,
                    auto_compiles=True)
    return RunOptions(**{**base, **overrides})
