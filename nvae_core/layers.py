"""Building blocks: the weight-normalized convolution, norm/activation factories, SE and skips."""
import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


class Conv2d(nn.Conv2d):
    """A convolution with weight normalization: w = exp(log_norm) * v / ||v||, per output channel.

    With data_init=True the first forward pass after `request_data_init` rescales and shifts the
    output to zero mean, unit variance per channel (data-dependent init, as for WN cells).
    """

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, groups=1, bias=True,
                 data_init=False):
        super().__init__(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=bias)
        self.log_weight_norm = nn.Parameter(torch.log(self._v_norm().detach() + 1e-2))
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
        return self.weight * (self.log_weight_norm.exp() / (self._v_norm() + 1e-5))

    def forward(self, x):
        if self.init_pending:
            self._init_from(x)
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    @torch.no_grad()
    def _init_from(self, x):
        self.init_pending = False
        out = F.conv2d(x, self.normalized_weight(), None, self.stride, self.padding, self.dilation,
                       self.groups)
        mean = out.mean(dim=(0, 2, 3))
        std = out.std(dim=(0, 2, 3)).clamp_min(1e-3)
        self.log_weight_norm.sub_(std.log().view_as(self.log_weight_norm))
        if self.bias is not None:
            self.bias.copy_(-mean / std)


def request_data_init(model):
    """Make every data-init convolution of `model` initialize itself on the next forward pass."""
    for m in model.modules():
        if isinstance(m, Conv2d) and m.data_init:
            m.init_pending = True


def activation(name):
    return nn.SiLU() if name == "swish" else nn.ELU()


def norm(channels, normalization):
    """Batch norm with the paper's momentum (PyTorch convention), or nothing for weight-norm cells."""
    if normalization == "batch_norm":
        return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    return nn.Identity()


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
    """Stride-2 skip: act, then four 1x1 stride-2 convs on shifted grids, concatenated."""

    def __init__(self, c_in, c_out, act):
        super().__init__()
        self.act = activation(act)
        quarter = c_out // 4
        sizes = [quarter, quarter, quarter, c_out - 3 * quarter]
        self.convs = nn.ModuleList(Conv2d(c_in, s, 1, stride=2) for s in sizes)

    def forward(self, x):
        x = self.act(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(s) for conv, s in zip(self.convs, shifted)], dim=1)


class UpsampleSkip(nn.Module):
    """Upsampling skip: nearest x2 then a 1x1 conv to the new channel count."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Upsample(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
