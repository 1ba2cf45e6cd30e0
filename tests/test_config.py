"""NVAEConfig validation, presets, serialization and derived properties."""
import dataclasses
import json

import pytest
from conftest import tiny_config

import nvae_core
from nvae_core import NVAE, ConfigError, NVAEConfig, TrainStep
from nvae_core.training import check_precision

# (overrides of the tiny config, the field the message must name, the bad value as it must
# appear, words of the allowed values that must appear)
BAD_CONFIGS = [
    (dict(encoder_cell="dense"), "encoder_cell", "'dense'", ["'regular'", "'separable'"]),
    (dict(decoder_cell="mixer"), "decoder_cell", "'mixer'", ["'regular'", "'separable'"]),
    (dict(normalization="layer_norm"), "normalization", "'layer_norm'", ["'weight_norm'", "'batch_norm'"]),
    (dict(activation="relu"), "activation", "'relu'", ["'elu'", "'swish'"]),
    (dict(likelihood="gaussian"), "likelihood", "'gaussian'", ["'logistic_mixture'", "'bernoulli'"]),
    (dict(precision="fp8"), "precision", "'fp8'", ["'fp32'", "'bf16'", "'fp16'"]),
    (dict(dataset="imagenet"), "dataset", "'imagenet'", ["'cifar10'", "'mnist'", "'image-folder'"]),
    (dict(num_channels_enc=0), "num_channels_enc", "=0", ["positive integer"]),
    (dict(num_latent_scales=-1), "num_latent_scales", "=-1", ["positive integer"]),
    (dict(num_groups_per_scale=0), "num_groups_per_scale", "=0", ["positive integer"]),
    (dict(num_latent_per_group=2.5), "num_latent_per_group", "=2.5", ["positive integer"]),
    (dict(batch_size=True), "batch_size", "=True", ["positive integer"]),
    (dict(num_flows=-1), "num_flows", "=-1", [">= 0"]),
    (dict(image_size=10), "image_size", "=10", ["multiple of 4"]),
    (dict(image_channels=1, likelihood="bernoulli", num_x_bits=8), "num_x_bits", "=8", ["1", "bernoulli"]),
    (dict(num_x_bits=1), "num_x_bits", "=1", ["2..8", "logistic_mixture"]),
    (dict(num_x_bits=9), "num_x_bits", "=9", ["1..8"]),
    (dict(dataset="cifar10", image_size=32, image_channels=1), "image_channels", "=1", ["3", "'cifar10'"]),
    (dict(dataset="cifar10", image_size=16), "image_size", "=16", ["32", "'cifar10'"]),
    (dict(dataset="mnist", image_channels=1, image_size=32), "likelihood", "'logistic_mixture'", ["'bernoulli'"]),
    (dict(num_postprocess_blocks=2), "num_postprocess_blocks", "=2", ["num_preprocess_blocks=1"]),
    (dict(likelihood_crop=4), "likelihood_crop", "=4", ["half of image_size=8"]),
    (dict(learning_rate=0.0), "learning_rate", "=0.0", ["> 0"]),
    (dict(learning_rate_min=1.0), "learning_rate_min", "=1.0", ["learning_rate=0.01"]),
    (dict(kl_anneal_portion=0.0), "kl_anneal_portion", "=0.0", ["(0, 1]"]),
    (dict(sr_lambda=-0.1), "sr_lambda", "=-0.1", [">= 0"]),
    (dict(weight_decay=float("nan")), "weight_decay", "=nan", ["finite"]),
]


@pytest.mark.parametrize("overrides, field, value, allowed", BAD_CONFIGS,
                         ids=[f"{case[1]}{case[2]}" for case in BAD_CONFIGS])
def test_bad_config_raises_config_error_naming_field_value_and_allowed(overrides, field, value, allowed):
    """Each bad value raises ConfigError whose message names the field, the value and what is allowed."""
    with pytest.raises(ConfigError) as info:
        tiny_config(**overrides)
    message = str(info.value)
    assert field in message, message
    assert value in message, message
    for word in allowed:
        assert word in message, (word, message)


WRONGLY_TYPED = [
    ("sr_lambda", "0.1"),  # a number arriving as a string (CLI, JSON, MLflow params)
    ("learning_rate", None),
    ("kl_anneal_portion", "0.3"),
    ("num_flows", True),  # a bool is not a count (the positive-count fields already reject it)
]


