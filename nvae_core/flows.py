"""Inverse-autoregressive flow cells on a latent group, from masked depthwise-separable convs.

Ordering: pixels in raster order, channels in index order within a pixel. Output (c, p) of a cell
depends on the input at every pixel before p and at channels < c of pixel p only, so the Jacobian
is triangular and its log-determinant is the sum of the log-scales. A mirrored cell reverses the
order (flips pixels and channels) so a pair of cells sees dependencies both ways.
"""
import torch
import torch.nn as nn

from .layers import Conv2d, elu


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
    """A weight-normalized convolution whose weight is masked to keep the autoregressive order."""

    def __init__(self, c_in, c_out, kernel_size, deg_in, deg_out, strict, groups=1):
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2, groups=groups)
        if groups == 1:
            mask = autoregressive_mask(c_out, c_in, kernel_size, deg_out, deg_in, strict)
        else:  # depthwise: each channel reads only itself, its own centre included
            same = torch.zeros(c_out, dtype=torch.long)
            mask = autoregressive_mask(c_out, 1, kernel_size, same, same[:1], strict=False)
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.weight.mul_(mask)
            self.log_weight_norm.copy_(torch.log(self._v_norm() + 1e-2))

    def normalized_weight(self):
        v = self.weight * self.mask
        norm = torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)
        return v * (self.log_weight_norm.exp() / (norm + 1e-5))


class IAFCell(nn.Module):
    """z -> z * exp(s) + m with (m, s) from a masked network of z and the posterior's features."""

    def __init__(self, latent_channels, context_channels, mirror, expansion=6):
        super().__init__()
        cz, hidden = latent_channels, latent_channels * expansion
        deg_z = torch.arange(cz)
        deg_h = torch.arange(hidden) // expansion
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


class Flow(nn.Module):
    """One flow of the config's num_flows: an IAF cell and its mirrored twin."""

    def __init__(self, latent_channels, context_channels):
        super().__init__()
        self.cells = nn.ModuleList([IAFCell(latent_channels, context_channels, mirror=False),
                                    IAFCell(latent_channels, context_channels, mirror=True)])

    def forward(self, z, context):
        log_det = torch.zeros_like(z, dtype=torch.float32)
        for cell in self.cells:
            z, cell_log_det = cell(z, context)
            log_det = log_det + cell_log_det
        return z, log_det
