"""Residual cells, and the registry that turns a cell name from the config into a module.

A cell maps x to skip(x) + 0.1 * branch(x). stride is 1 (same size), 2 (down, channels x2) or -1
(up, channels /2). With normalization='weight_norm' the branch has no batch norm and its convs are
initialized from the first batch. The pre-process cells take the encoder's cell type and the
post-process cells the decoder's, with expansion 3 when separable (the authors' arch table).
"""
from torch import nn

from .folded_eval import run_folded
from .layers import BatchNorm2d, FactorizedReduce, NormActConv, SqueezeExcite, UpsampleSkip, norm


def regular_branch(c_in, c_out, stride, cfg, expansion):
    """Encoder cell (paper Fig. 3b): BN-act-conv3x3-BN-act-conv3x3."""
    del expansion
    return [NormActConv(c_in, c_out, 3, cfg, stride=max(stride, 1), upsample=stride == -1),
            NormActConv(c_out, c_out, 3, cfg)]


def separable_branch(c_in, c_out, stride, cfg, expansion):
    """Generative cell (paper Fig. 3a): BN-conv1x1(expand)-BN-act-dwconv5x5-BN-act-conv1x1-BN.

    As in the authors' release its three convs are plain (no weight norm, no bias: a BN follows
    each). Without BN (normalization='weight_norm', a combination the authors never built) they
    are weight-normalized with a bias and initialized from data, like the regular cell's."""
    wn = cfg.normalization == "weight_norm"
    hidden = c_in * expansion
    plain = {"bias": wn, "weight_norm": wn}
    return [NormActConv(c_in, hidden, 1, cfg, activate=False, **plain),
            NormActConv(hidden, hidden, 5, cfg, stride=max(stride, 1), groups=hidden,
                        upsample=stride == -1, **plain),
            NormActConv(hidden, c_out, 1, cfg, **plain),
            norm(c_out, cfg.normalization)]


CELL_BRANCHES = {"regular": regular_branch, "separable": separable_branch}


class Cell(nn.Module):
    """skip(x) + 0.1 * branch(x), the branch ending in squeeze-excitation when enabled. In eval mode
    a batch-norm branch runs with its batch norms folded into its convs (folded_eval.py)."""

    def __init__(self, kind, c_in, c_out, stride, cfg, expansion=6):
        super().__init__()
        layers = CELL_BRANCHES[kind](c_in, c_out, stride, cfg, expansion)
        if cfg.use_se:
            layers.append(SqueezeExcite(c_out))
        self.branch = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
        self.folds = any(isinstance(m, BatchNorm2d) for m in self.branch.modules())
        if stride == 1:
            assert c_in == c_out, "a same-size cell keeps its channel count"
            self.skip = nn.Identity()
        elif stride == 2:
            self.skip = FactorizedReduce(c_in, c_out)
        else:
            self.skip = UpsampleSkip(c_in, c_out)

    def forward(self, x):
        branch = run_folded(self.branch, x) if self.folds and not self.training else self.branch(x)
        return self.skip(x) + 0.1 * branch
