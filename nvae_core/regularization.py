"""Spectral regularization of every convolution and the BN-scale regularization.

Each conv's largest singular value (of its normalized weight as a C_out x rest matrix) is tracked by
power iteration whose vectors persist between steps in buffers of the module, so checkpoints carry
them. Convs whose matrices share a shape are iterated together in one batched matmul.
"""
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d

WARMUP_ITERATIONS = 40  # the first call, from random vectors
ITERATIONS = 4  # every later call, from the previous vectors


class SpectralRegularizer:
    """sum over convs of sigma_max(W), differentiable in W; the vectors live on the convs."""

    def __init__(self, model):
        self.groups = defaultdict(list)
        for m in model.modules():
            if isinstance(m, Conv2d):
                self.groups[(m.sr_u.numel(), m.sr_v.numel())].append(m)
        self.warm = None  # read once from the buffers (a resumed run is already warm)

    def __call__(self):
        if self.warm is None:
            self.warm = all(bool(m.sr_warm) for convs in self.groups.values() for m in convs)
        iterations = ITERATIONS if self.warm else WARMUP_ITERATIONS
        self.warm = True
        total = 0.0
        for convs in self.groups.values():
            weights = torch.stack([m.normalized_weight().flatten(1) for m in convs]).float()
            u = torch.stack([m.sr_u for m in convs])
            v = torch.stack([m.sr_v for m in convs])
            with torch.no_grad():
                w = weights.detach()
                for _ in range(iterations):
                    v = F.normalize(torch.bmm(w.transpose(1, 2), u.unsqueeze(2)).squeeze(2), dim=1)
                    u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1)
                for m, ui, vi in zip(convs, u, v):
                    m.sr_u.copy_(ui)
                    m.sr_v.copy_(vi)
                    m.sr_warm.fill_(True)
            sigma = torch.einsum("nr,nrc,nc->n", u, weights, v)
            total = total + sigma.sum()
        return total


def batchnorm_regularization(model):
    """sum over BN layers of the largest |scale|."""
    scales = [m.weight.abs().max() for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return torch.stack(scales).sum() if scales else torch.zeros(())
