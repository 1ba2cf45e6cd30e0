"""Inverse-autoregressive flow cells: masks, triangular Jacobians and log-determinants, for the
authors' shift cell (the default) and our affine-with-context cell."""
import math

import pytest
import torch

from nvae_core import NVAE
from nvae_core.flows import AffineCell, Flow, MaskedConv2d, ShiftCell, autoregressive_mask
from tests.conftest import tiny_batch, tiny_config

C, H, W, CONTEXT = 2, 3, 3, 3


def _perturb(cell, seed):
    """Move a flow cell far from its near-identity init: unit output norm, random output bias."""
    g = torch.Generator().manual_seed(seed)
    last = cell.conv_out if isinstance(cell, AffineCell) else cell.conv_mu
    with torch.no_grad():
        last.log_weight_norm.zero_()
        last.bias.copy_(torch.randn(last.bias.shape, generator=g, dtype=last.bias.dtype))
        for module in cell.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.log_weight_norm.add_(0.5)


def _jacobian(module, z, context):
    """Jacobian of the flattened map z -> module(z, context)[0], (C*H*W) x (C*H*W)."""
    def f(flat):
        return module(flat.view(1, C, H, W), context)[0].flatten()
    return torch.autograd.functional.jacobian(f, z.flatten())


def _order_key(reverse_pixels=False):
    """Position of each flattened (channel, pixel) index in the autoregressive order:
    pixels in raster order (or reversed), channels in index order within a pixel."""
    c = torch.arange(C).view(C, 1).expand(C, H * W)
    p = torch.arange(H * W).view(1, H * W).expand(C, H * W)
    if reverse_pixels:
        p = H * W - 1 - p
    return (p * C + c).flatten()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, C, H, W, generator=g, dtype=torch.float64)
    context = torch.randn(1, CONTEXT, H, W, generator=g, dtype=torch.float64)
    return z, context


@pytest.mark.parametrize("mirror", [False, True])
def test_affine_cell_jacobian_is_triangular_in_autoregressive_order(mirror):
    """Output (c, p) reads only inputs strictly earlier in the order (reversed for the mirror)."""
    cell = AffineCell(C, CONTEXT, mirror=mirror).double()
    _perturb(cell, seed=1)
    z, context = _inputs(seed=2)
    jac = _jacobian(cell, z, context)
    key = _order_key()
    out_key, in_key = key.view(-1, 1), key.view(1, -1)
    later_or_equal = in_key <= out_key if mirror else in_key >= out_key
    diagonal = torch.eye(C * H * W, dtype=torch.bool)
    forbidden = later_or_equal & ~diagonal
    assert (jac[forbidden] == 0).all(), "output depends on an input not earlier in the order"
    # Not vacuous: the allowed (strictly earlier) entries are mostly non-zero, diagonal positive.
    allowed = ~later_or_equal
    assert (jac[allowed] != 0).float().mean() > 0.5
    assert (jac.diagonal() > 0).all()
    assert not torch.allclose(jac, torch.eye(C * H * W, dtype=jac.dtype), atol=1e-2)


@pytest.mark.parametrize("mirror", [False, True])
def test_affine_cell_log_det_matches_numerical_jacobian(mirror):
    """sum of the cell's log-determinant per dimension = log|det J| of the autograd Jacobian."""
    cell = AffineCell(C, CONTEXT, mirror=mirror).double()
    _perturb(cell, seed=3)
    z, context = _inputs(seed=4)
    _, log_det = cell(z, context)
    assert log_det.shape == z.shape
    sign, logabsdet = torch.linalg.slogdet(_jacobian(cell, z, context))
    assert sign > 0
    assert abs(logabsdet.item()) > 0.5  # far from volume-preserving, so the check has teeth
    # The cell computes its scales in float32: allow float32 rounding of the 18 log-scales.
    assert torch.allclose(log_det.double().sum(), logabsdet, rtol=1e-5, atol=1e-5)


def test_affine_flow_log_det_matches_numerical_jacobian():
    """A Flow (cell + mirrored cell) has a full Jacobian whose log|det| is its summed log-det."""
    flow = Flow(C, CONTEXT, cell="affine").double()
    for i, cell in enumerate(flow.cells):
        _perturb(cell, seed=10 + i)
    z, context = _inputs(seed=5)
    _, log_det = flow(z, context)
    jac = _jacobian(flow, z, context)
    # The composition reads in both directions: no longer triangular in either order.
    key = _order_key()
    later = key.view(1, -1) > key.view(-1, 1)
    assert (jac[later] != 0).any() and (jac[later.T] != 0).any()
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign > 0
    assert abs(logabsdet.item()) > 0.5
    assert torch.allclose(log_det.double().sum(), logabsdet, rtol=1e-5, atol=1e-5)