@pytest.mark.parametrize("field, value", WRONGLY_TYPED, ids=[f"{f}={v!r}" for f, v in WRONGLY_TYPED])
def test_wrongly_typed_values_raise_config_error(field, value):
    """A value of the wrong type is a bad value too: ConfigError naming the field, not a TypeError."""
    with pytest.raises(ConfigError) as info:
        tiny_config(**{field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_bad_value_through_replace_is_rejected():
    """replace() validates again: a valid config cannot be turned into an invalid one."""
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="activation='gelu'"):
        cfg.replace(activation="gelu")
    assert isinstance(ConfigError("x"), ValueError)


def test_replace_with_unknown_field():
    """replace() with an unknown field raises ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        tiny_config().replace(num_chanels_enc=8)
    assert "num_chanels_enc" in str(info.value)
    with pytest.raises(ConfigError):
        NVAEConfig.from_dict({"latent_dim": 3})


def test_unknown_preset_name():
    """nvae_core.preset('nope') raises ConfigError listing the known presets."""
    with pytest.raises(ConfigError) as info:
        nvae_core.preset("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in nvae_core.PRESETS:
        assert name in message


@pytest.mark.parametrize("name", sorted(nvae_core.PRESETS))
def test_every_preset_builds_a_valid_config(name):
    """Each preset is a valid NVAEConfig with its fields as listed, and overrides apply."""
    cfg = nvae_core.preset(name)
    assert isinstance(cfg, NVAEConfig)
    for field, value in nvae_core.PRESETS[name].items():
        assert getattr(cfg, field) == value
    assert nvae_core.preset(name, seed=7).seed == 7
    assert cfg.image_size % cfg.downsampling == 0


def test_paper_preset_groups():
    """The paper's MNIST and CelebA 64 group layouts (ada groups), CIFAR-10's 30 groups."""
    assert nvae_core.preset("mnist").groups_per_scale == [10, 5]
    assert nvae_core.preset("celeba64").groups_per_scale == [20, 10, 5]
    assert nvae_core.preset("cifar10").groups_per_scale == [30]
    assert nvae_core.preset("mnist").num_dims == 28 * 28


def test_json_round_trip():
    """from_dict(json.loads(to_json())) gives back an equal config, for defaults and presets."""
    for cfg in [NVAEConfig(), tiny_config(sr_lambda_init=0.5, kl_min_coeff=3e-5, ada_groups=True),
                nvae_core.preset("mnist")]:
        back = NVAEConfig.from_dict(json.loads(cfg.to_json()))
        assert back == cfg
        assert back.to_dict() == cfg.to_dict()


def test_groups_per_scale_ada_and_minimum():
    """ada_groups halve the groups at each coarser scale, down to min_groups_per_scale."""
    assert tiny_config(image_size=16, num_latent_scales=3, num_groups_per_scale=20,
                       ada_groups=True).groups_per_scale == [20, 10, 5]
    assert tiny_config(image_size=16, num_latent_scales=3, num_groups_per_scale=20,
                       ada_groups=False).groups_per_scale == [20, 20, 20]
    cfg = tiny_config(image_size=32, num_latent_scales=4, num_groups_per_scale=8, ada_groups=True,
                      min_groups_per_scale=3)
    assert cfg.groups_per_scale == [8, 4, 3, 3]
    assert cfg.num_groups == 18
    assert tiny_config(image_size=32, num_latent_scales=4, num_groups_per_scale=5,
                       ada_groups=True).groups_per_scale == [5, 2, 1, 1]


def test_config_is_flat():
    """Every field of NVAEConfig (defaults and presets) holds a str, int, float or bool."""
    configs = [NVAEConfig()] + [nvae_core.preset(name) for name in nvae_core.PRESETS]
    for cfg in configs:
        for field in dataclasses.fields(cfg):
            assert type(getattr(cfg, field.name)) in (str, int, float, bool), field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        NVAEConfig().seed = 3


def test_fp16_on_cpu_warns_that_it_is_slow():
    """precision='fp16' runs on a CPU (the GPU's mixed-precision path, so CI takes it) with a warning."""
    cfg = tiny_config(precision="fp16")
    with pytest.warns(UserWarning, match="fp16.*slowly"):
        step = TrainStep(NVAE(cfg), steps_per_epoch=1, device="cpu")
    assert step.scaler.is_enabled()
    with pytest.warns(UserWarning, match="fp16"):
        check_precision("fp16", "cpu")
    check_precision("bf16", "cpu")  # allowed
    check_precision("fp32", "cpu")
