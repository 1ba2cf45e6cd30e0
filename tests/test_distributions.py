"""The latent Normal (soft clamp, analytic and residual KL) and the two output likelihoods."""
import itertools
import math

import pytest
import torch
from conftest import tiny_config

from nvae_core.distributions import Bernoulli, LogisticMixture, Normal, reconstruction_nll, soft_clamp5

# --------------------------------------------------------------------------------------------- Normal

def test_soft_clamp_and_sigma_definition():
    """mu and log_sigma are soft-clamped by 5*tanh(x/5) and sigma = exp(log_sigma) + 1e-2."""
    raw = torch.tensor([-100.0, -7.0, -1.0, -1e-3, 0.0, 0.5, 3.0, 12.0, 1e4])
    assert torch.allclose(soft_clamp5(raw), 5.0 * torch.tanh(raw / 5.0), rtol=0, atol=1e-6)
    assert soft_clamp5(raw).abs().max() <= 5.0
    small = torch.tensor([-1e-3, 2e-3])  # the identity near 0
    assert torch.allclose(soft_clamp5(small), small, rtol=1e-5, atol=0)

    dist = Normal(raw, raw.flip(0))
    assert torch.allclose(dist.mu, 5.0 * torch.tanh(raw / 5.0), rtol=0, atol=1e-6)
    expected_sigma = torch.exp(5.0 * torch.tanh(raw.flip(0) / 5.0)) + 1e-2
    assert torch.allclose(dist.sigma, expected_sigma, rtol=1e-6, atol=0)
    assert dist.sigma.min() > 1e-2  # never below the floor, even for log_sigma -> -inf


def test_normal_kl_matches_monte_carlo():
    """Analytic KL(q||p) agrees with a 400k-sample Monte Carlo estimate within 5 standard errors."""
    g = torch.Generator().manual_seed(1)
    mu_q, mu_p = torch.randn(6, generator=g), torch.randn(6, generator=g)
    ls_q, ls_p = 0.7 * torch.randn(6, generator=g), 0.7 * torch.randn(6, generator=g)
    q, p = Normal(mu_q, ls_q), Normal(mu_p, ls_p)
    n = 400_000
    z = q.mu + q.sigma * torch.randn(n, 6, generator=g)
    log_ratio = (q.log_prob(z) - p.log_prob(z)).double()
    estimate = log_ratio.mean(0)
    std_err = log_ratio.std(0) / math.sqrt(n)
    analytic = q.kl(p).double()
    assert analytic.shape == (6,)
    assert (analytic >= 0).all()
    # 5 standard errors of the MC mean (a ~6e-7 two-sided false-alarm rate per dimension), plus
    # float32 rounding of the per-sample log-densities (~1e-6 relative, averaged).
    assert ((estimate - analytic).abs() <= 5 * std_err + 1e-4).all(), (estimate, analytic, std_err)


def test_normal_kl_of_identical_distributions_is_zero():
    """KL(p||p) = 0 for every dimension."""
    mu, ls = torch.randn(10), torch.randn(10)
    assert torch.allclose(Normal(mu, ls).kl(Normal(mu, ls)), torch.zeros(10), atol=1e-6)


def test_residual_normal_kl_is_paper_eq2():
    """q = N(mu_p + dmu, log_sigma_p + dlog_sigma): KL(q||p) is Eq. 2 of the paper."""
    g = torch.Generator().manual_seed(2)
    mu_p = 0.1 * torch.randn(200, generator=g)
    ls_p = 0.1 * torch.randn(200, generator=g)  # sigma_p ~ 1 >> the 1e-2 floor
    dmu = 0.2 * torch.randn(200, generator=g)
    dls = 0.2 * torch.randn(200, generator=g)
    q, p = Normal(mu_p + dmu, ls_p + dls), Normal(mu_p, ls_p)
    kl = q.kl(p).double()

    # Eq. 2 with the actual (clamped) parameters: exact up to float32 rounding.
    dmu_eff = (q.mu - p.mu).double()
    r = (q.sigma / p.sigma).double()
    sigma_p = p.sigma.double()
    eq2 = 0.5 * (dmu_eff ** 2 / sigma_p ** 2 + r ** 2 - torch.log(r ** 2) - 1.0)
    assert torch.allclose(kl, eq2, rtol=1e-5, atol=1e-6)

    # In this range (|mu|, |log_sigma| <~ 0.8) the soft clamp and the sigma floor barely act
    # (clamp slope >= ~0.97, floor ~1% of sigma): Eq. 2 with the raw residual parameters
    # (dsigma = exp(dlog_sigma), sigma_p = exp(log_sigma_p)) stays within 6%.
    raw = 0.5 * ((dmu.double() / ls_p.double().exp()) ** 2 + (2 * dls.double()).exp() - 2 * dls.double() - 1)
    assert torch.allclose(kl, raw, rtol=0.06, atol=1e-5)


