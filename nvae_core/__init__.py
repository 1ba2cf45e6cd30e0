"""NVAE (Vahdat & Kautz, NeurIPS 2020) in plain PyTorch, every ablation a config switch."""
from .config import ConfigError, NVAEConfig
from .evaluation import (
           active_unit_counts,
           active_units,
           active_units_kl,
           importance_weighted_nll,
           sample_images,
           test_bits_per_dim,
)
from .model import NVAE, ForwardResult
from .objective import bits_per_dim, kl_coefficient, nvae_loss
from .presets import PRESETS, preset
from .training import TrainStep, autocast, learning_rate

__all__ = [
           "NVAE",
           "PRESETS",
           "ConfigError",
           "ForwardResult",
           "NVAEConfig",
           "TrainStep",
           "active_unit_counts",
           "active_units",
           "active_units_kl",
           "autocast",
           "bits_per_dim",
           "importance_weighted_nll",
           "kl_coefficient",
           "learning_rate",
           "nvae_loss",
           "preset",
           "sample_images",
           "test_bits_per_dim",
]
