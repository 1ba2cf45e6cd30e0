"""The authors' release, reproduced: parameter counts of their models, and the behaviours in which
a model could match those counts and still differ (initialization, skips, flows, likelihood)."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_config

from nvae_core import NVAE, active_units, active_units_kl, preset
from nvae_core.cells import Cell
from nvae_core.distributions import LogisticMixture
from nvae_core.layers import Conv2d, FactorizedReduce, UpsampleSkip, request_data_init
from nvae_core.training import GRAD_SCALE_INIT, TrainStep, resolve_precision
from nvae_platform.study.declaration import grid
from studies.ablation_cells import STUDY as CELLS
from studies.ablation_norm import STUDY as NORM

# Measured by building the authors' model from the flags of their README commands, and for the
# benchmark and ablation sizes from flags matching our presets field for field (NVAE_SPEC.md).
AUTHORS_PRESET_PARAMETERS = {
    "mnist": 33_363_134,
    "cifar10": 130_852_480,  # 1 flow per group
    "celeba64": 153_281_364,  # 1 flow per group
    "cifar-small": 3_108_576,
    "cifar-small-nf1": 3_654_176,
    "mnist-small": 2_402_702,
}
# cifar10-ablation (64 channels, 1 scale, 20 groups, no flows) under each study's levels.
AUTHORS_ABLATION_PARAMETERS = [
    (NORM, {"norm_act": "BN+Swish", "groups": "20"}, 25_587_004),
    (NORM, {"norm_act": "BN+ELU", "groups": "20"}, 25_587_004),
    (NORM, {"norm_act": "WN+ELU", "groups": "20"}, 25_545_788),
    (CELLS, {"bottom_up": "regular", "top_down": "separable"}, 22_608_508),  # NVAE's choice
    (CELLS, {"bottom_up": "regular", "top_down": "regular"}, 25_587_004),
    (CELLS, {"bottom_up": "separable", "top_down": "regular"}, 22_302_140),
    (CELLS, {"bottom_up": "separable", "top_down": "separable"}, 19_323_644),
]


def _parameters(cfg):
    with torch.device("meta"):  # shapes only: the 130M-parameter models build in a moment
        return sum(p.numel() for p in NVAE(cfg).parameters())


@pytest.mark.parametrize("name", sorted(AUTHORS_PRESET_PARAMETERS))
def test_preset_has_the_authors_parameter_count(name):
    assert _parameters(preset(name)) == AUTHORS_PRESET_PARAMETERS[name]


@pytest.mark.parametrize("study, levels, expected", AUTHORS_ABLATION_PARAMETERS,
                         ids=[f"{s.name}:{','.join(lv.values())}" for s, lv, _ in AUTHORS_ABLATION_PARAMETERS])
def test_study_row_has_the_authors_parameter_count(study, levels, expected):
    """Each row of the norm and cell studies, at the paper scale, is the authors' model."""
    (trial,) = grid(study, "paper", seeds=[0], only={k: [v] for k, v in levels.items()})
    assert trial.config.num_groups == 20 and trial.config.num_channels_enc == 64
    assert _parameters(trial.config) == expected


def test_norm_study_models_use_regular_cells_and_wn_rows_hold_no_batch_norm():
    """The authors' WN+ELU, BN+ELU and BN+Swish models are all regular cells; WN+ELU has no BN."""
    for trial in grid(NORM, "smoke", seeds=[0]):
        assert (trial.config.encoder_cell, trial.config.decoder_cell) == ("regular", "regular")
        model = NVAE(trial.config)
        has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert has_bn == (trial.levels["norm_act"] != "WN+ELU"), trial.key


# --------------------------------------------------------------------------------- convolutions

