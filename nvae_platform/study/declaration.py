"""A study: the factors an ablation varies, their levels, and the metric it is judged by.

A level is a named set of NVAEConfig overrides, so "BN+Swish" or "L=20" is data, never code. A grid
study trains every combination of levels for every seed; a study with a Search lets Optuna choose
the levels of each trial instead.
"""
from dataclasses import dataclass, field

from nvae_core import ConfigError, NVAEConfig
from nvae_platform.findings import Finding, level_errors, resolved
from nvae_platform.preflight import label_error
from nvae_platform.train.scales import run_config


@dataclass(frozen=True)
class Factor:
    """One factor: level name -> NVAEConfig overrides. smoke_levels replace the levels at smoke
    scale, where the model is too small for the paper's values (e.g. L in {2, 4, 8})."""

    name: str
    levels: dict
    smoke_levels: dict = None

    def at(self, scale):
        return self.smoke_levels if scale == "smoke" and self.smoke_levels else self.levels


def field_factor(name, config_field, values, smoke_values=None):
    """A factor setting one config field, its levels named by their values."""
    def levels(vals):
        return {str(v): {config_field: v} for v in vals} if vals else None
    return Factor(name, levels(values), levels(smoke_values))


@dataclass(frozen=True)
class Search:
    """Optuna picks each trial's levels. Two or more objectives give a Pareto front;
    early_stopping (ASHA on the per-epoch val_bpd) needs a single objective."""

    objectives: dict  # metric -> "min" or "max"
    num_samples: int = 20
    smoke_samples: int = 4
    early_stopping: bool = False


@dataclass(frozen=True)
class Study:
    """What an ablation varies and where it runs. Small and paper scales train `model` (an
    nvae_core preset) on `dataset`; smoke trains a tiny model on offline `smoke_dataset`."""

    name: str
    factors: tuple
    description: str = ""
    dataset: str = "cifar10"
    smoke_dataset: str = "digits"
    model: str = "cifar10-ablation"
    fixed: dict = field(default_factory=dict)  # overrides every trial shares
    columns: tuple = ("test_bpd",)  # figures in the closing table and the report
    search: Search = None
    across: str = None  # a factor whose levels are the report table's columns (e.g. groups)
    baseline: dict = None  # {factor: level} of the row the report compares every other row with
    findings: tuple = ()  # the paper's claims the study tests (nvae_platform.findings.Finding)

    def __post_init__(self):
        if label_error(self.name):
            raise ConfigError(f"Study(name={self.name!r}): {label_error(self.name)}")

    def dataset_at(self, scale):
        return self.smoke_dataset if scale == "smoke" else self.dataset

    def factor(self, name):
        for f in self.factors:
            if f.name == name:
                return f
        raise ConfigError(f"unknown factor {name!r} in study {self.name}: expected one of "
                          f"{', '.join(f.name for f in self.factors)}")


@dataclass(frozen=True)
class Trial:
    """One trial of a study: a level of every factor, a seed and the resolved configuration."""

    key: str
    levels: dict
    seed: int
    config: NVAEConfig


def trial_key(levels, seed):
    """'norm_act=BN+Swish,groups=20,seed=0': a trial's stable name (MLflow run, checkpoint folder)."""
    return ",".join([f"{k}={v}" for k, v in levels.items()] + [f"seed={seed}"])


def study_findings(study, scale):
    """The study's findings at scale, their levels resolved (HIGHEST/LOWEST named); ConfigError naming
    an unknown factor or level, or a name used twice."""
    levels = {f.name: list(f.at(scale)) for f in study.factors}
    names = [f.name for f in study.findings]
    errors = [f"study {study.name}: findings[{i}] is a {type(f).__name__}, not a Finding"
              for i, f in enumerate(study.findings) if not isinstance(f, Finding)]
    errors += [f"study {study.name}: two findings are named {n!r}" for n in sorted({n for n in names
                                                                                     if names.count(n) > 1})]
    errors += [e for f in study.findings if isinstance(f, Finding) for e in level_errors(f, levels)]
    if errors:
        raise ConfigError(f"{errors[0]} (at scale {scale})")
    return tuple(resolved(f, levels) for f in study.findings)


def factor_levels(study, scale, only=None):
    """Each factor's level names at scale, narrowed to `only` ({factor: [levels]}) if given."""
    only = dict(only or {})
    chosen = {}
    for name in only:
        study.factor(name)  # unknown factor -> ConfigError
    for f in study.factors:
        levels = list(f.at(scale))
        wanted = [str(v) for v in only.get(f.name, levels)]
        unknown = [v for v in wanted if v not in levels]
        if unknown:
            raise ConfigError(f"unknown level(s) {unknown} of factor {f.name!r} at scale {scale}: "
                              f"expected some of {', '.join(levels)}")
        chosen[f.name] = wanted
    return chosen


def resolve(study, scale, levels, seed, overrides=None):
    """The NVAEConfig of one trial: the scale, the study's fixed fields, each factor's level,
    then the user's overrides (which may not touch a field a factor varies)."""
    check_overrides(study, scale, overrides or {})
    changes = dict(study.fixed)
    for f in study.factors:
        level_map = f.at(scale)
        if levels[f.name] not in level_map:
            raise ConfigError(f"unknown level {levels[f.name]!r} of factor {f.name!r}: "
                              f"expected one of {', '.join(level_map)}")
        changes.update(level_map[levels[f.name]])
    changes.update(overrides or {})
    changes["seed"] = seed
    return run_config(study.dataset_at(scale), scale, model=study.model, **changes)


def check_overrides(study, scale, overrides):
    """Refuse, naming the flag to use instead, a --set of a field the study or its scale fixes or a
    factor varies, and a value its field does not allow (ConfigError)."""
    dataset = study.dataset_at(scale)
    if "dataset" in overrides:
        raise ConfigError(f"--set dataset: study {study.name} trains on {study.dataset} ({study.smoke_dataset} at "
                          "--scale smoke): choose the scale with --scale, or train another dataset with "
                          "studies/train.py --dataset")
    fixed = sorted(set(overrides) & set(study.fixed))
    if fixed:
        raise ConfigError(f"--set {', '.join(fixed)}: study {study.name} fixes "
                          f"{', '.join(f'{k}={study.fixed[k]!r}' for k in fixed)} in every row of its table; "
                          "declare a study of your own to change it")
    varied = sorted({k for f in study.factors for level in f.at(scale).values() for k in level} & set(overrides))
    if varied:
        raise ConfigError(f"--set {', '.join(varied)}: the study varies this field; "
                          f"choose its levels with --levels FACTOR=LEVEL[,LEVEL] instead")
    try:
        run_config(dataset, scale, model=study.model, **{**study.fixed, **overrides})
    except ConfigError as error:
        raise ConfigError(f"--set: {error}") from None


def combinations(levels):
    """Every combination of {factor: [level, ...]} as {factor: level} dicts, the last factor varying fastest."""
    combos = [{}]
    for name, names in levels.items():
        combos = [{**c, name: level} for c in combos for level in names]
    return combos


def grid(study, scale, seeds, only=None, overrides=None):
    """Every combination of levels x seeds, each resolved and validated."""
    combos = combinations(factor_levels(study, scale, only))
    return [Trial(trial_key(c, s), c, s, resolve(study, scale, c, s, overrides)) for c in combos for s in seeds]
