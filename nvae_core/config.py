"""The one flat, validated configuration of an NVAE run, and its named presets.

Every ablation of the paper is a field here, so a study varies fields, never code. The object is
flat (str, int, float, bool only) so that it serializes to JSON and becomes MLflow params as is.
"""
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass

from .dataset_registry import DATASETS

CELLS = ("regular", "separable")
NORMALIZATIONS = ("weight_norm", "batch_norm")
ACTIVATIONS = ("elu", "swish")
LIKELIHOODS = ("logistic_mixture", "bernoulli")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: the authors' fp16 on CUDA, fp32 elsewhere
FLOW_CELLS = ("shift", "affine")
COMPILES = ("off", "on", "auto")  # auto: torch.compile on CUDA at small and paper scale when a C++ compiler is found
TOP_BINS = ("exact", "authors")
SWITCHES = ("auto", "on", "off")  # auto: what the authors do for the dataset
EVAL_SPLITS = ("auto", "test", "validation")



class ConfigError(ValueError):
    """A configuration field holds a value that cannot work; the message says which and why."""


# Common names of fields, from other code bases, that difflib cannot match to ours.
ALIASES = {"lr": "learning_rate", "bs": "batch_size", "batch": "batch_size", "wd": "weight_decay",
           "channels": "num_channels_enc", "groups": "num_groups_per_scale", "flows": "num_flows"}


