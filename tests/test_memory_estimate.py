"""A worker's training memory, estimated on the meta device before anything starts: no Ray."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nvae_core import NVAE
from nvae_platform.train.estimate_cache import remembered
from nvae_platform.train.failures import reason
from nvae_platform.train.memory import check_memory, cluster_memory_warning, estimate_memory, smoke_warning
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


def test_on_a_cluster_cpu_workers_larger_than_its_largest_node_are_warned_about():
    cfg = run_config("digits", "smoke", num_channels_enc=512, num_channels_dec=512, batch_size=8)  # about 4.4 GB
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "memory": 3e9}},  # as ray.nodes() gives them
             {"Alive": False, "Resources": {"CPU": 64.0, "memory": 500e9}},  # a lost node counts for nothing
             {"Alive": True, "Resources": {"CPU": 2.0, "memory": 2e9}}]
    warning = cluster_memory_warning(cfg, on_gpu=False, nodes=nodes)
    assert warning.startswith("warning: a worker needs about 4.") and "offers 3 GB" in warning, warning
    assert cluster_memory_warning(cfg, on_gpu=True, nodes=nodes) is None  # Ray reports no GPU's memory
    nodes.append({"Alive": True, "Resources": {"CPU": 16.0, "memory": 64e9}})
    assert cluster_memory_warning(cfg, on_gpu=False, nodes=nodes) is None


def test_a_measurement_is_kept_on_disk_so_the_next_command_skips_the_meta_device(tmp_path, monkeypatch):
    monkeypatch.setenv("NVAE_MEMORY_CACHE", str(tmp_path))
    cfg = run_config("digits", "smoke", num_latent_per_group=7)  # measured nowhere else in the suite
    first = estimate_memory(cfg)
    assert len(list(tmp_path.glob("*.json"))) == 1
    script = ("import sys; from nvae_platform.train.memory import estimate_memory; "
              "from nvae_platform.train.scales import run_config; "
              "found = estimate_memory(run_config('digits', 'smoke', num_latent_per_group=7)); "
              "print(found.parameters, found.worker_gb, 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "NVAE_MEMORY_CACHE": str(tmp_path)}).stdout.split()
    assert out == [str(first.parameters), str(first.worker_gb), "False"]  # no meta kernels loaded


def test_a_damaged_or_outdated_measurement_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NVAE_MEMORY_CACHE", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return [123, 4.5]

    assert remembered('{"a": 1}', __file__, measure) == [123, 4.5]
    assert remembered('{"a": 1}', __file__, measure) == [123, 4.5] and len(calls) == 1
    (kept,) = tmp_path.glob("*.json")
    kept.write_text('{"config": "{\\"a\\"')  # a write cut short
    assert remembered('{"a": 1}', __file__, measure) == [123, 4.5] and len(calls) == 2
    assert json.loads(kept.read_text())["value"] == [123, 4.5]
    other_code = tmp_path / "changed.py"
    other_code.write_text("# the measuring code, changed")
    assert remembered('{"a": 1}', str(other_code), measure) == [123, 4.5] and len(calls) == 3
    monkeypatch.setenv("NVAE_MEMORY_CACHE", str(tmp_path / "file" / "under"))
    (tmp_path / "file").write_text("not a folder")  # an unwritable cache only means measuring
    assert remembered('{"a": 1}', __file__, measure) == [123, 4.5] and len(calls) == 4
