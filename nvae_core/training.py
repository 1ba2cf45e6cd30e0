"""One NVAE optimization step: Adamax, lr warm-up then cosine, mixed precision, the full loss."""
import contextlib
import math

import torch
import torch.nn as nn

from .config import ConfigError
from .layers import request_data_init
from .objective import nvae_loss
from .optim import Adamax
from .regularization import SpectralRegularizer


def make_optimizer(model, cfg):
    return Adamax(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=cfg.adamax_eps)


def learning_rate(step, steps_per_epoch, cfg):
    """Linear warm-up over warmup_epochs, then cosine decay to learning_rate_min at the last step."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    total = cfg.epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate_min + (cfg.learning_rate - cfg.learning_rate_min) * cosine


def check_precision(precision, device):
    """Raise a ConfigError before any work when the precision cannot run on the device."""
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision='fp16' needs a CUDA device (got {device}); use 'bf16' or 'fp32' on CPU")


def autocast(precision, device):
    """The autocast context for a precision: none for fp32, bf16 or fp16 otherwise."""
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
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = self.cfg.epochs * steps_per_epoch
        self.optimizer = make_optimizer(model, self.cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.precision == "fp16")
        self.spectral = SpectralRegularizer(core)
        self.step = 0
        self.needs_data_init = self.cfg.normalization == "weight_norm"

    @torch.no_grad()
    def data_init(self, x):
        """Data-dependent initialization of the weight-normalized cells from the batch x."""
        request_data_init(self.core)
        with autocast(self.cfg.precision, self.device):
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
        with autocast(self.cfg.precision, self.device):
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
