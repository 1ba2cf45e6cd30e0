"""Eval-mode cell branches with each batch norm folded into the convolution beside it.

In eval mode a batch norm is a per-channel affine map with its running statistics, so
conv -> BN (a unit followed by the next unit's BN, or by the branch's closing BN) and
BN -> 1x1 conv with nothing between (the separable cell's first unit) are each one convolution
with rescaled weights and a bias. A separable branch then runs as three convolutions and two
in-place activations instead of adding four batch-norm passes and two fresh activation tensors.
Same function; only the float rounding differs (about 1e-6 relative).
"""
import torch
import torch.nn.functional as F

from .layers import BatchNorm2d, NormActConv, _activate, upsample2


def bn_affine(bn):
    """(scale, shift) with bn(x) = x * scale + shift per channel, from the running statistics."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _folds_input(unit):
    """Whether unit's own BN can move into its conv: nothing between them and no padding to see it."""
    conv = unit.conv
    return (unit.act == "none" and not unit.upsample and conv.groups == 1 and conv.padding == (0, 0)
            and conv.kernel_size == (1, 1))


def run_folded(layers, x):
    """The eval-mode output of a branch (NormActConv units, then an optional closing BatchNorm2d
    and other modules such as squeeze-excitation) on x, every foldable batch norm folded."""
    layers = list(layers)
    h, fresh, normalized, i = x, False, False, 0
    while i < len(layers):
        unit = layers[i]
        if not isinstance(unit, NormActConv):
            h, fresh = unit(h), True
            i += 1
            continue
        conv = unit.conv
        weight = conv.normalized_weight()
        bias = conv.bias if conv.bias is not None else weight.new_zeros(weight.shape[0])
        if unit.bn is not None and not normalized:
            if _folds_input(unit):
                scale, shift = bn_affine(unit.bn)
                bias = bias + (weight.flatten(1) * shift).sum(1)
                weight = weight * scale.view(1, -1, 1, 1)
            else:
                h = F.batch_norm(h, unit.bn.running_mean, unit.bn.running_var, unit.bn.weight, unit.bn.bias,
                                 False, 0.0, unit.bn.eps)
                fresh = True
        h = _activate(unit.act, h, inplace=fresh)  # in place only on a temporary of this pass
        if unit.upsample:
            h = upsample2(h)
        after = layers[i + 1] if i + 1 < len(layers) else None
        closing = after if isinstance(after, BatchNorm2d) else after.bn if isinstance(after, NormActConv) else None
        if closing is not None:
            scale, shift = bn_affine(closing)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = bias * scale + shift
        h = F.conv2d(h, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        fresh, normalized = True, closing is not None
        i += 2 if isinstance(after, BatchNorm2d) else 1
    return h