# ----------------------------------------------------------------------------- logistic mixture

def _mixture_params(num_channels, num_mixtures, h, w, seed, coeff_scale=1.5, log_scale_range=(-1.5, 0.0)):
    """Random raw parameters in LogisticMixture's layout (logits, means, log-scales, coefficients)."""
    g = torch.Generator().manual_seed(seed)
    c, m = num_channels, num_mixtures
    logits = torch.randn(1, m, h, w, generator=g)
    means = 0.8 * (2 * torch.rand(1, c * m, h, w, generator=g) - 1)
    lo, hi = log_scale_range
    log_scales = lo + (hi - lo) * torch.rand(1, c * m, h, w, generator=g)
    n_coeffs = c * (c - 1) // 2 * m
    signs = torch.randint(0, 2, (1, n_coeffs, h, w), generator=g) * 2 - 1
    coeffs = signs * coeff_scale * (0.2 + torch.rand(1, n_coeffs, h, w, generator=g))  # |tanh| >= ~0.3
    params = torch.cat([logits, means, log_scales, coeffs], dim=1)
    assert params.shape[1] == LogisticMixture.num_params(c, m)
    return params


def test_mixture_num_params():
    """PixelCNN++ count: M logits + per channel M means and M scales + M per channel pair."""
    assert LogisticMixture.num_params(3, 10) == 100
    assert LogisticMixture.num_params(1, 10) == 30


def test_logistic_mixture_joint_sums_to_one_3bit_3channel():
    """With num_bits=3 the joint over all 8**3 colour values of each pixel sums to 1."""
    c, m, h, w, bits = 3, 4, 2, 2, 3
    params = _mixture_params(c, m, h, w, seed=3)
    dist_one = LogisticMixture(params, bits, c, m)
    assert dist_one.coeffs.abs().min() > 0.05  # the channel autoregression really acts
    levels = 2 ** bits
    grid = torch.tensor(list(itertools.product(range(levels), repeat=c)), dtype=torch.float32) / (levels - 1)
    x = grid[:, :, None, None].expand(-1, -1, h, w)  # 512 x 3 x h x w, same colour at every pixel
    dist = LogisticMixture(params.expand(len(grid), -1, -1, -1), bits, c, m)
    log_p = dist.log_prob(x)
    assert log_p.shape == (len(grid), h, w)
    total = torch.logsumexp(log_p.double(), dim=0).exp()
    # Bins tile the real line (edge bins take the tails), so the sum telescopes to exactly 1; the
    # tolerance covers float32 rounding of 512 terms (~1e-6) and the few bins where the mass is
    # below 1e-5 and the density-at-centre approximation is used instead.
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4), total


def test_logistic_mixture_sums_to_one_8bit_1channel():
    """With 8 bits and one channel the 256 values of each pixel sum to 1."""
    c, m, h, w, bits = 1, 5, 3, 3, 8
    params = _mixture_params(c, m, h, w, seed=4, log_scale_range=(-4.0, 0.0))
    values = torch.arange(256, dtype=torch.float32) / 255
    x = values[:, None, None, None].expand(-1, 1, h, w)
    log_p = LogisticMixture(params.expand(256, -1, -1, -1), bits, c, m).log_prob(x)
    total = torch.logsumexp(log_p.double(), dim=0).exp()
    # Same telescoping argument; tolerance for float32 rounding and sub-1e-5 bins.
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4), total


@pytest.mark.parametrize("m", [1, 3])
def test_logistic_mixture_last_channel_conditional_sums_to_one_8bit(m):
    """Summing the 3-channel 8-bit joint over x2 gives the 2-channel joint of (x0, x1)."""
    h, w, bits = 2, 2, 8
    params3 = _mixture_params(3, m, h, w, seed=5, log_scale_range=(-3.0, 0.0))
    # The same mixture restricted to channels 0 and 1 in the 2-channel layout:
    # logits, means (ch 0, 1), log-scales (ch 0, 1), coefficient of the pair (1 <- 0).
    logits, means, log_scales, coeffs = params3.split([m, 3 * m, 3 * m, 3 * m], dim=1)
    params2 = torch.cat([logits, means[:, :2 * m], log_scales[:, :2 * m], coeffs[:, :m]], dim=1)
    values = torch.arange(256, dtype=torch.float32) / 255
    for v0, v1 in [(0, 0), (17, 200), (128, 255), (255, 3), (90, 91)]:
        x = torch.empty(256, 3, h, w)
        x[:, 0], x[:, 1] = v0 / 255, v1 / 255
        x[:, 2] = values[:, None, None]
        log_joint3 = LogisticMixture(params3.expand(256, -1, -1, -1), bits, 3, m).log_prob(x)
        log_joint2 = LogisticMixture(params2, bits, 2, m).log_prob(x[:1, :2])[0]
        conditional_total = torch.logsumexp(log_joint3.double(), dim=0) - log_joint2.double()
        # sum_x2 p(x0, x1, x2) / p(x0, x1) = 1: float32 rounding and sub-1e-5 bins only.
        assert torch.allclose(conditional_total.exp(), torch.ones(h, w, dtype=torch.float64), atol=1e-4), \
            (v0, v1, conditional_total.exp())