@dataclass(frozen=True)
class NVAEConfig:
    """Every switch of an NVAE run. Defaults are the paper's CIFAR-10 choices at a small width."""

    # data
    dataset: str = "cifar10"
    image_channels: int = 3
    image_size: int = 32
    num_x_bits: int = 8  # 1 = dynamically binarized data (Bernoulli likelihood)
    likelihood: str = "logistic_mixture"
    num_mixtures: int = 10
    likelihood_crop: int = 0  # pixels cut from each border before the likelihood (MNIST: 32 -> 28)
    logistic_top_bin: str = "exact"  # "authors": x > 0.99 is the top bin, so 8-bit 254 gets [253.5, inf)
    train_flip: str = "auto"  # random horizontal flip of training images; auto: on for colour sets
    eval_split: str = "auto"  # auto: CelebA 64's validation split (what the authors report), else test
    # architecture
    num_channels_enc: int = 32
    num_channels_dec: int = 32
    num_preprocess_blocks: int = 1
    num_preprocess_cells: int = 2
    num_postprocess_blocks: int = 1
    num_postprocess_cells: int = 2
    num_latent_scales: int = 1
    num_groups_per_scale: int = 10
    ada_groups: bool = False
    min_groups_per_scale: int = 1
    num_latent_per_group: int = 20
    num_cell_per_cond_enc: int = 2
    num_cell_per_cond_dec: int = 2
    encoder_cell: str = "regular"
    decoder_cell: str = "separable"
    normalization: str = "batch_norm"
    activation: str = "swish"
    use_se: bool = True
    residual_normal: bool = True
    num_flows: int = 0  # each flow is a pair of IAF cells, the second one mirrored
    flow_cell: str = "shift"  # the authors' shift-only cell; "affine": ours, affine with context
    # objective
    kl_anneal_portion: float = 0.3
    kl_const_portion: float = 1e-4  # the KL coefficient stays at kl_min_coeff for this part of training
    kl_min_coeff: float = 1e-4
    kl_balance: bool = True
    sr_lambda: float = 1e-2  # spectral + BN-scale regularization; 0 switches both off
    sr_lambda_init: float = 0.0  # > 0: anneal lambda from this value down to sr_lambda with the KL
    # optimization
    epochs: int = 400
    batch_size: int = 32  # per worker
    learning_rate: float = 1e-2
    learning_rate_min: float = 1e-4
    warmup_epochs: float = 5.0
    weight_decay: float = 3e-4
    adamax_eps: float = 1e-3
    seed: int = 0
    # runtime
    precision: str = "auto"
    compile: str = "auto"
    channels_last: bool = True  # NHWC tensors: same maths, ~1.3-1.5x faster convs on CPU (oneDNN)

    def __post_init__(self):
        validate(self)

    @property
    def groups_per_scale(self):
        """Number of latent groups at each scale, finest scale first."""
        groups, n = [], self.num_groups_per_scale
        for _ in range(self.num_latent_scales):
            groups.append(n)
            if self.ada_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return groups

    @property
    def flips_training_images(self):
        """train_flip resolved: auto flips the colour sets (CIFAR-10, CelebA 64), not binarized ones."""
        return self.train_flip == "on" or (self.train_flip == "auto" and self.num_x_bits > 1)

    @property
    def evaluation_split(self):
        """eval_split resolved: the split test figures are computed on ("test" or "validation")."""
        if self.eval_split == "auto":
            return "validation" if self.dataset == "celeba64" else "test"
        return self.eval_split

    @property
    def num_groups(self):
        return sum(self.groups_per_scale)

    @property
    def downsampling(self):
        """Total spatial reduction from the image to the coarsest latent scale."""
        return 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

    @property
    def num_dims(self):
        """Dimensions the likelihood is taken over (bits/dim divides by this)."""
        side = self.image_size - 2 * self.likelihood_crop
        return self.image_channels * side * side

    def replace(self, **changes):
        """A copy with some fields changed, validated again."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            guesses = (ALIASES.get(name.lower()) or next(iter(difflib.get_close_matches(name, fields, 1)), None)
                       for name in unknown)
            meant = [guess for guess in guesses if guess]
            hint = f"; did you mean {', '.join(meant)}?" if meant else ""
            raise ConfigError(f"unknown config field(s) {unknown}{hint} (see nvae_core.NVAEConfig for the fields)")
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        return cls().replace(**values)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok, field, value, allowed):
    if not ok:
        raise ConfigError(f"{field}={value!r} is not allowed: expected {allowed}")


def _one_of(cfg, field, choices):
    value = getattr(cfg, field)
    _require(value in choices, field, value, "one of " + ", ".join(repr(c) for c in choices))


def validate(cfg):
    """Raise ConfigError naming the field, its bad value and what is allowed."""
    for field, choices in [("encoder_cell", CELLS), ("decoder_cell", CELLS),
                           ("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS),
                           ("likelihood", LIKELIHOODS), ("precision", PRECISIONS),
                           ("dataset", tuple(DATASETS)), ("flow_cell", FLOW_CELLS), ("compile", COMPILES),
                           ("logistic_top_bin", TOP_BINS), ("train_flip", SWITCHES), ("eval_split", EVAL_SPLITS)]:
        _one_of(cfg, field, choices)
    for field in ("image_channels", "image_size", "num_x_bits", "num_mixtures", "num_channels_enc",
                  "num_channels_dec", "num_preprocess_blocks", "num_preprocess_cells",
                  "num_postprocess_blocks", "num_postprocess_cells", "num_latent_scales",
                  "num_groups_per_scale", "min_groups_per_scale", "num_latent_per_group",
                  "num_cell_per_cond_enc", "num_cell_per_cond_dec", "epochs", "batch_size"):
        value = getattr(cfg, field)
        _require(_is_int(value) and value > 0, field, value, "a positive integer")
    for field in ("num_flows", "likelihood_crop", "seed"):
        value = getattr(cfg, field)
        _require(_is_int(value) and value >= 0, field, value, "an integer >= 0")
    for field in ("sr_lambda", "sr_lambda_init", "weight_decay", "warmup_epochs", "learning_rate_min"):
        value = getattr(cfg, field)
        _require(_is_number(value) and value >= 0, field, value, "a finite number >= 0")
    for field in ("learning_rate", "adamax_eps"):
        value = getattr(cfg, field)
        _require(_is_number(value) and value > 0, field, value, "a finite number > 0")
    for field in ("ada_groups", "use_se", "residual_normal", "kl_balance", "channels_last"):
        value = getattr(cfg, field)
        _require(isinstance(value, bool), field, value, "True or False")
    _require(cfg.learning_rate_min <= cfg.learning_rate, "learning_rate_min", cfg.learning_rate_min,
             f"a number in [0, learning_rate={cfg.learning_rate}]")
    for field in ("kl_anneal_portion", "kl_min_coeff"):
        value = getattr(cfg, field)
        _require(_is_number(value) and 0 < value <= 1, field, value, "a number in (0, 1]")
    _require(_is_number(cfg.kl_const_portion) and 0 <= cfg.kl_const_portion < 1, "kl_const_portion",
             cfg.kl_const_portion, "a number in [0, 1)")
    _require(cfg.eval_split != "validation" or cfg.dataset == "celeba64", "eval_split", cfg.eval_split,
             f"'auto' or 'test' for dataset {cfg.dataset!r} (only celeba64 has a validation split)")
    _require(cfg.num_x_bits <= 8, "num_x_bits", cfg.num_x_bits, "an integer in 1..8")
    _require(cfg.num_postprocess_blocks == cfg.num_preprocess_blocks, "num_postprocess_blocks",
             cfg.num_postprocess_blocks,
             f"the same as num_preprocess_blocks={cfg.num_preprocess_blocks} (each upsamples what one downsampled)")
    _require(cfg.image_size % cfg.downsampling == 0, "image_size", cfg.image_size,
             f"a multiple of {cfg.downsampling} = 2**(num_preprocess_blocks + num_latent_scales - 1)")
    _require(2 * cfg.likelihood_crop < cfg.image_size, "likelihood_crop", cfg.likelihood_crop,
             f"less than half of image_size={cfg.image_size}")
    if cfg.likelihood == "bernoulli":
        _require(cfg.num_x_bits == 1, "num_x_bits", cfg.num_x_bits,
                 "1 with likelihood='bernoulli' (binarized data); use likelihood='logistic_mixture' for 2..8 bits")
    else:
        _require(cfg.num_x_bits >= 2, "num_x_bits", cfg.num_x_bits,
                 "2..8 with likelihood='logistic_mixture'; use likelihood='bernoulli' for binarized data")
    spec = DATASETS[cfg.dataset]
    if spec.size is not None:  # a dataset of fixed shape; image-folder takes any
        _require(cfg.image_channels == spec.channels, "image_channels", cfg.image_channels,
                 f"{spec.channels} for dataset {cfg.dataset!r}")
        _require(cfg.image_size == spec.size, "image_size", cfg.image_size, f"{spec.size} for dataset {cfg.dataset!r}")
    if spec.binarized:
        _require(cfg.likelihood == "bernoulli", "likelihood", cfg.likelihood,
                 f"'bernoulli' for the binarized dataset {cfg.dataset!r}")
