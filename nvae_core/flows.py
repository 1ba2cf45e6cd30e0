"""Inverse-autoregressive flow cells on a latent group, from masked depthwise-separable convs.

Ordering: pixels in raster order, channels in index order within a pixel. Output (c, p) of a cell
depends on the input at every pixel before p and at channels < c of pixel p only, so the Jacobian
is triangular and its log-determinant is the sum of the log-scales.

Two cells (config field flow_cell):
- "shift", the authors' release: z' = z - mu(z), log-det 0; mu from a masked inverted-residual block
  (expansion 6) over z alone, and an ELU + masked 1x1 conv whose initial weights are scaled by 0.1.
  The mirrored cell of a pair reverses the raster order of pixels only (its masks flipped in space).
- "affine", ours: z' = z * exp(s) + m, (m, s) from z and the posterior's features, starting near the
  identity; the mirrored cell reverses both pixel and channel order.
"""
import math

import torch
from torch import nn

from .layers import Conv2d, elu

EXPANSION = 6


def autoregressive_mask(c_out, c_in, kernel_size, deg_out, deg_in, strict):
    """1 where output channel/pixel may read input channel/pixel; (c_out, c_in, k, k)."""
    k = kernel_size
    mask = torch.zeros(c_out, c_in, k, k)
    centre = k // 2
    mask[:, :, :centre, :] = 1.0  # rows above
    mask[:, :, centre, :centre] = 1.0  # left of centre on its row
    allowed = deg_in[None, :] < deg_out[:, None] if strict else deg_in[None, :] <= deg_out[:, None]
    mask[:, :, centre, centre] = allowed.float()
    return mask


class MaskedConv2d(Conv2d):
    """A weight-normalized convolution whose weight is masked to keep the autoregressive order.
    mirror flips the mask in space: the same order over pixels, reversed."""

    def __init__(self, c_in, c_out, kernel_size, deg_in, deg_out, strict, groups=1, bias=True, mirror=False):
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        if groups == 1:
            mask = autoregressive_mask(c_out, c_in, kernel_size, deg_out, deg_in, strict)
        else:  # depthwise: each channel reads only itself, its own centre included
            same = torch.zeros(c_out, dtype=torch.long)
            mask = autoregressive_mask(c_out, 1, kernel_size, same, same[:1], strict=False)
        if mirror:
            mask = mask.flip(2, 3)
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.weight.mul_(mask)
            self.log_weight_norm.copy_(torch.log(self._v_norm() + 1e-2))

    def normalized_weight(self):
        v = self.weight * self.mask
        norm = torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)
        return v * (self.log_weight_norm.exp() / (norm + 1e-5))


class ShiftCell(nn.Module):
    """The authors' IAF cell: z -> z - mu(z), log-det 0. The posterior's features are not used."""

    def __init__(self, latent_channels, context_channels, mirror):
        super().__init__()
        del context_channels  # passed to the authors' cell too, and unused there
        cz, hidden = latent_channels, latent_channels * EXPANSION
        deg_z, deg_h = torch.arange(cz), torch.arange(hidden) // EXPANSION
        self.conv_in = MaskedConv2d(cz, hidden, 3, deg_z, deg_h, strict=True, bias=False, mirror=mirror)
        self.depthwise = MaskedConv2d(hidden, hidden, 5, deg_h, deg_h, strict=False, groups=hidden, bias=False,
                                      mirror=mirror)
        self.conv_mu = MaskedConv2d(hidden, cz, 1, deg_h, deg_z, strict=False, mirror=mirror)
        with torch.no_grad():  # 0.1 x the default initial weights: mu starts near 0
            self.conv_mu.log_weight_norm.add_(math.log(0.1))

    def forward(self, z, context):
        """Returns the new z and the log-determinant per dimension (zeros: a shift has unit Jacobian)."""
        del context
        h = elu(self.depthwise(elu(self.conv_in(z))))
        mu = self.conv_mu(elu(h))  # the authors apply ELU twice here: the block's, then the mu conv's
        return z - mu.float(), torch.zeros_like(z, dtype=torch.float32)


class AffineCell(nn.Module):
    """z -> z * exp(s) + m with (m, s) from a masked network of z and the posterior's features."""

    def __init__(self, latent_channels, context_channels, mirror):
        super().__init__()
        cz, hidden = latent_channels, latent_channels * EXPANSION
        deg_z, deg_h = torch.arange(cz), torch.arange(hidden) // EXPANSION
        self.mirror = mirror
        self.conv_in = MaskedConv2d(cz, hidden, 3, deg_z, deg_h, strict=True)
        self.context = Conv2d(context_channels, hidden, 1)
        self.depthwise = MaskedConv2d(hidden, hidden, 5, deg_h, deg_h, strict=False, groups=hidden)
        self.conv_out = MaskedConv2d(hidden, 2 * cz, 1, deg_h, torch.cat([deg_z, deg_z]), strict=False)
        with torch.no_grad():  # start as (nearly) the identity map
            self.conv_out.log_weight_norm.fill_(-7.0)
            self.conv_out.bias.zero_()

    def forward(self, z, context):
        """Returns the new z and the log-determinant per dimension (same shape as z)."""
        if self.mirror:
            z, context = torch.flip(z, dims=(1, 2, 3)), torch.flip(context, dims=(2, 3))
        h = elu(self.conv_in(z) + self.context(context))
        h = elu(self.depthwise(h))
        shift, raw_scale = self.conv_out(h).float().chunk(2, dim=1)
        log_scale = 3.0 * torch.tanh(raw_scale / 3.0)
        z = z * torch.exp(log_scale) + shift
        if self.mirror:
            z, log_scale = torch.flip(z, dims=(1, 2, 3)), torch.flip(log_scale, dims=(1, 2, 3))
        return z, log_scale


FLOW_CELLS = {"shift": ShiftCell, "affine": AffineCell}


class Flow(nn.Module):
    """One flow of the config's num_flows: an IAF cell and its mirrored twin."""

    def __init__(self, latent_channels, context_channels, cell="shift"):
        super().__init__()
        make = FLOW_CELLS[cell]
        self.cells = nn.ModuleList([make(latent_channels, context_channels, mirror=False),
                                    make(latent_channels, context_channels, mirror=True)])

    def forward(self, z, context):
        log_det = torch.zeros_like(z, dtype=torch.float32)
        for cell in self.cells:
            z, cell_log_det = cell(z, context)
            log_det = log_det + cell_log_det
        return z, log_det
