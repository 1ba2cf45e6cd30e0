"""Every ablation switch of the NVAE builds, trains a full step, and gives sound results.

Design of the switch sweep. The nine switches (normalization x activation x encoder cell x decoder
cell x SE x residual Normal x flows x likelihood x KL balancing, all two-level) make 2**9 = 512
cases. We run the full product of the seven architecture switches (128 cases) and set the last two
from parities of the others:

    likelihood  = bernoulli  iff  norm ^ act ^ enc ^ dec  is odd
    kl_balance  = off        iff  dec ^ se ^ residual ^ flows  is odd

That is a 2**(9-2) fractional factorial with defining words of length 5, 5 and 8, i.e. resolution
V: every combination of levels of ANY four of the nine switches occurs (so all pairs and triples,
the named paper baselines WN+ELU, BN+ELU and BN+Swish with every cell, flow, SE and residual choice,
and each of them with both likelihoods and both KL modes). Each case is a real TrainStep (data-init
for weight norm, KL balancing at the first step's tiny KL coefficient, spectral and BN-scale
regularization) on a tiny config. The full 512-case product adds only interactions of five or
more switches at 4x the cost (measured once on a loaded 2-core machine: all 512 pass in 33 s,
against 9 s for these 128).

The tests run single-threaded: the tensors are tiny, so intra-op threads only add synchronization,
and on a loaded 2-core machine OpenMP barrier waits made 2-thread steps 5-30x slower.
"""
import copy
import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_config

from nvae_core import NVAE, TrainStep, bits_per_dim, importance_weighted_nll
from nvae_core.config import NVAEConfig
from nvae_core.datasets import digits, dynamic_binarize
from nvae_core.distributions import num_likelihood_params
from nvae_core.layers import NormActConv