def test_autoregressive_mask_strict_vs_non_strict_centre():
    """Rows above and left of centre are open; the centre tap is deg_in < deg_out (strict) or <=."""
    deg = torch.arange(3)
    strict = autoregressive_mask(3, 3, 3, deg, deg, strict=True)
    loose = autoregressive_mask(3, 3, 3, deg, deg, strict=False)
    assert strict.shape == (3, 3, 3, 3)
    lower_strict = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    lower_loose = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    assert torch.equal(strict[:, :, 1, 1], lower_strict)
    assert torch.equal(loose[:, :, 1, 1], lower_loose)
    for mask in (strict, loose):
        assert (mask[:, :, 0, :] == 1).all()  # the row above
        assert (mask[:, :, 1, 0] == 1).all()  # left of centre
        assert (mask[:, :, 1, 2] == 0).all()  # right of centre
        assert (mask[:, :, 2, :] == 0).all()  # the row below


def test_autoregressive_mask_uses_degrees_not_indices():
    """Centre taps follow the degrees given (hidden units with repeated degrees, c_out != c_in)."""
    deg_in = torch.tensor([0, 1])
    deg_out = torch.tensor([0, 0, 1, 1, 2])
    centre = autoregressive_mask(5, 2, 5, deg_out, deg_in, strict=True)[:, :, 2, 2]
    expected = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 0], [1, 1]], dtype=torch.float32)
    assert torch.equal(centre, expected)


@pytest.mark.parametrize("mirror", [False, True])
def test_shift_cell_is_a_unit_triangular_shift_that_ignores_the_features(mirror):
    """The authors' cell: z' = z - mu(z), mu strictly earlier in the order (raster order of
    pixels, reversed for the mirror; channels in index order either way), log-det 0, and the
    posterior's features change nothing."""
    cell = ShiftCell(C, CONTEXT, mirror=mirror).double()
    _perturb(cell, seed=6)
    z, context = _inputs(seed=7)
    new_z, log_det = cell(z, context)
    assert torch.equal(log_det, torch.zeros_like(log_det))
    assert torch.equal(new_z, cell(z, 100 * torch.randn_like(context))[0])
    jac = _jacobian(cell, z, context)
    key = _order_key(reverse_pixels=mirror)
    forbidden = key.view(1, -1) >= key.view(-1, 1)
    diagonal = torch.eye(C * H * W, dtype=torch.bool)
    assert (jac[forbidden & ~diagonal] == 0).all(), "mu depends on an input not earlier in the order"
    assert torch.equal(jac.diagonal(), torch.ones(C * H * W, dtype=jac.dtype))
    assert (jac[~forbidden] != 0).float().mean() > 0.5  # not vacuous: mu reads the earlier inputs
    assert torch.linalg.slogdet(jac).logabsdet.abs() < 1e-12


def test_shift_cell_masks_and_initial_scale():
    """As the authors build it: no bias but on the mu conv, no context conv, the mirror's masks
    are the first cell's flipped in space only, and the mu conv starts at 0.1 x its default norm."""
    torch.manual_seed(0)
    plain, mirrored = ShiftCell(4, 8, mirror=False), ShiftCell(4, 8, mirror=True)
    assert [n for n, _ in plain.named_parameters()] == [
        "conv_in.weight", "conv_in.log_weight_norm", "depthwise.weight", "depthwise.log_weight_norm",
        "conv_mu.weight", "conv_mu.bias", "conv_mu.log_weight_norm"]
    for name in ("conv_in", "depthwise", "conv_mu"):
        a, b = getattr(plain, name).mask, getattr(mirrored, name).mask
        assert torch.equal(b, a.flip(2, 3))
    masked = plain.conv_mu.weight * plain.conv_mu.mask
    default = torch.log(torch.linalg.vector_norm(masked, dim=(1, 2, 3)) + 1e-2)
    assert torch.allclose(plain.conv_mu.log_weight_norm.flatten(), default + math.log(0.1))
    assert isinstance(plain.conv_mu, MaskedConv2d)


def test_model_with_shift_flows_takes_kl_from_the_sample():
    """With flows the KL is log q - log p of the flowed sample (and log q has no log-det term)."""
    cfg = tiny_config(num_flows=1)
    model = NVAE(cfg).eval()
    result = model(tiny_batch(cfg))
    assert torch.allclose(result.kl.sum(1), result.log_q - result.log_p, atol=1e-3)
    assert len(model.latent_groups[0].flows) == 1
    assert isinstance(model.latent_groups[0].flows[0].cells[0], ShiftCell)
