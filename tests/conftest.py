"""Shared fixtures: tiny configurations that build and run in milliseconds on a CPU."""
import pytest
import torch

from nvae_core import NVAEConfig


def tiny_config(**overrides):
    """A 3-channel 8x8 NVAE with two latent scales and every count at its smallest useful value."""
    base = dict(dataset="image-folder", image_channels=3, image_size=8, num_x_bits=8,
                likelihood="logistic_mixture", num_mixtures=3, num_channels_enc=8, num_channels_dec=8,
                num_preprocess_blocks=1, num_preprocess_cells=1, num_postprocess_blocks=1,
                num_postprocess_cells=1, num_latent_scales=2, num_groups_per_scale=2,
                num_latent_per_group=4, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1,
                epochs=1, batch_size=4)
    base.update(overrides)
    return NVAEConfig(**base)


def tiny_batch(cfg, batch=4, seed=0):
    """Images on the config's data grid (binary for Bernoulli)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.image_channels, cfg.image_size, cfg.image_size, generator=g)
    levels = 2 ** cfg.num_x_bits - 1
    return torch.round(x * levels) / levels


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on this machine's 2 cores for one test module (imported here, so unit tests stay Ray-free)."""
    import ray

    from nvae_platform.training_run import init_ray

    ray.shutdown()
    init_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory):
    """A finished smoke study in a fresh SQLite store, shared by the study, report and UI tests:
    two activations x a sane and an absurd learning rate (which diverges), all four trials at once
    (half a CPU per worker), two epochs each. Returns (StudyOutcome, tracking URI)."""
    import ray

    from nvae_platform.study import Factor, Study
    from nvae_platform.study_runner import StudySettings, run_study
    from nvae_platform.training_run import init_ray

    study = Study(
        name="test_study", description="two activations x a sane and an absurd learning rate",
        factors=(Factor("act", {"ELU": {"activation": "elu"}, "Swish": {"activation": "swish"}}),
                 Factor("lr", {"1e-2": {"learning_rate": 1e-2},
                               "1e9": {"learning_rate": 1e9, "warmup_epochs": 0.0}})),
        fixed={"epochs": 2}, baseline={"act": "Swish", "lr": "1e-2"})
    folder = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{folder}/mlflow.db"
    ray.shutdown()
    init_ray(num_cpus=2, log_to_driver=False)
    try:
        outcome = run_study(study, StudySettings(storage_path=str(folder / "runs"), tracking_uri=uri,
                                                 cpus_per_worker=0.5, max_concurrent=4))
    finally:
        ray.shutdown()
    return outcome, uri