@pytest.fixture(autouse=True)
def _one_thread(_seed_and_threads):
    """Run after conftest's fixture (which sets 2 threads) and use one thread for tiny tensors."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


def _likelihood_overrides(likelihood):
    if likelihood == "bernoulli":
        return dict(image_channels=1, num_x_bits=1, likelihood="bernoulli")
    return dict(image_channels=3, num_x_bits=8, likelihood="logistic_mixture", num_mixtures=3)


def _switch_cases():
    cases = []
    for norm, act, enc, dec, flows, se, res in itertools.product(
            ("weight_norm", "batch_norm"), ("elu", "swish"), ("regular", "separable"),
            ("regular", "separable"), (0, 1), (True, False), (True, False)):
        bits = [norm == "batch_norm", act == "swish", enc == "separable", dec == "separable",
                flows == 1, se, res]
        likelihood = "bernoulli" if (bits[0] ^ bits[1] ^ bits[2] ^ bits[3]) else "logistic_mixture"
        kl_balance = not (bits[3] ^ bits[5] ^ bits[6] ^ bits[4])
        switches = dict(normalization=norm, activation=act, encoder_cell=enc, decoder_cell=dec,
                        num_flows=flows, use_se=se, residual_normal=res, kl_balance=kl_balance,
                        **_likelihood_overrides(likelihood))
        case_id = (f"{'WN' if norm == 'weight_norm' else 'BN'}-{act}-enc_{enc[:3]}-dec_{dec[:3]}-nf{flows}"
                   f"-{'se' if se else 'nose'}-{'res' if res else 'nores'}-{likelihood[:4]}"
                   f"-{'bal' if kl_balance else 'nobal'}")
        cases.append(pytest.param(switches, id=case_id))
    return cases


SWITCH_CASES = _switch_cases()


def full_step(cfg, seed=0, steps=1):
    """A fresh model on cfg trained `steps` full TrainSteps on one tiny batch; (model, last stats)."""
    torch.manual_seed(seed)
    model = NVAE(cfg)
    train = TrainStep(model, steps_per_epoch=1)
    x = tiny_batch(cfg, batch=4, seed=seed)
    for _ in range(steps):
        stats = train(x)
    return model, stats


def assert_all_grads_finite(model):
    """Every parameter received a gradient (not None) and it is finite."""
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters with no gradient: {missing}"
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters with non-finite gradients: {bad}"


def test_switch_design_covers_every_four_switch_combination():
    """The 128-case sweep holds all 16 level combinations of every 4 of the 9 switches."""
    rows = []
    for case in SWITCH_CASES:
        s = case.values[0]
        rows.append((s["normalization"], s["activation"], s["encoder_cell"], s["decoder_cell"],
                     s["num_flows"], s["use_se"], s["residual_normal"], s["likelihood"], s["kl_balance"]))
    assert len(set(rows)) == len(rows) == 128
    for columns in itertools.combinations(range(9), 4):
        assert len({tuple(r[c] for c in columns) for r in rows}) == 16, columns


@pytest.mark.parametrize("switches", SWITCH_CASES)
def test_every_switch_combination_trains_a_full_step(switches):
    """A full TrainStep gives a finite loss and a finite gradient on every parameter."""
    cfg = tiny_config(**switches)
    model, stats = full_step(cfg)
    assert math.isfinite(float(stats["loss"])) and math.isfinite(float(stats["nelbo"]))
    assert stats["kl_coeff"] < 1.0  # KL balancing (when on) was active in this step
    if not cfg.kl_balance:
        assert torch.all(stats["kl_weights"] == 1.0)
    assert float(stats["spectral_reg"]) > 0
    assert (float(stats["bn_reg"]) > 0) == (cfg.normalization == "batch_norm")
    assert_all_grads_finite(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


EXTRA_CASES = {
    "sr0-BN": dict(sr_lambda=0.0),
    "sr0-WN-elu": dict(sr_lambda=0.0, normalization="weight_norm", activation="elu"),
    "sr-annealed": dict(sr_lambda_init=1.0),
    "1-scale": dict(num_latent_scales=1, num_groups_per_scale=3),
    "1-scale-ada-nf1": dict(num_latent_scales=1, num_groups_per_scale=3, ada_groups=True, num_flows=1),
    "3-scale-ada": dict(num_latent_scales=3, num_groups_per_scale=4, ada_groups=True),
    "2-scale-ada-min2-sr0": dict(num_groups_per_scale=4, ada_groups=True, min_groups_per_scale=2,
                                 sr_lambda=0.0),
    "3-scale-ada-WN-bern": dict(num_latent_scales=3, num_groups_per_scale=4, ada_groups=True,
                                normalization="weight_norm", **_likelihood_overrides("bernoulli")),
    "bern-12x12-crop2": dict(image_size=12, likelihood_crop=2, **_likelihood_overrides("bernoulli")),
    "bern-12x12-crop2-WN-nf1": dict(image_size=12, likelihood_crop=2, normalization="weight_norm",
                                    num_flows=1, **_likelihood_overrides("bernoulli")),
}


@pytest.mark.parametrize("overrides", list(EXTRA_CASES.values()), ids=list(EXTRA_CASES))
def test_extra_configurations_train_two_full_steps(overrides):
    """SR off/annealed, 1 or 3 scales, ada groups, cropped 12x12 Bernoulli: two sound full steps."""
    cfg = tiny_config(**overrides)
    model, stats = full_step(cfg, steps=2)
    assert math.isfinite(float(stats["loss"]))
    assert_all_grads_finite(model)
    if cfg.sr_lambda == 0:
        assert float(stats["spectral_reg"]) == 0.0 and float(stats["bn_reg"]) == 0.0
        assert stats["sr_lambda"] == 0.0


def test_ada_groups_halve_per_coarser_scale():
    """ada_groups: 4, 2, 1 groups from the finest scale, floored at min_groups_per_scale."""
    assert tiny_config(num_latent_scales=3, num_groups_per_scale=4, ada_groups=True).groups_per_scale == [4, 2, 1]
    cfg = tiny_config(num_latent_scales=3, num_groups_per_scale=4, ada_groups=True, min_groups_per_scale=2)
    assert cfg.groups_per_scale == [4, 2, 2]
    assert len(NVAE(cfg).latent_groups) == 8


def test_likelihood_crop_ignores_the_border():
    """With likelihood_crop=2 on 12x12 data, -log p(x|z) ignores the 2-pixel output border and num_dims is 8*8."""
    cfg = tiny_config(image_size=12, likelihood_crop=2, **_likelihood_overrides("bernoulli"))
    assert cfg.num_dims == 64
    model = NVAE(cfg)
    result = model(tiny_batch(cfg))
    grad, = torch.autograd.grad(result.recon_nll.sum(), result.output)
    interior = torch.zeros_like(grad, dtype=torch.bool)
    interior[:, :, 2:-2, 2:-2] = True
    assert torch.all(grad[~interior] == 0)
    assert torch.all(grad[interior] != 0)


# ----------------------------------------------------------------------------- ForwardResult


@pytest.mark.parametrize("overrides, sides", [
    (dict(), [2, 2, 4, 4]),  # 2 scales x 2 groups, 8x8 image, 1 preprocess block
    (dict(num_latent_scales=3, num_groups_per_scale=4, ada_groups=True), [1, 2, 2, 4, 4, 4, 4]),
    (dict(num_latent_scales=1, num_groups_per_scale=3, num_flows=1), [4, 4, 4]),
    (dict(image_size=12, likelihood_crop=2, num_latent_per_group=5, **_likelihood_overrides("bernoulli")),
     [3, 3, 6, 6]),
], ids=["2-scales", "3-scales-ada", "1-scale-nf1", "bern-12x12"])
def test_forward_result_shapes(overrides, sides):
    """recon_nll/log_q/log_p are (B,), kl (B, G), posterior means L channels at their scale's size, coarsest first."""
    cfg = tiny_config(**overrides)
    batch = 3
    result = NVAE(cfg)(tiny_batch(cfg, batch=batch))
    assert result.output.shape == (batch, num_likelihood_params(cfg), cfg.image_size, cfg.image_size)
    assert result.recon_nll.shape == result.log_q.shape == result.log_p.shape == (batch,)
    assert result.kl.shape == (batch, cfg.num_groups) == (batch, len(sides))
    assert [tuple(m.shape) for m in result.posterior_means] == [
        (batch, cfg.num_latent_per_group, s, s) for s in sides]
    assert all(t.dtype == torch.float32 for t in (result.output, result.recon_nll, result.kl,
                                                   result.log_q, result.log_p))
    assert torch.allclose(result.nelbo, result.recon_nll + result.kl.sum(dim=1))
    assert torch.all(result.recon_nll > 0)