def test_which_convolutions_are_weight_normalized():
    """Regular cells, combiners, factorized-reduce skips: weight norm with bias. Up-skip: weight
    norm, no bias. Separable cells: plain convs, no bias."""
    model = NVAE(tiny_config(encoder_cell="regular", decoder_cell="separable"))
    for name, module in model.named_modules():
        if not isinstance(module, Conv2d):
            continue
        wn, bias = module.log_weight_norm is not None, module.bias is not None
        if name.startswith(("postprocess", "decoder_up")) or (".cells." in name and "latent_groups" in name):
            expected = (True, False) if ".skip." in name else (False, False)  # separable decoder side
        else:
            expected = (True, True)
        assert (wn, bias) == expected, name


def test_factorized_reduce_applies_swish_whatever_the_activation():
    torch.manual_seed(0)
    fr = FactorizedReduce(4, 8)
    x = torch.randn(2, 4, 6, 6)
    shifted = [F.silu(x)[:, :, i:, j:] for i, j in ((0, 0), (1, 1), (0, 1), (1, 0))]
    expected = torch.cat([conv(s) for conv, s in zip(fr.convs, shifted)], 1)
    assert torch.allclose(fr(x), expected, atol=1e-6)
    cell = Cell("regular", 4, 8, 2, tiny_config(normalization="weight_norm", activation="elu"))
    assert isinstance(cell.skip, FactorizedReduce)  # an ELU cell's skip still uses Swish
    assert torch.allclose(cell.skip(x)[:, :2], cell.skip.convs[0](F.silu(x)), atol=1e-6)


def test_upsample_skip_is_bilinear_align_corners_then_a_1x1_conv_without_bias():
    torch.manual_seed(0)
    skip = UpsampleSkip(6, 3)
    assert skip.conv.bias is None and skip.conv.log_weight_norm is not None
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    skip = skip.double()
    up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
    expected = F.conv2d(up, skip.conv.normalized_weight())
    assert torch.allclose(skip(x), expected, atol=1e-12)  # the low-resolution conv is exact
    assert not torch.allclose(skip(x), F.conv2d(F.interpolate(x, scale_factor=2.0), skip.conv.normalized_weight()))


def test_weight_norm_data_init_gives_mean_0_and_std_0_2():
    """On the first batch each output channel of an initialized conv has mean 0 and std 0.2 (the
    authors divide by 5 std); the model's WN cells are initialized in order, each from its input."""
    torch.manual_seed(0)
    conv = Conv2d(5, 7, 3, padding=1, data_init=True)
    x = 3 * torch.randn(16, 5, 8, 8) + 1
    request_data_init(conv)
    out = conv(x)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(7), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.full((7,), 0.2), atol=1e-5)
    assert torch.allclose(conv(x), out)  # once only
    cfg = tiny_config(normalization="weight_norm", activation="elu")
    model = NVAE(cfg)
    step = TrainStep(model, steps_per_epoch=1)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, o.detach()))
             for n, m in model.named_modules() if isinstance(m, Conv2d) and m.data_init]
    step.data_init(tiny_batch(cfg, batch=8))
    for hook in hooks:
        hook.remove()
    assert len(outputs) > 10
    for name, out in outputs.items():
        assert torch.allclose(out.std(dim=(0, 2, 3)), torch.full((out.shape[1],), 0.2), atol=1e-3), name


# --------------------------------------------------------------------------------- likelihood

def _mixture_at(x_level, top_bin):
    """log p of the 8-bit level x_level under a fixed 1-channel, 1-component logistic."""
    params = torch.tensor([0.0, 0.97, math.log(0.02)]).view(1, 3, 1, 1)
    dist = LogisticMixture(params, 8, 1, 1, top_bin=top_bin)
    return dist.log_prob(torch.full((1, 1, 1, 1), x_level / 255.0)).item()


