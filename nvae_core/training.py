"""One NVAE optimization step: Adamax, lr warm-up then cosine, mixed precision, the full loss."""
import contextlib
import math
import warnings

import torch
from torch import nn

from .layers import request_data_init
from .objective import nvae_loss
from .optim import Adamax
from .regularization import SpectralRegularizer


def make_optimizer(model, cfg):
    return Adamax(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=cfg.adamax_eps)


def learning_rate(step, steps_per_epoch, cfg):
    """The authors' schedule: a linear warm-up from 0 over warmup_epochs (per step), then cosine
    annealing stepped once per epoch from the first epoch after warmup_epochs, reaching
    learning_rate_min in the last epoch (their CosineAnnealingLR, T_max = epochs - warmup - 1)."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.learning_rate * step / warmup
    decays = max(0, step // steps_per_epoch - math.floor(cfg.warmup_epochs))
    span = max(1.0, cfg.epochs - cfg.warmup_epochs - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, decays / span)))
    return cfg.learning_rate_min + (cfg.learning_rate - cfg.learning_rate_min) * cosine


GRAD_SCALE_INIT = 2.0 ** 10  # the authors' initial fp16 loss scale


def resolve_precision(precision, device):
    """The precision a config's `precision` means on a device: 'auto' is the authors' fp16 autocast
    on CUDA and fp32 elsewhere; any other value is itself."""
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def check_precision(precision, device):
    """Warn before any work when the precision runs, but slowly, on the device: fp16 autocast with a
    gradient scaler runs on a CPU through the same code as on a GPU (so CI exercises it), but slowly."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "fp16" and device.type != "cuda":
        warnings.warn(f"precision='fp16' on {device} runs the GPU's mixed-precision path, slowly; "
                      "use 'bf16' or 'fp32' for speed on CPU", stacklevel=2)


def autocast(precision, device):
    """The autocast context for a precision on a device: none for fp32, bf16 or fp16 otherwise."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def unwrap(model):
    """The NVAE inside DistributedDataParallel and torch.compile wrappers (or the model itself)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class TrainStep:
    """Callable doing one full training step on a batch; owns the optimizer, scaler and step count.

    With weight-normalized cells the first call initializes their convs from that batch. Under DDP,
    call `data_init(x)` on one rank before wrapping and broadcast, so all ranks start equal.
    """

    def __init__(self, model, steps_per_epoch, device="cpu"):
        core = unwrap(model)
        self.model, self.core, self.cfg = model, core, core.cfg
        self.device = torch.device(device)
        check_precision(self.cfg.precision, self.device)
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = self.cfg.epochs * steps_per_epoch
        self.optimizer = make_optimizer(model, self.cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=GRAD_SCALE_INIT,
                                           enabled=self.precision == "fp16")
        self.spectral = SpectralRegularizer(core)
        self.step = 0
        self.needs_data_init = self.cfg.normalization == "weight_norm"

    @torch.no_grad()
    def data_init(self, x):
        """Data-dependent initialization of the weight-normalized cells from the batch x."""
        request_data_init(self.core)
        with autocast(self.precision, self.device):
            self.core(x)
        self.needs_data_init = False

    def __call__(self, x, measure_grad_norm=False):
        """Train on x (in [0, 1]); returns a dict of detached tensors describing the step."""
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.needs_data_init:
            self.data_init(x)
        lr = learning_rate(self.step, self.steps_per_epoch, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.precision, self.device):
            result = self.model(x)
        loss, stats = nvae_loss(result, self.core, self.step, self.total_steps, self.spectral)
        self.optimizer.zero_grad(set_to_none=False)  # stable gradient buffers: less heap fragmentation
        self.scaler.scale(loss).backward()
        if measure_grad_norm:
            self.scaler.unscale_(self.optimizer)
            stats["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        stats.update(loss=loss.detach(), nelbo=result.nelbo.detach().mean(),
                     recon=result.recon_nll.detach().mean(), kl=result.kl.detach().sum(1).mean(),
                     kl_per_group=result.kl.detach().mean(0), lr=lr)
        return stats

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "needs_data_init": self.needs_data_init}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.needs_data_init = state["needs_data_init"]
