"""A worker's training memory, estimated on the meta device before anything starts: no Ray."""
import pytest
import torch

from nvae_core import NVAE
from nvae_platform.train.failures import reason
from nvae_platform.train.memory import check_memory, estimate_memory, smoke_warning
from nvae_platform.train.scales import run_config


def _parameters(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in NVAE(cfg).parameters())


def test_the_parameters_are_the_models_own_also_where_the_groups_are_extrapolated():
    smoke = run_config("digits", "smoke")
    assert estimate_memory(smoke).parameters == sum(p.numel() for p in NVAE(smoke).parameters())
    deep = run_config("cifar10", "small", num_groups_per_scale=24)  # beyond the 16 groups measured
    assert estimate_memory(deep).parameters == _parameters(deep)


def test_a_model_larger_than_the_memory_is_refused_naming_both_figures():
    cfg = run_config("digits", "smoke", num_channels_enc=512, num_channels_dec=512, batch_size=8)
    found = check_memory(cfg, 1, on_gpu=False, have_gb=100)
    assert 3 < found.model_gb < 4 and 4 < found.worker_gb < 5  # measured peak RSS: 4.53 GB
    with pytest.raises(ValueError, match=r"144 M parameters .* about 2 workers x 4\.\d+ GB of memory .* more than "
                                         r"the 8 GB of this machine"):
        check_memory(cfg, 2, on_gpu=False, have_gb=8)
    check_memory(cfg, 8, on_gpu=True, have_gb=4)  # a GPU each; activations not counted there
    with pytest.raises(ValueError, match="GPU memory .* more than the 3 GB"):
        check_memory(cfg, 1, on_gpu=True, have_gb=3)
    assert "144 M parameters" in smoke_warning(cfg)
    assert smoke_warning(run_config("digits", "smoke")) is None


def test_a_failure_reason_ending_in_a_colon_shows_the_cause_after_it():
    error = RuntimeError("Training failed due to controller error:\n4 worker(s) were killed due to the node "
                         "running low on memory.\nMemory on the node was 22.1GB / 23.0GB")
    assert reason(error) == ("RuntimeError: Training failed due to controller error: 4 worker(s) were killed due "
                             "to the node running low on memory.")