def test_logistic_mixture_matches_hand_computation():
    """log p(x) of one 3-channel pixel equals a float64 hand computation of PixelCNN++'s formula."""
    m, bits = 2, 8
    params = _mixture_params(3, m, 1, 1, seed=8, log_scale_range=(-2.5, -1.0))
    x = torch.tensor([40.0, 200.0, 128.0]).view(1, 3, 1, 1) / 255
    got = LogisticMixture(params, bits, 3, m).log_prob(x).item()

    p = params.double().flatten()
    logits, means, log_scales, raw_coeffs = p[:m], p[m:4 * m].view(3, m), p[4 * m:7 * m].view(3, m), \
        p[7 * m:].view(3, m)
    coeff = torch.tanh(raw_coeffs)  # pairs in order (1 <- 0), (2 <- 0), (2 <- 1)
    xs = 2 * x.double().flatten() - 1
    cond_means = torch.stack([means[0],
                              means[1] + coeff[0] * xs[0],
                              means[2] + coeff[1] * xs[0] + coeff[2] * xs[1]])
    s = log_scales.exp()
    upper = torch.sigmoid((xs[:, None] + 1 / 255 - cond_means) / s)
    lower = torch.sigmoid((xs[:, None] - 1 / 255 - cond_means) / s)
    log_component = torch.log(upper - lower).sum(0) + torch.log_softmax(logits, 0)
    hand = torch.logsumexp(log_component, 0).item()
    assert abs(got - hand) < 1e-3, (got, hand)


def test_logistic_mixture_sample_decodes_channel_autoregression():
    """With tiny scales, sampling returns the colour whose conditioned means were set to it."""
    b, h, w = 8, 4, 4
    g = torch.Generator().manual_seed(9)
    target = torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255
    t = 2 * target - 1
    raw_coeffs = 2 * torch.rand(b, 3, h, w, generator=g) - 1
    coeff = torch.tanh(raw_coeffs)  # pairs (1 <- 0), (2 <- 0), (2 <- 1), one mixture component
    means = torch.stack([t[:, 0],
                         t[:, 1] - coeff[:, 0] * t[:, 0],
                         t[:, 2] - coeff[:, 1] * t[:, 0] - coeff[:, 2] * t[:, 1]], dim=1)
    params = torch.cat([torch.zeros(b, 1, h, w), means, torch.full((b, 3, h, w), -7.0), raw_coeffs], dim=1)
    dist = LogisticMixture(params, 8, 3, 1)
    assert torch.allclose(dist._conditioned_means(t)[:, :, 0], t, atol=1e-6)
    torch.manual_seed(1)
    x = dist.sample()
    assert x.shape == (b, 3, h, w)
    # Logistic noise of scale e^-7 stays inside a half bin (4.3 scales) with probability 0.97 per
    # channel, so ~90% of pixels come back exactly; wrong coefficients would leave almost none.
    exact = (x == target).all(dim=1).float().mean()
    assert exact > 0.75, exact
    assert (dist.log_prob(target) > -0.5).float().mean() > 0.9


def test_logistic_mixture_edge_bins_use_tails():
    """x=0 and x=1 take the whole tail mass: finite for extreme means, ~1 when the mean is beyond."""
    bits = 8

    def log_prob(x_value, mean, log_scale):
        params = torch.tensor([0.0, mean, log_scale]).view(1, 3, 1, 1)  # 1 channel, 1 component
        return LogisticMixture(params, bits, 1, 1).log_prob(torch.full((1, 1, 1, 1), x_value)).item()

    # Mean far outside [-1, 1] on the same side: the edge bin holds almost all the mass.
    assert log_prob(0.0, -5.0, -2.0) > -1e-6
    assert log_prob(1.0, 5.0, -2.0) > -1e-6
    # Mean exactly at the edge value: about half the mass is beyond the edge, so ~log(0.5 + bin).
    half_mass = 1 / (1 + math.exp(-(1 / 255) / math.exp(-2.0)))  # sigmoid(half bin / scale)
    assert abs(log_prob(0.0, -1.0, -2.0) - math.log(half_mass)) < 1e-5
    # Extreme means on the far side: finite and equal to log sigmoid of the edge's standardized value.
    for x_value, mean in [(0.0, 50.0), (1.0, -50.0)]:
        for log_scale in [0.0, -7.0, -20.0]:  # log-scales are clamped at -7
            lp = log_prob(x_value, mean, log_scale)
            s = math.exp(max(log_scale, -7.0))
            edge = (-1.0 + 1 / 255 - mean) / s if x_value == 0.0 else -((1.0 - 1 / 255 - mean) / s)
            assert math.isfinite(lp)
            assert math.isclose(lp, edge, rel_tol=1e-4), (x_value, mean, log_scale, lp, edge)
    # An interior value far from every mean falls back on the density: finite, very negative.
    lp = log_prob(0.5, 50.0, -7.0)
    assert math.isfinite(lp) and lp < -1000


