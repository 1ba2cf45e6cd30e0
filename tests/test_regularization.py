"""Spectral and BN-scale regularization, and the objective's schedules and weights."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_config
from torch import nn

from nvae_core import NVAE, bits_per_dim, kl_coefficient, nvae_loss
from nvae_core.layers import Conv2d
from nvae_core.model import ForwardResult
from nvae_core.objective import kl_balance_weights, sr_coefficient
from nvae_core.regularization import ITERATIONS, WARMUP_ITERATIONS, SpectralRegularizer, batchnorm_regularization


def _convs(model):
    return [m for m in model.modules() if isinstance(m, Conv2d)]


def _matrix(conv):
    return conv.normalized_weight().detach().flatten(1).double()


def _estimate_and_truth(conv):
    """(u^T W v from the conv's stored vectors, the exact ||W||_2) of its normalized weight matrix."""
    w = _matrix(conv)
    return (conv.sr_u.double() @ w @ conv.sr_v.double()).item(), torch.linalg.matrix_norm(w, ord=2).item()


def _reference_power_iteration(conv, iterations):
    """Power iteration in float64 from the conv's current stored vectors: (u, v, u^T W v)."""
    w, u, v = _matrix(conv), conv.sr_u.double(), conv.sr_v.double()
    for _ in range(iterations):
        v = F.normalize(w.T @ u, dim=0)
        u = F.normalize(w @ v, dim=0)
    return u, v, (u @ w @ v).item()


def _check_against_reference(convs, references):
    """Stored vectors = the reference iteration's; estimates <= ||W||_2, and most within 1%."""
    estimates, within = [], 0
    for conv, (u, _, sigma) in zip(convs, references):
        est, true = _estimate_and_truth(conv)
        shape = tuple(conv.weight.shape)
        assert math.isclose(est, sigma, rel_tol=1e-4), (shape, est, sigma)
        assert torch.allclose(conv.sr_u.double(), u, atol=1e-4), shape
        assert 0 < est <= true * (1 + 1e-6), (shape, est, true)
        within += abs(est - true) <= 0.01 * true
        estimates.append(est)
    # Power iteration converges like (sigma_2/sigma_1)**(2k). Random weight matrices often have
    # nearly equal top singular values, and for those no fixed iteration count reaches 1%: over 20
    # seeds of this model 0-4 of 86 convs stayed 1-5% low, after the warm-up or the warm re-estimate, so
    # "within 1%" is required of 90% of the convs, and 1% of the summed norms.
    assert within >= 0.9 * len(convs), (within, len(convs))
    truths = [_estimate_and_truth(conv)[1] for conv in convs]
    assert math.isclose(sum(estimates), sum(truths), rel_tol=1e-2)
    return estimates


def _perturb_weights(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in _convs(model):
            conv.weight.add_(scale * conv.weight.abs().mean() * torch.randn(conv.weight.shape, generator=g))
            if conv.log_weight_norm is not None:  # the separable cells' convs are plain
                conv.log_weight_norm.add_(scale * torch.randn(conv.log_weight_norm.shape, generator=g))


# ---------------------------------------------------------------------------- spectral regularizer

@pytest.fixture
def flow_model():
    """A tiny model with flows, so masked and depthwise convs are among the regularized ones."""
    torch.manual_seed(0)
    return NVAE(tiny_config(num_flows=1))


def test_spectral_estimates_after_warmup(flow_model):
    """The first call runs 40 power iterations: u^T W v ~ ||W||_2 (1%) and the total is their sum."""
    convs = _convs(flow_model)
    assert len(convs) > 20
    assert not any(bool(conv.sr_warm) for conv in convs)
    references = [_reference_power_iteration(conv, WARMUP_ITERATIONS) for conv in convs]
    short = [_reference_power_iteration(conv, ITERATIONS) for conv in convs]
    # The iteration count matters here: 4 steps from the random start would be visibly different.
    assert max(abs(a[2] - b[2]) / a[2] for a, b in zip(references, short)) > 1e-3
    total = SpectralRegularizer(flow_model)()
    estimates = _check_against_reference(convs, references)
    assert all(bool(conv.sr_warm) for conv in convs)
    assert math.isclose(total.item(), sum(estimates), rel_tol=1e-5)


def test_spectral_total_is_differentiable_in_conv_weights(flow_model):
    """Gradients of the total reach every conv's direction and log-norm parameters, the plain
    convs of separable cells included (the authors regularize every conv)."""
    total = SpectralRegularizer(flow_model)()
    assert total.requires_grad
    total.backward()
    convs = _convs(flow_model)
    assert any(conv.log_weight_norm is None for conv in convs)
    for conv in convs:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, tuple(conv.weight.shape)
        if conv.log_weight_norm is not None:
            assert conv.log_weight_norm.grad is not None and conv.log_weight_norm.grad.abs().sum() > 0


def test_spectral_tracks_weights_after_small_change(flow_model):
    """A second call (4 iterations from the kept vectors) after a small weight change stays within 1%."""
    spectral = SpectralRegularizer(flow_model)
    spectral()
    _perturb_weights(flow_model, 0.01, seed=7)
    convs = _convs(flow_model)
    references = [_reference_power_iteration(conv, ITERATIONS) for conv in convs]
    total = spectral()
    estimates = _check_against_reference(convs, references)
    assert math.isclose(total.item(), sum(estimates), rel_tol=1e-5)


def test_spectral_reads_warm_vectors_from_buffers():
    """A new regularizer on a model whose buffers are warm (a resumed run) runs only 4 iterations."""
    torch.manual_seed(0)
    model = NVAE(tiny_config())
    SpectralRegularizer(model)()
    _perturb_weights(model, 0.05, seed=8)
    convs = _convs(model)
    references = [_reference_power_iteration(conv, ITERATIONS) for conv in convs]
    long = [_reference_power_iteration(conv, WARMUP_ITERATIONS) for conv in convs]
    assert max((a[0] - b[0]).abs().max().item() for a, b in zip(references, long)) > 1e-3
    SpectralRegularizer(model)()
    for conv, (u, v, _) in zip(convs, references):
        assert torch.allclose(conv.sr_u.double(), u, atol=1e-4), tuple(conv.weight.shape)
        assert torch.allclose(conv.sr_v.double(), v, atol=1e-4), tuple(conv.weight.shape)


# ------------------------------------------------------------------------------ BN regularization

def test_batchnorm_regularization_is_sum_of_max_abs_gamma():
    """The BN term is the sum over BN layers of the largest |gamma| of the layer."""
    torch.manual_seed(0)
    model = NVAE(tiny_config())
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) > 5
    expected = 0.0
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, bn in enumerate(bns):
            gamma = torch.randn(bn.weight.shape, generator=g)
            gamma[i % len(gamma)] = -(3.0 + i)  # the largest magnitude is a negative scale
            bn.weight.copy_(gamma)
            expected += 3.0 + i
    reg = batchnorm_regularization(model)
    assert math.isclose(reg.item(), expected, rel_tol=1e-6)
    reg.backward()
    assert all(bn.weight.grad is not None and bn.weight.grad.abs().sum() == 1.0 for bn in bns)


def test_batchnorm_regularization_without_bn_is_zero():
    """Weight-norm cells have no BN: the term is 0."""
    model = NVAE(tiny_config(normalization="weight_norm"))
    assert float(batchnorm_regularization(model)) == 0.0


# --------------------------------------------------------------------------------------- objective

def test_kl_coefficient_schedule():
    """The authors' schedule: kl_min_coeff for the first kl_const_portion of training, then linear,
    reaching 1 kl_anneal_portion of training later; never below kl_min_coeff."""
    cfg = tiny_config(kl_anneal_portion=0.3, kl_min_coeff=1e-4, kl_const_portion=1e-4)
    total = 100_000  # 10 constant steps, then 30,000 to rise
    assert kl_coefficient(0, total, cfg) == pytest.approx(1e-4)
    assert kl_coefficient(10, total, cfg) == pytest.approx(1e-4)
    assert kl_coefficient(11, total, cfg) == pytest.approx(1e-4)  # 1/30000 is below the floor
    assert kl_coefficient(3_010, total, cfg) == pytest.approx(0.1)
    assert kl_coefficient(15_010, total, cfg) == pytest.approx(0.5)
    assert kl_coefficient(30_009, total, cfg) < 1.0
    assert kl_coefficient(30_010, total, cfg) == pytest.approx(1.0)
    assert kl_coefficient(99_999, total, cfg) == pytest.approx(1.0)
    # Linear: equal steps give equal increments above the floor.
    values = [kl_coefficient(s, total, cfg) for s in range(1_010, 30_000, 1_000)]
    increments = [b - a for a, b in itertools.pairwise(values)]
    assert max(increments) - min(increments) < 1e-9
    no_hold = cfg.replace(kl_const_portion=0.0)
    assert kl_coefficient(3_000, total, no_hold) == pytest.approx(0.1)
    assert kl_coefficient(0, total, cfg.replace(kl_min_coeff=0.2)) == pytest.approx(0.2)


def test_kl_balance_weights_average_one_detached_and_proportional():
    """Weights average 1, carry no grad, and are proportional to (mean|KL| + 0.01) / size factor."""
    g = torch.Generator().manual_seed(0)
    kl = (torch.randn(8, 5, generator=g) * torch.tensor([0.01, 1.0, 5.0, 0.3, 20.0])).requires_grad_()
    size = torch.tensor([1.0, 1.0, 4.0, 4.0, 16.0])
    weights = kl_balance_weights(kl, size)
    assert weights.shape == (5,)
    assert not weights.requires_grad
    assert weights.mean().item() == pytest.approx(1.0)
    target = (kl.detach().abs().mean(0) + 0.01) / size
    ratio = weights / target
    assert torch.allclose(ratio, ratio[0].expand(5), rtol=1e-5)


def _ada_model():
    torch.manual_seed(0)
    return NVAE(tiny_config(num_groups_per_scale=4, ada_groups=True, min_groups_per_scale=1))


def test_kl_size_factors_two_scale_ada():
    """Decoder (coarsest-first) order; a group's factor is its scale's latent area / group count."""
    model = _ada_model()
    assert model.cfg.groups_per_scale == [4, 2]
    factors = model.kl_size_factors()
    # coarsest: 2 groups of area a -> a/2; finest: 4 groups of area 4a -> a; normalized by the min.
    assert torch.allclose(factors, torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 2.0]))
    # Cross-check against the model's own decoder order, read off the posterior means' areas.
    with torch.no_grad():
        means = model(tiny_batch(model.cfg, 2)).posterior_means
    areas = [m.shape[2] * m.shape[3] for m in means]
    assert areas == sorted(areas)  # coarsest scale first
    raw = torch.tensor([a / areas.count(a) for a in areas], dtype=torch.float32)
    assert torch.allclose(factors, raw / raw.min())


