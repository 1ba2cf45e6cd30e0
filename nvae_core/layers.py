"""Building blocks: the weight-normalized convolution, norm/activation factories, SE and skips."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


class Conv2d(nn.Conv2d):
    """A convolution, weight-normalized by default: w = exp(log_norm) * v / ||v|| per output channel.

    weight_norm=False gives a plain convolution (the separable cells' convs in the authors' release).
    Every one carries the power-iteration vectors of spectral regularization, which covers all convs.
    With data_init=True the first forward pass after `request_data_init` sets the bias and the
    log-norm from that batch so each output channel has mean 0 and std 0.2 (the authors divide by
    5 std), averaged over ranks under data parallelism.
    """

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, groups=1, bias=True,
                 data_init=False, weight_norm=True):
        super().__init__(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=bias)
        if weight_norm:
            self.log_weight_norm = nn.Parameter(torch.log(self._v_norm().detach() + 1e-2))
        else:
            self.register_parameter("log_weight_norm", None)
        assert weight_norm or not data_init, "data-dependent init sets a weight norm"
        # Power-iteration vectors of spectral regularization (see regularization.py).
        rows, cols = self.weight.shape[0], self.weight[0].numel()
        self.register_buffer("sr_u", F.normalize(torch.randn(rows), dim=0))
        self.register_buffer("sr_v", F.normalize(torch.randn(cols), dim=0))
        self.register_buffer("sr_warm", torch.zeros((), dtype=torch.bool))
        self.data_init = data_init
        self.init_pending = False

    def _v_norm(self):
        return torch.linalg.vector_norm(self.weight, dim=(1, 2, 3), keepdim=True)

    def normalized_weight(self):
        """The effective weight exp(g) * v / ||v|| (what spectral regularization constrains)."""
        if self.log_weight_norm is None:
            return self.weight
        return self.weight * (self.log_weight_norm.exp() / (self._v_norm() + 1e-5))

    def forward(self, x):
        if self.init_pending:
            self._init_from(x)
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    @torch.no_grad()
    def _init_from(self, x):
        self.init_pending = False
        unit = self.weight / (self._v_norm() + 1e-5)
        out = F.conv2d(x, unit.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups).float()
        stats = torch.stack([out.mean(dim=(0, 2, 3)), 5.0 * out.std(dim=(0, 2, 3))])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        mean, scale = stats[0], stats[1] + 1e-5
        self.log_weight_norm.copy_(-scale.log().view_as(self.log_weight_norm))
        if self.bias is not None:
            self.bias.copy_(-mean / scale)


def request_data_init(model):
    """Make every data-init convolution of `model` initialize itself on the next forward pass."""
    for m in model.modules():
        if isinstance(m, Conv2d) and m.data_init:
            m.init_pending = True


class _ELU(torch.autograd.Function):
    """ELU(x) = max(x, 0) + exp(min(x, 0)) - 1, saving only its output (dy/dx = min(y, 0) + 1).

    PyTorch's CPU ELU goes through expm1 and a select, ~10x slower than exp here; same maths.
    """

    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x.clamp(max=0.0)).sub_(1.0).add_(x.clamp(min=0.0))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y.clamp(max=0.0).add_(1.0)


def elu(x):
    return _ELU.apply(x)


class ELU(nn.Module):
    def forward(self, x):
        return elu(x)


def _activate(name, y, inplace=False):
    """The named activation of y; Swish in place when asked (y a temporary of the caller's)."""
    return F.silu(y, inplace=inplace) if name == "swish" else elu(y) if name == "elu" else y


def _activation_backward(name, grad, y):
    """d act(y) / dy * grad, from the activation's input y."""
    if name == "swish":
        return torch.ops.aten.silu_backward(grad, y)
    if name == "elu":
        return grad * torch.exp(y.clamp(max=0.0))
    return grad


def upsample2(x):
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def upsample2_backward(grad):
    """The adjoint of nearest x2 upsampling: the sum over each 2x2 block."""
    return F.avg_pool2d(grad, 2) * 4.0


def _synced_stats(x, running_mean, running_var, factor, eps):
    """Training statistics of x over all ranks: per-channel mean, 1/std and the total count.

    Each rank takes its (count, mean, sum of squared deviations) in one centred pass, in float32 or
    wider whatever x's dtype, and Chan's formula combines the all-gathered triples: exact for
    unequal batches across ranks, and no E[x^2] - E[x]^2 cancellation when the mean is large.
    Updates the running statistics as single-process BN over the concatenated batch would.
    """
    c = x.shape[1]
    var, mean = torch.var_mean(x.to(torch.promote_types(x.dtype, torch.float32)), dim=(0, 2, 3), correction=0)
    count = x.numel() // c
    local = torch.cat([mean.new_full((1,), count), mean, var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    counts, means, m2s = torch.stack(gathered).split([1, c, c], dim=1)
    n = counts.sum()
    mean = (counts * means).sum(0) / n
    var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / n
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_((var * n / (n - 1)).to(running_var.dtype), factor)
    return mean, torch.rsqrt(var + eps), n


def _normalize(x, weight, bias, mean, invstd):
    """(x - mean) * invstd * weight + bias per channel, in x's dtype."""
    scale = invstd * weight
    return torch.addcmul((bias - mean * scale).view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)).to(x.dtype)


def _batch_norm_backward(grad_y, x, weight, mean, invstd, eps, count=None):
    """Gradients of training-mode BN w.r.t. x, weight and bias, given grad_y = dL/dy.

    With `count` (the global count of a synchronized BN), the two per-channel sums the gradient of
    x needs, sum(grad_y) and sum(grad_y * x_hat), are summed over ranks first (one all-reduce);
    the weight and bias gradients stay this rank's own, to be reduced by DDP like any other.
    """
    if count is None:
        return torch.ops.aten.native_batch_norm_backward(grad_y, x, weight, None, None, mean, invstd, True, eps,
                                                         [True, True, True])
    _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(grad_y, x, weight, None, None, mean, invstd,
                                                                  True, eps, [False, True, True])
    sums = torch.stack([grad_b, grad_w]).to(mean.dtype)
    dist.all_reduce(sums)
    scale = invstd * weight
    # scale * (grad_y - mean(grad_y) - x_hat * mean(grad_y * x_hat)), means over all ranks
    grad_x = (x - mean.view(1, -1, 1, 1)).mul_((-scale * invstd * sums[1] / count).view(1, -1, 1, 1))
    grad_x.addcmul_(grad_y, scale.view(1, -1, 1, 1)).sub_((scale * sums[0] / count).view(1, -1, 1, 1))
    return grad_x.to(x.dtype), grad_w, grad_b


class _SyncBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm with statistics over all ranks, saving only x and the statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps):
        mean, invstd, count = _synced_stats(x, running_mean, running_var, factor, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.settings = (eps, count)
        return _normalize(x, weight, bias, mean, invstd)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        eps, count = ctx.settings
        return *_batch_norm_backward(grad.to(x.dtype), x, weight, mean, invstd, eps, count), None, None, None, None


class BatchNorm2d(nn.BatchNorm2d):
    """Batch norm with the paper's momentum and eps. With `synchronized` set (the platform does it
    under data parallelism) training statistics are taken over all ranks, on any device, and the
    gradients are those of one big batch (see _synced_stats and _batch_norm_backward)."""

    def __init__(self, channels):
        super().__init__(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.synchronized = False

    def syncs(self):
        return self.synchronized and self.training and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, x):
        if not self.syncs():
            return super().forward(x)
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                      _momentum_factor(self), self.eps)


def synchronize_batchnorm(model):
    """Make every batch norm of the model take its statistics over all ranks."""
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.synchronized = True
    return model


class _NormActConvFn(torch.autograd.Function):
    """conv(up?(act(batch_norm(x)))) in training mode, saving only x and the batch statistics.

    The normalized and activated tensors, the largest saved activations of the cells, are
    recomputed in backward (two elementwise passes) instead of being held in memory. With `sync`
    the batch statistics, and the sums of BN's backward, are taken over all ranks.
    """

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, factor, eps, sync, act, upsample,
                weight, bias, stride, padding, groups):
        if sync:
            mean, invstd, count = _synced_stats(x, running_mean, running_var, factor, eps)
            y = _normalize(x, bn_weight, bn_bias, mean, invstd)
        else:
            y, mean, invstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True,
                                                      factor, eps)
            count = None
        a = _activate(act, y, inplace=True)
        out = F.conv2d(upsample2(a) if upsample else a, weight, bias, stride, padding, 1, groups)
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, weight)
        ctx.settings = (eps, count, act, upsample, stride, padding, groups, bias is not None, out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bn_weight, bn_bias, mean, invstd, weight = ctx.saved_tensors
        eps, count, act, upsample, stride, padding, groups, has_bias, dtype = ctx.settings
        y = _normalize(x, bn_weight, bn_bias, mean, invstd)
        a = _activate(act, y).to(dtype)
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad.to(dtype), upsample2(a) if upsample else a, weight.to(dtype),
            [weight.shape[0]] if has_bias else None, stride, padding, [1, 1], False, [0, 0], groups,
            [True, True, has_bias])
        del a  # drop dead temporaries early: the peak memory of the backward pass is here
        if upsample:
            grad_a = upsample2_backward(grad_a)
        grad_y = _activation_backward(act, grad_a.to(x.dtype), y)
        del grad_a, y
        grad_x, grad_bn_w, grad_bn_b = _batch_norm_backward(grad_y, x, bn_weight, mean, invstd, eps, count)
        grad_w = grad_w.to(weight.dtype)
        grad_b = grad_b.to(weight.dtype) if has_bias else None
        return (grad_x, grad_bn_w, grad_bn_b, None, None, None, None, None, None, None, grad_w, grad_b, None, None,
                None)