def test_analytic_kl_matches_log_q_minus_log_p_on_average():
    """Without flows the analytic KL agrees with the Monte Carlo average of log q - log p over 500 samples."""
    cfg = tiny_config(num_latent_scales=1, num_groups_per_scale=2)
    model = NVAE(cfg).eval()
    x = tiny_batch(cfg, batch=2).repeat(500, 1, 1, 1)
    with torch.no_grad():
        result = model(x)
    analytic = result.kl.sum(1).view(500, 2)
    mc = (result.log_q - result.log_p).view(500, 2)
    # The first group's KL is the same for every sample; later groups depend on z_<l, so compare
    # the batch averages (standard error from the samples themselves).
    stderr = mc.std(0) / math.sqrt(500)
    assert torch.all((mc.mean(0) - analytic.mean(0)).abs() < 5 * stderr + 1e-3)


# ----------------------------------------------------------------------------- runtime switches


CHANNELS_LAST_CASES = {
    "BN-sep": dict(),
    "BN-regular-nf1": dict(decoder_cell="regular", num_flows=1),
    "WN-elu": dict(normalization="weight_norm", activation="elu"),
}


def _twin_models(cfg):
    torch.manual_seed(0)
    a = NVAE(cfg.replace(channels_last=False))
    b = NVAE(cfg.replace(channels_last=True))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("overrides", list(CHANNELS_LAST_CASES.values()), ids=list(CHANNELS_LAST_CASES))
def test_channels_last_forward_matches(overrides):
    """channels_last=True gives the same ForwardResult as channels_last=False for the same weights, x and seed."""
    cfg = tiny_config(**overrides)
    a, b = _twin_models(cfg)
    x = tiny_batch(cfg)
    torch.manual_seed(1)
    ra = a(x)
    torch.manual_seed(1)
    rb = b(x.contiguous(memory_format=torch.channels_last))
    for name in ("recon_nll", "kl", "log_q", "log_p"):
        torch.testing.assert_close(getattr(rb, name), getattr(ra, name), rtol=1e-4, atol=1e-3, msg=name)
    for group, (ma, mb) in enumerate(zip(ra.posterior_means, rb.posterior_means)):
        torch.testing.assert_close(mb, ma, rtol=1e-4, atol=1e-4, msg=f"posterior mean of group {group}")