def test_sr_coefficient_annealing_endpoints():
    """Without sr_lambda_init, lambda is constant; with it, init at kl=0, sr_lambda at kl=1."""
    plain = tiny_config(sr_lambda=1e-2)
    assert sr_coefficient(0.0, plain) == 1e-2 and sr_coefficient(0.5, plain) == 1e-2
    annealed = tiny_config(sr_lambda=1e-2, sr_lambda_init=1.0)
    assert sr_coefficient(0.0, annealed) == pytest.approx(1.0)
    assert sr_coefficient(1.0, annealed) == pytest.approx(1e-2)
    assert sr_coefficient(0.5, annealed) == pytest.approx(0.1)  # log-linear: the geometric mean
    assert sr_coefficient(0.5, tiny_config(sr_lambda=0.0, sr_lambda_init=1.0)) == 0.0


def _fake_result(batch, groups, seed):
    g = torch.Generator().manual_seed(seed)
    return ForwardResult(output=torch.zeros(batch, 1, 1, 1), recon_nll=100 + torch.rand(batch, generator=g),
                         kl=torch.rand(batch, groups, generator=g) * 3, log_q=torch.zeros(batch),
                         kl_channels=[], log_p=torch.zeros(batch), posterior_means=[])


def test_nvae_loss_without_regularizer():
    """sr_lambda=0: loss = mean(recon + beta * sum_g w_g KL_g), no spectral call, zero reg stats."""
    torch.manual_seed(0)
    model = NVAE(tiny_config(sr_lambda=0.0))
    result = _fake_result(4, model.cfg.num_groups, seed=1)
    loss, stats = nvae_loss(result, model, step=10, total_steps=100, spectral=None)
    beta = kl_coefficient(10, 100, model.cfg)
    weights = kl_balance_weights(result.kl, model.kl_size_factors())
    expected = (result.recon_nll + beta * (result.kl * weights).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert float(stats["spectral_reg"]) == 0.0 and float(stats["bn_reg"]) == 0.0
    assert stats["sr_lambda"] == 0.0 and stats["kl_coeff"] == pytest.approx(beta)


def test_nvae_loss_balances_only_during_warmup():
    """KL balancing weights are used while beta < 1, and all ones once beta reaches 1."""
    torch.manual_seed(0)
    model = NVAE(tiny_config(sr_lambda=0.0))
    result = _fake_result(4, model.cfg.num_groups, seed=2)
    _, during = nvae_loss(result, model, step=5, total_steps=100)
    assert not torch.allclose(during["kl_weights"], torch.ones(model.cfg.num_groups))
    loss, after = nvae_loss(result, model, step=60, total_steps=100)
    assert torch.equal(after["kl_weights"], torch.ones(model.cfg.num_groups))
    assert loss.item() == pytest.approx(result.nelbo.mean().item(), rel=1e-6)
    unbalanced = NVAE(tiny_config(sr_lambda=0.0, kl_balance=False))
    _, off = nvae_loss(result, unbalanced, step=5, total_steps=100)
    assert torch.equal(off["kl_weights"], torch.ones(model.cfg.num_groups))


def test_nvae_loss_with_regularizer_adds_lambda_times_sr_plus_bn():
    """sr_lambda>0: loss - base = lambda * (spectral + BN), the BN term from the model."""
    torch.manual_seed(0)
    model = NVAE(tiny_config(sr_lambda=0.1))
    result = _fake_result(4, model.cfg.num_groups, seed=3)
    base, _ = nvae_loss(result, NVAE(tiny_config(sr_lambda=0.0)), step=60, total_steps=100)
    loss, stats = nvae_loss(result, model, step=60, total_steps=100, spectral=SpectralRegularizer(model))
    assert float(stats["spectral_reg"]) > 1.0
    assert float(stats["bn_reg"]) == pytest.approx(batchnorm_regularization(model).item())
    regularizer = float(stats["spectral_reg"] + stats["bn_reg"])
    assert loss.item() - base.item() == pytest.approx(0.1 * regularizer, rel=1e-4)


def test_bits_per_dim():
    """bits/dim = nats / (dims * ln 2)."""
    assert bits_per_dim(3072 * math.log(2.0), 3072) == pytest.approx(1.0)
    assert bits_per_dim(1000.0, 784) == pytest.approx(1000.0 / (784 * math.log(2.0)))
    assert bits_per_dim(0.0, 10) == 0.0