class NormActConv(nn.Module):
    """BN -> activation -> (nearest x2 upsampling) -> conv: the unit the cells are made of.

    Without batch norm (weight-norm cells) it is act -> conv, the conv weight-normalized and
    initialized from data; with batch norm, weight_norm=False makes the conv plain. Upsampling
    comes after the elementwise BN and activation, which commute with it, so those run at the low
    resolution; only BN's running-variance update sees the smaller count (Bessel factor n/(n-1)).
    """

    def __init__(self, c_in, c_out, kernel_size, cfg, stride=1, groups=1, bias=True, activate=True,
                 upsample=False, weight_norm=True):
        super().__init__()
        wn = cfg.normalization == "weight_norm"
        self.act = cfg.activation if activate else "none"
        self.upsample = upsample
        self.bn = None if wn else BatchNorm2d(c_in)
        self.conv = Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias,
                           data_init=wn, weight_norm=weight_norm or wn)

    def forward(self, x):
        bn, conv = self.bn, self.conv
        if bn is not None and bn.training and torch.is_grad_enabled():
            return _NormActConvFn.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                        _momentum_factor(bn), bn.eps, bn.syncs(), self.act, self.upsample,
                                        conv.normalized_weight(), conv.bias, conv.stride, conv.padding,
                                        conv.groups)
        a = _activate(self.act, x if bn is None else bn(x))
        return conv(upsample2(a) if self.upsample else a)


