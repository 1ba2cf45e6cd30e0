"""Named configurations: the paper's models, the reduced ablation model, and benchmark sizes."""
from .config import ConfigError, NVAEConfig
from .dataset_registry import DATASETS


def _data(name):
    return DATASETS[name].data_fields()


PRESETS = {
    # The authors' release commands for Table 1 (per-GPU batch; see NVAE_SPEC.md).
    "mnist": dict(_data("mnist"), epochs=400, batch_size=200, num_channels_enc=32, num_channels_dec=32,
                  num_latent_scales=2, num_groups_per_scale=10, ada_groups=True,
                  num_preprocess_blocks=2, num_preprocess_cells=3,
                  num_postprocess_blocks=2, num_postprocess_cells=3, num_flows=0, sr_lambda=1e-2),
    "cifar10": dict(_data("cifar10"), epochs=400, batch_size=32, num_channels_enc=128,
                    num_channels_dec=128, num_latent_scales=1, num_groups_per_scale=30,
                    num_preprocess_blocks=1, num_preprocess_cells=2,
                    num_postprocess_blocks=1, num_postprocess_cells=2, num_flows=1, sr_lambda=1e-2),
    "celeba64": dict(_data("celeba64"), epochs=90, batch_size=16, num_channels_enc=64,
                     num_channels_dec=64, num_latent_scales=3, num_groups_per_scale=20, ada_groups=True,
                     num_preprocess_blocks=1, num_preprocess_cells=2,
                     num_postprocess_blocks=1, num_postprocess_cells=2, num_flows=1, sr_lambda=1e-1),
    # Section 5's reduced CIFAR-10 model (fewer channels, no flows); studies vary its switches.
    "cifar10-ablation": dict(_data("cifar10"), epochs=100, batch_size=32, num_channels_enc=64,
                             num_channels_dec=64, num_latent_scales=1, num_groups_per_scale=20,
                             num_flows=0, sr_lambda=1e-2),
    # Benchmark sizes (issue: speed target against the authors' release on a 2-core CPU).
    "cifar-small": dict(_data("cifar10"), batch_size=32, num_channels_enc=32, num_channels_dec=32,
                        num_latent_scales=1, num_groups_per_scale=10, num_latent_per_group=20,
                        num_flows=0),
    "cifar-small-nf1": dict(_data("cifar10"), batch_size=32, num_channels_enc=32, num_channels_dec=32,
                            num_latent_scales=1, num_groups_per_scale=10, num_latent_per_group=20,
                            num_flows=1),
    "mnist-small": dict(_data("mnist"), batch_size=64, num_channels_enc=16, num_channels_dec=16,
                        num_latent_scales=2, num_groups_per_scale=5, ada_groups=True,
                        num_cell_per_cond_enc=1, num_cell_per_cond_dec=1,
                        num_preprocess_blocks=2, num_preprocess_cells=2,
                        num_postprocess_blocks=2, num_postprocess_cells=2, num_flows=0),
}


def preset(name, **overrides):
    """The named preset as an NVAEConfig, with any fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(sorted(PRESETS))}")
    return NVAEConfig().replace(**{**PRESETS[name], **overrides})
