"""A worker's training memory, estimated before anything starts. The model is built on PyTorch's meta
device (shapes, no storage) and run forward there, so a size typo (--set
num_channels_enc=4096: 9 B parameters) is refused in a second, not found by the kernel after minutes.

The figures were calibrated on a CPU against the peak RSS of three training steps (batch 8 to 2048,
0.18 M to 144 M parameters): the estimate came within 30% of the measured growth. A worker process
holds BASE_GB before its model (0.73 GB measured: torch imported); each parameter costs its weight,
gradient, Adam's two moments and its weight-normalized copy (24 bytes measured); of the bytes the
forward's operations output per image, about ACTIVATION_SHARE is held at the peak.
"""
import functools
import json
import os
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nvae_core import NVAE, NVAEConfig
from nvae_platform.train.estimate_cache import remembered

BASE_GB = 0.75
BYTES_PER_PARAMETER = 24
ACTIVATION_SHARE = 0.8
SMOKE_USUAL_GB = 0.025  # the smoke model's own share at batch 32 (0.18 M parameters, 0.78 MB per image)
FAR_ABOVE = 20  # a smoke run's model share this many times the usual is warned about


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    model_gb: float  # weights, gradients and optimizer state
    activations_gb: float  # of one worker's batch

    @property
    def worker_gb(self):
        """One worker's training memory: its process, model and batch."""
        return BASE_GB + self.model_gb + self.activations_gb


PROBE_IMAGES = 11  # a batch size no weight's first dimension is likely to share
MEASURED_GROUPS = 16  # deeper hierarchies: measured at 8 and 16 groups per scale, and extrapolated


class _BatchBytes(TorchDispatchMode):
    """Sums the bytes of the tensors of PROBE_IMAGES rows that the operations run under it output."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[0] == PROBE_IMAGES:
                self.total += tensor.numel() * tensor.element_size()
        return out


def _measure(cfg):
    """(parameters, the bytes the forward's operations output per image) of cfg, built and run on the
    meta device; (parameters, 0) when an operation has no meta kernel."""
    with torch.device("meta"):
        model = NVAE(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    mode = _BatchBytes()
    try:
        with mode:
            model(torch.zeros(PROBE_IMAGES, cfg.image_channels, cfg.image_size, cfg.image_size, device="meta"))
    except Exception:  # noqa: BLE001  the parameters alone
        return parameters, 0
    return parameters, mode.total / PROBE_IMAGES


def _measured(config_json):
    """[parameters, bytes output per image] of the config."""
    cfg = NVAEConfig().replace(**json.loads(config_json))
    groups = cfg.num_groups_per_scale
    if groups <= MEASURED_GROUPS:
        return list(_measure(cfg))
    # both grow linearly with the groups (the parameters exactly); building 400 groups takes 20 s
    low, high = (_measure(cfg.replace(num_groups_per_scale=g)) for g in (MEASURED_GROUPS // 2, MEASURED_GROUPS))
    return [round(h + (h - lo) * (groups - MEASURED_GROUPS) / (MEASURED_GROUPS // 2)) for lo, h in zip(low, high)]


@functools.lru_cache(maxsize=64)
def _estimate(config_json):
    parameters, per_image = remembered(config_json, __file__, lambda: _measured(config_json))
    batch_size = json.loads(config_json)["batch_size"]
    return MemoryEstimate(parameters, parameters * BYTES_PER_PARAMETER / 1e9,
                          ACTIVATION_SHARE * per_image * batch_size / 1e9)


# Fields of the objective and the optimizer: configs that differ only in these share one estimate
# (a study's seeds, or its levels of sr_lambda, are estimated once).
NOT_SIZES = ("kl_anneal_portion", "kl_const_portion", "kl_min_coeff", "kl_balance", "sr_lambda", "sr_lambda_init",
             "epochs", "learning_rate", "learning_rate_min", "warmup_epochs", "weight_decay", "adamax_eps", "seed",
             "train_flip", "eval_split", "compile")


def estimate_memory(cfg):
    """The MemoryEstimate of training cfg on one worker (nothing is allocated)."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_SIZES}
    return _estimate(json.dumps(values, sort_keys=True, default=str))


def machine_memory_gb(on_gpu):
    """GB one worker can use here: the smallest GPU's memory (on_gpu), else the machine's RAM."""
    if on_gpu and torch.cuda.is_available():
        return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _count(parameters):
    return f"{parameters / 1e9:.3g} B" if parameters >= 1e9 else f"{parameters / 1e6:.3g} M"


def check_memory(cfg, workers, on_gpu, have_gb=None, where="this machine"):
    """Raise ValueError, naming both figures, when training cfg on `workers` workers here needs more
    memory than there is: on CPUs the workers share the machine's RAM; on GPUs each needs at least its
    weights, gradients and optimizer state in its GPU's memory (activations there, under mixed
    precision, were not measured, so they are not counted). Returns the MemoryEstimate."""
    found = estimate_memory(cfg)
    have_gb = machine_memory_gb(on_gpu) if have_gb is None else have_gb
    sharing = 1 if on_gpu else workers
    each = found.model_gb if on_gpu else found.worker_gb
    if sharing * each > have_gb:
        need = f"{sharing} workers x {each:.3g} GB" if sharing > 1 else f"{each:.3g} GB"
        parts = f"{found.model_gb:.3g} GB weights, gradients and optimizer state" + (
            "" if on_gpu else f", {found.activations_gb:.3g} GB for batch_size={cfg.batch_size}")
        raise ValueError(
            f"--set: the model has {_count(found.parameters)} parameters and training it needs about {need} of "
            f"{'GPU memory' if on_gpu else 'memory'} ({parts}), more than the {have_gb:.3g} GB of {where}: lower "
            "the model's sizes or batch_size (--set), or --address a cluster with larger nodes")
    return found


def smoke_warning(cfg):
    """The warning for a smoke-scale config far above the smoke model's size, else None."""
    found = estimate_memory(cfg)
    share = found.model_gb + found.activations_gb
    if share < FAR_ABOVE * SMOKE_USUAL_GB:
        return None
    return (f"warning: at --scale smoke this model ({_count(found.parameters)} parameters, about "
            f"{found.worker_gb:.3g} GB per worker) is {share / SMOKE_USUAL_GB:.0f} times the scale's usual size; "
            "expect minutes per epoch on a CPU: check the --set sizes")


def cluster_memory_warning(cfg, on_gpu, nodes):
    """The warning for CPU workers on a Ray cluster none of whose alive nodes (ray.nodes()) offers the
    memory one worker needs (Ray's `memory` resource: a node's RAM for tasks, in bytes), else None.
    A warning, not a refusal: the autoscaler may add larger nodes. GPU workers are not checked here:
    Ray reports no GPU's memory."""
    have_gb = max((n["Resources"].get("memory", 0) for n in nodes if n.get("Alive")), default=0) / 1e9
    found = estimate_memory(cfg)
    if on_gpu or not have_gb or found.worker_gb <= have_gb:
        return None
    return (f"warning: a worker needs about {found.worker_gb:.3g} GB of memory ({_count(found.parameters)} "
            f"parameters, batch_size={cfg.batch_size}) and the largest node of the Ray cluster offers {have_gb:.3g} GB "
            "to tasks: its workers will be killed for memory unless the autoscaler adds a larger node; lower the "
            "model's sizes or batch_size (--set)")