def _momentum_factor(bn):
    """Count a training batch of bn; the running-average factor to use for it."""
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative average (BN re-estimation before sampling)
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def norm(channels, normalization):
    """Batch norm with the paper's momentum (PyTorch convention), or nothing for weight-norm cells."""
    return BatchNorm2d(channels) if normalization == "batch_norm" else nn.Identity()


class SqueezeExcite(nn.Module):
    """Channel gating from the global average: sigmoid(W2 relu(W1 mean(x)))."""

    def __init__(self, channels):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Stride-2 skip: Swish (whatever the cells' activation), then four weight-normalized 1x1
    stride-2 convs with bias on the grids shifted by (0,0), (1,1), (0,1), (1,0), concatenated."""

    def __init__(self, c_in, c_out):
        super().__init__()
        quarter = c_out // 4
        sizes = [quarter, quarter, quarter, c_out - 3 * quarter]
        self.convs = nn.ModuleList(Conv2d(c_in, s, 1, stride=2) for s in sizes)

    def forward(self, x):
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(s) for conv, s in zip(self.convs, shifted)], dim=1)


class UpsampleSkip(nn.Module):
    """Upsampling skip: bilinear x2 (align_corners=True), then a weight-normalized 1x1 conv with no
    bias. Both are linear and act on different axes, so the conv runs first, at low resolution."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2.0, mode="bilinear", align_corners=True)