@pytest.mark.parametrize("overrides", list(CHANNELS_LAST_CASES.values()), ids=list(CHANNELS_LAST_CASES))
def test_channels_last_train_step_matches(overrides):
    """A TrainStep with channels_last gives the same loss (1e-4 relative) and per-group KL, same seed and weights."""
    cfg = tiny_config(**overrides)
    a, b = _twin_models(cfg)
    x = tiny_batch(cfg)
    stats = []
    for model in (a, b):
        torch.manual_seed(1)
        stats.append(TrainStep(model, steps_per_epoch=1)(x))
    sa, sb = stats
    torch.testing.assert_close(sb["loss"], sa["loss"], rtol=1e-4, atol=0.0)
    torch.testing.assert_close(sb["kl_per_group"], sa["kl_per_group"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("likelihood", ["logistic_mixture", "bernoulli"])
def test_channels_last_prior_samples_match(likelihood):
    """Prior samples with channels_last=True equal those without for the same weights and seed."""
    cfg = tiny_config(**_likelihood_overrides(likelihood))
    a, b = _twin_models(cfg)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        sa = a.sample(4)
        torch.manual_seed(3)
        sb = b.sample(4)
    torch.testing.assert_close(sb, sa, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [dict(), dict(normalization="weight_norm", activation="elu", num_flows=1)],
                         ids=["BN-swish", "WN-elu-nf1"])
def test_bf16_training_step_on_cpu(overrides):
    """precision='bf16' trains two full steps on CPU with finite loss (near fp32's) and finite gradients."""
    cfg = tiny_config(**overrides)
    _, fp32 = full_step(cfg)
    _, bf16_first = full_step(cfg.replace(precision="bf16"))
    torch.testing.assert_close(bf16_first["loss"], fp32["loss"], rtol=2e-2, atol=0.0)
    assert float(bf16_first["loss"]) != float(fp32["loss"])  # autocast really ran in bf16
    model, bf16 = full_step(cfg.replace(precision="bf16"), steps=2)
    assert math.isfinite(float(bf16["loss"])) and math.isfinite(float(bf16["nelbo"]))
    assert_all_grads_finite(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------- batch norm


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("grad", [True, False], ids=["fused-path", "no-grad"])
def test_batchnorm_running_stats_update_in_training_only(grad):
    """A training forward updates every BN layer's running statistics once; an eval forward leaves them untouched."""
    cfg = tiny_config(decoder_cell="separable", encoder_cell="regular")
    model = NVAE(cfg)
    bns = _batchnorms(model)
    assert len(bns) > 10 and any(_batchnorms(m) for m in model.modules() if isinstance(m, NormActConv))
    x = tiny_batch(cfg)
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in bns]
    with torch.set_grad_enabled(grad):
        model.train()(x)
    for m, (mean, var, count) in zip(bns, before):
        assert int(m.num_batches_tracked) == count + 1
        assert not torch.equal(m.running_var, var)
    after_train = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in bns]
    with torch.set_grad_enabled(grad):
        model.eval()(x)
    for m, (mean, var, count) in zip(bns, after_train):
        assert int(m.num_batches_tracked) == count
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


def _bn_cfg(act):
    return tiny_config(normalization="batch_norm", activation=act)


def _only_batchnorm(layer):
    (bn,) = _batchnorms(layer)
    return bn


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_normactconv_running_stats_use_momentum_005(fused):
    """One training batch moves running mean/var 5% towards the batch mean and unbiased variance (momentum 0.05)."""
    layer = NormActConv(4, 6, 3, _bn_cfg("swish")).double().train()
    x = torch.randn(5, 4, 6, 6, dtype=torch.double) * 2 + 3
    with torch.set_grad_enabled(fused):
        layer(x)
    bn = _only_batchnorm(layer)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, 0.05 * x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, 0.95 + 0.05 * x.var(dim=(0, 2, 3), unbiased=True))


FUSED_CASES = [
    pytest.param(act, k, groups, stride, False, id=f"{act}-k{k}-{'dw' if groups else 'full'}-s{stride}")
    for act in ("swish", "elu") for k in (1, 3, 5) for groups in (False, True) for stride in (1, 2)
] + [
    pytest.param(act, k, groups, 1, True, id=f"{act}-k{k}-{'dw' if groups else 'full'}-up")
    for act in ("swish", "elu") for k in (3, 5) for groups in (False, True)
]

REFERENCE_ACTIVATIONS = {"swish": F.silu, "elu": F.elu}  # torch's own, not nvae_core's


@pytest.mark.parametrize("act, kernel, depthwise, stride, upsample", FUSED_CASES)
def test_fused_normactconv_matches_unfused(act, kernel, depthwise, stride, upsample):
    """Fused BN-act-conv equals conv(up?(act(batch_norm(x)))) from torch ops: output, grads, stats."""
    c_in = 6
    c_out = c_in if depthwise else 5
    torch.manual_seed(0)
    options = dict(stride=stride, groups=c_in if depthwise else 1)
    if upsample:
        options["upsample"] = True
    fused = NormActConv(c_in, c_out, kernel, _bn_cfg(act), **options).double().train()
    with torch.no_grad():  # non-trivial BN affine parameters and conv bias
        _only_batchnorm(fused).weight.uniform_(0.5, 1.5)
        _only_batchnorm(fused).bias.uniform_(-0.5, 0.5)
        fused.conv.bias.uniform_(-0.5, 0.5)
    plain = copy.deepcopy(fused)
    x = torch.randn(3, c_in, 7, 7, dtype=torch.double) * 1.5 + 0.3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fused = fused(xa)
    assert "NormActConvFn" in type(out_fused.grad_fn).__name__, "the fused path was not taken"

    bn, conv = _only_batchnorm(plain), plain.conv
    a = REFERENCE_ACTIVATIONS[act](F.batch_norm(xb, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                training=True, momentum=0.05, eps=1e-5))
    if upsample:
        a = F.interpolate(a, scale_factor=2.0, mode="nearest")
    bn.num_batches_tracked.add_(1)
    out_plain = F.conv2d(a, conv.normalized_weight(), conv.bias, conv.stride, conv.padding, 1, conv.groups)

    assert out_fused.shape == out_plain.shape
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(out_plain)
    (out_fused * upstream).sum().backward()
    (out_plain * upstream).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10, msg="grad of x")
    for (name, pa), pb in zip(fused.named_parameters(), plain.parameters()):
        assert pa.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-10, msg=f"grad of {name}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(_only_batchnorm(fused), name), getattr(bn, name), msg=name)