def test_top_bin_switch_moves_mass_only_at_254():
    """'exact': only 255 takes the mass above 254.5, and the 256 levels sum to 1. 'authors': 254
    takes the mass of [253.5, inf), so 254 and 255 gain and the total exceeds 1."""
    exact = [_mixture_at(v, "exact") for v in range(256)]
    authors = [_mixture_at(v, "authors") for v in range(256)]
    assert math.isclose(sum(math.exp(p) for p in exact), 1.0, rel_tol=1e-4)
    for v in range(256):
        if v == 254:
            assert authors[v] > exact[v] + 0.1
        else:
            assert authors[v] == pytest.approx(exact[v], abs=1e-6), v
    assert sum(math.exp(p) for p in authors) > 1.05
    top = torch.sigmoid(torch.tensor((2 * 253.5 / 255 - 1 - 0.97) / 0.02))
    assert math.exp(authors[254]) == pytest.approx(1 - top.item(), rel=1e-3)


# --------------------------------------------------------------------------------- active units

def test_both_active_unit_counts_see_a_collapsed_group():
    """A group whose posterior is its prior and does not depend on x (KL 0, constant mean) is
    inactive under both counts; a group whose posterior mean follows x is active under both."""
    torch.manual_seed(0)
    cfg = tiny_config(num_latent_scales=1, num_groups_per_scale=2, residual_normal=True)
    model = NVAE(cfg).eval()
    collapsed = model.latent_groups[1]
    with torch.no_grad():
        for conv in (collapsed.posterior_head, collapsed.prior_head[1]):  # q = p = N(0, 1.01^2)
            conv.weight.zero_()
            conv.bias.zero_()
        live = model.latent_groups[0].posterior_head
        live.bias.zero_()
        live.log_weight_norm.add_(3.0)  # the first group's mean varies strongly with x
    x = torch.rand(64, 3, 8, 8)
    burda = active_units(model, [x[:32], x[32:]])
    authors = active_units_kl(model, [x[:32], x[32:]])
    latent, area = cfg.num_latent_per_group, (8 // cfg.downsampling) ** 2
    assert burda[1] == 0 and authors[1] == 0
    assert burda[0] > 0.5 * latent * area and authors[0] > 0.5 * latent
    assert authors[0] <= latent  # the authors count channels, Burda et al. count units
    assert active_units_kl(model, [x], threshold=-1.0) == [latent, latent]


# --------------------------------------------------------------------------------- precision

def test_precision_auto_is_the_authors_fp16_on_cuda_and_fp32_on_cpu():
    assert preset("cifar10").precision == "auto"
    assert resolve_precision("auto", "cuda") == "fp16" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cuda") == "bf16"
    step = TrainStep(NVAE(tiny_config()), steps_per_epoch=1)
    assert step.precision == "fp32" and not step.scaler.is_enabled()
    assert GRAD_SCALE_INIT == 2.0 ** 10


# --------------------------------------------------------------------------------- schedules

def test_learning_rate_is_the_authors_warmup_then_per_epoch_cosine():
    """Warm-up from 0 over 5 epochs, per step; then constant within an epoch, cosine over epochs
    6..epochs-1 (T_max = epochs - 6), learning_rate_min in the last epoch."""
    from nvae_core import learning_rate

    cfg = preset("cifar10", epochs=20, warmup_epochs=5.0)
    per_epoch, lr0, lr_min = 100, cfg.learning_rate, cfg.learning_rate_min
    assert learning_rate(0, per_epoch, cfg) == 0.0
    assert learning_rate(250, per_epoch, cfg) == pytest.approx(lr0 * 0.5)
    assert learning_rate(500, per_epoch, cfg) == pytest.approx(lr0)  # epoch 5: no decay yet
    assert learning_rate(599, per_epoch, cfg) == pytest.approx(lr0)
    for epoch in range(6, 20):
        expected = lr_min + (lr0 - lr_min) * 0.5 * (1 + math.cos(math.pi * (epoch - 5) / 14))
        assert learning_rate(epoch * per_epoch, per_epoch, cfg) == pytest.approx(expected)
        assert learning_rate(epoch * per_epoch + 99, per_epoch, cfg) == pytest.approx(expected)
    assert learning_rate(19 * per_epoch, per_epoch, cfg) == pytest.approx(lr_min)