# ------------------------------------------------------------------------------------- Bernoulli

def test_bernoulli_probabilities_sum_to_one_and_match_hand_computation():
    """p(0) + p(1) = 1 per pixel and log p(x) = x log sigmoid(l) + (1-x) log sigmoid(-l)."""
    logits = torch.tensor([[[[-30.0, -2.5], [0.0, 0.7]], [[3.0, 12.0], [-0.1, 25.0]]]])
    dist = Bernoulli(logits)
    p0 = dist.log_prob(torch.zeros_like(logits)).double().exp()
    p1 = dist.log_prob(torch.ones_like(logits)).double().exp()
    assert torch.allclose(p0 + p1, torch.ones_like(p0), atol=1e-6)
    for logit, x in [(-2.5, 1.0), (-2.5, 0.0), (0.7, 1.0), (3.0, 0.0), (25.0, 0.0), (-30.0, 1.0)]:
        hand = math.log(1 / (1 + math.exp(-logit))) if x == 1.0 else math.log(1 / (1 + math.exp(logit)))
        got = Bernoulli(torch.tensor([logit])).log_prob(torch.tensor([x])).item()
        assert math.isclose(got, hand, rel_tol=1e-5, abs_tol=1e-6), (logit, x, got, hand)
    assert torch.allclose(dist.mean(), torch.sigmoid(logits))


# ---------------------------------------------------------------------------- reconstruction NLL

def _crop_check(cfg, params, x, change_border, change_inside):
    base = reconstruction_nll(cfg, params, x)
    assert base.shape == (x.shape[0],)
    p2, x2 = params.clone(), x.clone()
    change_border(p2, x2)
    assert torch.allclose(reconstruction_nll(cfg, p2, x2), base, rtol=0, atol=0)
    p3, x3 = params.clone(), x.clone()
    change_inside(p3, x3)
    assert not torch.allclose(reconstruction_nll(cfg, p3, x3), base)


def test_reconstruction_nll_crop_ignores_border_bernoulli():
    """With likelihood_crop=2 the outer 2-pixel frame of params and x does not enter the NLL."""
    cfg = tiny_config(image_channels=1, num_x_bits=1, likelihood="bernoulli", likelihood_crop=2)
    assert cfg.num_dims == 1 * 4 * 4
    g = torch.Generator().manual_seed(6)
    params = torch.randn(3, 1, 8, 8, generator=g)
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5), generator=g)

    def border(p, xx):
        for sl in [(slice(None), slice(None), slice(0, 2)), (slice(None), slice(None), slice(6, 8)),
                   (Ellipsis, slice(0, 2)), (Ellipsis, slice(6, 8))]:
            xx[sl] = 1 - xx[sl]
            p[sl] = p[sl] * -7.0 + 3.0

    def inside(p, xx):
        xx[:, :, 2, 2] = 1 - xx[:, :, 2, 2]
        xx[:, :, 5, 5] = 1 - xx[:, :, 5, 5]

    _crop_check(cfg, params, x, border, inside)
    # And the value itself is the sum over the 4x4 centre only.
    hand = -Bernoulli(params[:, :, 2:6, 2:6]).log_prob(x[:, :, 2:6, 2:6]).sum(dim=(1, 2, 3))
    assert torch.allclose(reconstruction_nll(cfg, params, x), hand)


def test_reconstruction_nll_crop_ignores_border_mixture():
    """The crop also applies to the logistic mixture (border colours and params are ignored)."""
    cfg = tiny_config(likelihood_crop=2)
    params = torch.cat([_mixture_params(3, cfg.num_mixtures, 8, 8, seed=s) for s in range(2)])
    x = torch.round(torch.rand(2, 3, 8, 8) * 255) / 255

    def border(p, xx):
        xx[:, :, :2] = 1.0 - xx[:, :, :2]
        xx[..., 6:] = 0.0
        p[:, :, 7] += 5.0
        p[..., 1] -= 3.0

    def inside(p, xx):
        xx[:, 1, 3, 4] = 1.0 - xx[:, 1, 3, 4]

    _crop_check(cfg, params, x, border, inside)
