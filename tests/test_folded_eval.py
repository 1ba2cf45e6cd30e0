"""Eval-mode branches with batch norms folded into their convs compute what the unfolded branches do."""
import pytest
import torch
from conftest import tiny_batch, tiny_config

from nvae_core import NVAE
from nvae_core.cells import Cell
from nvae_core.folded_eval import run_folded

CELLS = [(kind, stride, act, se) for kind in ("separable", "regular") for stride in (1, 2, -1)
         for act in ("swish", "elu") for se in (True, False)]


def _trained_statistics(module):
    """Give every batch norm non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            shape = m.running_mean.shape
            m.running_mean.copy_(torch.randn(shape, generator=generator))
            m.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(shape, generator=generator))
            m.bias.data.copy_(torch.randn(shape, generator=generator))
    return module


@pytest.mark.parametrize("kind,stride,act,se", CELLS)
def test_folded_branch_matches_unfolded(kind, stride, act, se):
    """Every cell kind, direction, activation and SE choice: same output to float rounding, input untouched."""
    torch.manual_seed(0)
    cfg = tiny_config(activation=act, use_se=se)
    c_in = 8
    c_out = {1: 8, 2: 16, -1: 4}[stride]
    cell = _trained_statistics(Cell(kind, c_in, c_out, stride, cfg)).eval()
    x = torch.randn(4, c_in, 8, 8).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.no_grad():
        expected = cell.branch(x)
        folded = run_folded(cell.branch, x)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before), "the branch input (also the skip's input) must not be modified in place"


def test_eval_model_uses_folding_and_matches():
    """A whole BN model in eval mode: the folded NELBO equals the unfolded one (cells told not to fold)."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = _trained_statistics(NVAE(cfg)).eval()
    x = tiny_batch(cfg)
    with torch.no_grad():
        torch.manual_seed(2)
        folded = model(x).nelbo
        for cell in model.modules():
            if isinstance(cell, Cell):
                assert cell.folds
                cell.folds = False
        torch.manual_seed(2)
        unfolded = model(x).nelbo
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-4)


def test_weight_norm_cells_do_not_fold():
    """Weight-norm cells have no batch norm: nothing to fold, the plain branch runs."""
    cell = Cell("regular", 8, 8, 1, tiny_config(normalization="weight_norm", activation="elu"))
    assert not cell.folds