# ----------------------------------------------------------------------------- training on digits


def digits_config(steps, steps_per_epoch, seed):
    """A tiny 1-channel 8x8 Bernoulli NVAE for the digits data, scheduled for `steps` steps."""
    return NVAEConfig(dataset="digits", image_channels=1, image_size=8, num_x_bits=1, likelihood="bernoulli",
                      num_channels_enc=16, num_channels_dec=16, num_preprocess_blocks=1,
                      num_preprocess_cells=1, num_postprocess_blocks=1, num_postprocess_cells=1,
                      num_latent_scales=1, num_groups_per_scale=4, num_latent_per_group=8,
                      num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, encoder_cell="regular",
                      decoder_cell="regular", num_flows=0, batch_size=64,
                      epochs=math.ceil(steps / steps_per_epoch), warmup_epochs=1.0, seed=seed)


def bernoulli_nll(x, p):
    """-log prod Bernoulli(x | p) per image, in nats."""
    p = p.clamp(1e-3, 1 - 1e-3)
    return -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)


def train_on_digits(steps, seed):
    """Train digits_config on dynamically binarized train digits; (model, cfg, seconds)."""
    train = digits("train")
    batch = 64
    steps_per_epoch = train.shape[0] // batch
    cfg = digits_config(steps, steps_per_epoch, seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = NVAE(cfg)
    step = TrainStep(model, steps_per_epoch)
    start = time.time()
    while step.step < steps:
        order = torch.randperm(train.shape[0], generator=g)
        for i in range(steps_per_epoch):
            step(dynamic_binarize(train[order[i * batch:(i + 1) * batch]], g))
            if step.step == steps:
                break
    return model, cfg, time.time() - start


@pytest.mark.slow
def test_training_on_digits_beats_pixel_baselines():
    """600 Adamax steps on binarized digits bring the test NELBO over 1 nat below the per-pixel-marginal baseline."""
    steps = 600
    model, cfg, seconds = train_on_digits(steps, seed=0)
    assert cfg.num_dims == 64
    train, test = digits("train"), digits("test")
    x = dynamic_binarize(test, torch.Generator().manual_seed(1234))

    trivial = cfg.num_dims * math.log(2.0)  # 1 bit/dim
    marginal = float(bernoulli_nll(x, train.mean(dim=0, keepdim=True)).mean())
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # average 4 posterior samples per image to steady the estimate
        nelbo = float(torch.stack([model(x).nelbo for _ in range(4)]).mean())
    iw10 = float(importance_weighted_nll(model, x, num_samples=10).mean())

    def show(name, nats):
        print(f"  {name:<28} {nats:7.2f} nats/image  {bits_per_dim(nats, cfg.num_dims):.4f} bits/dim")

    print(f"\ndigits: {steps} steps in {seconds:.1f}s; test split, {x.shape[0]} images, eval mode")
    show("NVAE test NELBO", nelbo)
    show("NVAE test NLL (IW, K=10)", iw10)
    show("per-pixel marginal baseline", marginal)
    show("p = 0.5 baseline", trivial)
    assert math.isfinite(nelbo) and math.isfinite(iw10)
    assert marginal < 0.7 * trivial  # sanity of the baselines themselves
    # With the latents unused the best factorized decoder is the per-pixel marginal, so beating it
    # needs information carried through z (a mutant with z zeroed before the merge ends at 27.10
    # nats vs a 27.07 baseline); seeds 0-4 ended 2.2-2.4 nats below it, the bar is 1 nat.
    assert nelbo < marginal - 1.0, (nelbo, marginal)
    assert iw10 < nelbo + 0.1, (iw10, nelbo)  # importance weighting tightens the bound
