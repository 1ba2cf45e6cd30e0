"""A study's plan: every trial's configuration and the options they share, resolved and validated
before anything starts (plan_study), and what a trial process needs to know of its study (StudyPlan,
picklable). Kept apart from the driver's modules (Tune's search, MLflow), which a trial process does
not import.

A study's identity (its folder under the storage path, and its MLflow parent run) is its study,
scale, overrides and workers per trial: what a trial's training depends on beside its levels and
seed. A grid's seeds and --levels are not part of it: each invocation asks for some trials of the
study (its Tune experiment, a folder in the study's, named by that set), and trials that ended in
an earlier invocation are not trained again. A search's levels and samples are part of its identity.
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from ray import tune

from nvae_core import ConfigError, data_check
from nvae_core.paths import absolute
from nvae_platform.defaults import default_data_dir, default_storage_path
from nvae_platform.findings import to_json
from nvae_platform.study.declaration import (
    Study,
    Trial,
    combinations,
    factor_levels,
    grid,
    resolve,
    study_findings,
    trial_key,
)
from nvae_platform.train.data_cache import check_data_dir, is_remote
from nvae_platform.train.run_options import RunOptions
from nvae_platform.train.scales import run_options

MAX_TRIALS = 10_000  # more is a typo (--seeds 1000000) far more often than a study; --max-trials raises it


@dataclass
class StudySettings:
    """The shared flags of every study script."""

    scale: str = "smoke"
    seeds: int = 1
    workers_per_trial: int = None  # None: the scale's default
    gpus_per_worker: float = None
    cpus_per_worker: float = None
    max_concurrent: int = None  # None: as many as a local Ray holds; on a cluster, all (the autoscaler grows)
    tracking_uri: str = None  # None: $MLFLOW_TRACKING_URI, else ./mlflow.db
    experiment: str = None  # MLflow experiment; None: the study's name
    storage_path: str = field(default_factory=default_storage_path)  # $NVAE_STORAGE_PATH, else ./runs
    data_dir: str = field(default_factory=default_data_dir)  # $NVAE_DATA_DIR, else ./data
    download: bool = False
    skip_unreadable: bool = False  # leave unreadable image-folder files out instead of refusing to start
    levels: dict = field(default_factory=dict)  # factor -> level names to keep
    overrides: dict = field(default_factory=dict)  # NVAEConfig fields every trial shares
    samples: int = None  # trials of a search; None: the study's
    address: str = None  # Ray cluster; None: $RAY_ADDRESS or one started on this machine, else a local Ray
    num_cpus: int = None  # CPUs of a local Ray
    max_trials: int = MAX_TRIALS  # a plan above it is refused before it is built
    max_failures: int = 2  # restarts of a trial's workers (Train), and of its own process (Tune), after a failure
    row_seeds: dict = field(default_factory=dict)  # (level, ...) in factor order -> seeds of that row; else seeds
    looks: int = 1  # of a sequential run (--until-decided): each verdict is judged at ALPHA / looks (verdicts.py)


@dataclass
class StudyPlan:
    """Everything a trial and the tracker need, fixed before anything starts (picklable)."""

    study: Study
    scale: str
    seeds: list
    levels: dict  # factor -> level names
    overrides: dict
    options: RunOptions  # resources and evaluation of every trial; name set per trial
    trials: list  # the Trials this invocation asks for (a search: every combination, all validated)
    storage_path: str  # the study's storage root (local folder or URI)
    experiment_dir: str  # the study's folder under storage_path: study-scale-digest of its identity
    tune_name: str  # this invocation's Tune experiment, a folder in the study's: tune-digest of its trials
    num_samples: int
    findings: tuple = ()  # the study's findings, their levels resolved at this scale
    looks: int = 1  # of a sequential run (--until-decided): each verdict is judged at ALPHA / looks
    train_in_trial: bool = False  # set by prepare_study: one-worker trials on a local Ray train in the trial's process

    @property
    def is_search(self):
        return self.study.search is not None

    @property
    def study_key(self):
        return f"{self.storage_path}/{self.experiment_dir}"

    @property
    def tune_path(self):
        return f"{self.study_key}/{self.tune_name}"

    @property
    def trial_count(self):
        return self.num_samples if self.is_search else len(self.trials)

    @property
    def trials_path(self):
        return f"{self.study_key}/trials"

    def param_space(self, trials=None):
        """Tune's space: a search's choices; a grid's levels and seeds, of which `trials` (default: all)
        are the points Tune runs (grid_points)."""
        if self.is_search:
            return {name: tune.choice(levels) for name, levels in self.levels.items()}
        trials = self.trials if trials is None else trials
        return {**{name: tune.grid_search(sorted({t.levels[name] for t in trials})) for name in self.levels},
                "seed": tune.grid_search(sorted({t.seed for t in trials}))}

    @staticmethod
    def grid_points(trials):
        """The Tune configs of a grid's trials, those that look longest first (estimated_work): Tune starts
        them in order, and a study that ends on one long trial leaves the other slots idle."""
        ordered = sorted(trials, key=lambda t: -estimated_work(t.config))  # stable: equal ones keep their order
        return [{**t.levels, "seed": t.seed} for t in ordered]

    @property
    def declared_levels(self):
        """Every level of each factor at this scale, in the study's order (not narrowed by --levels)."""
        return factor_levels(self.study, self.scale)

    def parse_key(self, key):
        """({factor: level}, seed) of a grid trial's key; None for a key that is not one of the study's."""
        levels, rest = {}, key
        for name, names in self.declared_levels.items():
            level = next((n for n in names if rest.startswith(f"{name}={n},")), None)
            if level is None:
                return None
            levels[name], rest = level, rest[len(f"{name}={level},"):]
        seed = rest.removeprefix("seed=")
        return (levels, int(seed)) if rest.startswith("seed=") and seed.isdigit() else None

    def levels_and_seed(self, config):
        """({factor: level}, seed) of a Tune trial config."""
        return {name: config[name] for name in self.levels}, config.get("seed", self.seeds[0])

    def describe_config(self, config):
        """(levels, seed, NVAEConfig) of a Tune trial config."""
        levels, seed = self.levels_and_seed(config)
        return levels, seed, resolve(self.study, self.scale, levels, seed, self.overrides)

    def describe(self, trial):
        return self.describe_config(trial.config)

    def key_for(self, config, trial_id):
        key = trial_key(*self.levels_and_seed(config))
        return f"{trial_id},{key}" if self.is_search else key  # a search may sample a level set twice

    def key_of(self, trial):
        return self.key_for(trial.config, trial.trial_id)

    def option_params(self):
        return self.options.params()

    def study_tags(self):
        return {"nvae.study": self.study.name, "nvae.scale": self.scale,
                "nvae.dataset": self.study.dataset_at(self.scale), "nvae.kind": "search" if self.is_search else "grid",
                "nvae.storage": self.study_key, "mlflow.note.content": self.study.description}

    def extent_tags(self, recorded=()):
        """The parent run's tags naming the levels, seeds and trial count of the whole study: this plan's
        trials and the recorded ones ((levels, seed) pairs), which earlier invocations may have added.
        Tags, not params: MLflow cannot change a param, and a later invocation may widen the study."""
        if self.is_search:
            levels, seeds, count = self.levels, self.seeds, self.trial_count
        else:
            pairs = [(t.levels, t.seed) for t in self.trials] + list(recorded)
            levels = {name: [n for n in names if any(lv.get(name) == n for lv, _ in pairs)]
                      for name, names in self.declared_levels.items()}
            seeds, count = sorted({s for _, s in pairs}), len({trial_key(lv, s) for lv, s in pairs})
        return {**{f"nvae.levels.{name}": ",".join(names) for name, names in levels.items()},
                "nvae.seeds": ",".join(map(str, seeds)), "nvae.trials": count}

    def study_params(self):
        params = {"scale": self.scale}
        params.update({f"set.{k}": v for k, v in self.overrides.items()})
        params.update({"factors": ",".join(self.levels), "table.columns": ",".join(self.study.columns),
                       "table.across": self.study.across or "",
                       "table.baseline": json.dumps(self.study.baseline or {})})
        if self.findings:
            params["findings"] = to_json(self.findings)
        if self.is_search:
            params["objectives"] = ",".join(f"{k}:{v}" for k, v in self.study.search.objectives.items())
        return params


def estimated_work(cfg):
    """A rough measure of a configuration's training time (a scheduling hint, not a prediction):
    epochs x latent groups x cells per group x channels^2 x (1 + flows)."""
    cells = cfg.num_cell_per_cond_enc + cfg.num_cell_per_cond_dec
    return cfg.epochs * cfg.num_groups * cells * cfg.num_channels_enc ** 2 * (1 + cfg.num_flows)


def row_seed_counts(levels, settings):
    """{row (its levels in factor order): seeds} of every combination of `levels`: settings.row_seeds
    where it names the row, else settings.seeds. A row_seeds entry that is not such a row is refused."""
    counts = {tuple(c.values()): settings.seeds for c in combinations(levels)}
    for row, seeds in settings.row_seeds.items():
        row = tuple(str(n) for n in (row if isinstance(row, (tuple, list)) else (row,)))
        if row not in counts:
            raise ValueError(f"row_seeds {row}: not a row of this plan; expected the levels of "
                             f"{', '.join(levels)} in that order, among {', '.join(map(str, counts))}")
        if not isinstance(seeds, int) or seeds < 0:
            raise ValueError(f"row_seeds {row}: {seeds!r} is not allowed: expected an integer >= 0")
        counts[row] = seeds
    return counts


def _digest(identity):
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _check_size(study, settings, counts):
    """Refuse a plan of more than settings.max_trials trials before any of it is built, saying how
    many trials and GPUs it asked for."""
    if study.search is not None:
        count, asked = settings.samples or 0, f"--samples {settings.samples}"
    else:
        count, asked = sum(counts.values()), f"--seeds {settings.seeds}"
    if count > settings.max_trials:
        scale = run_options(study.dataset_at(settings.scale), settings.scale)
        per_trial = (settings.workers_per_trial or scale.workers) * (settings.gpus_per_worker or scale.gpus_per_worker)
        gpus = f" of {per_trial:g} GPU(s) each: {count * per_trial:,.0f} GPUs for a trial's time" if per_trial else ""
        raise ValueError(f"{asked}: the plan would hold {count:,} trials{gpus}, above --max-trials "
                         f"{settings.max_trials:,}; ask for fewer, or raise --max-trials if you mean it")


def plan_study(study, settings, check_data=True):
    """Resolve and validate every trial and option (and that the dataset is there, if check_data);
    raise ConfigError/ValueError/DatasetNotFoundError naming the problem."""
    for flag, value in (("--seeds", settings.seeds), ("--max-concurrent", settings.max_concurrent),
                        ("--samples", settings.samples), ("--num-cpus", settings.num_cpus)):
        if value is not None and value < 1:
            raise ValueError(f"argument {flag}: {value} is not allowed: expected an integer >= 1")
    if study.search is not None and (settings.seeds != 1 or settings.row_seeds):
        raise ValueError("--seeds: a search trains one seed per trial; repeat its best trials as a grid study")
    levels = factor_levels(study, settings.scale, settings.levels)
    findings = study_findings(study, settings.scale)
    counts = row_seed_counts(levels, settings)
    _check_size(study, settings, counts)
    if study.search is not None:
        trials = grid(study, settings.scale, [0], settings.levels, settings.overrides)
    else:
        trials = [Trial(trial_key(c, s), c, s, resolve(study, settings.scale, c, s, settings.overrides))
                  for c in combinations(levels) for s in range(counts[tuple(c.values())])]
    if not trials:
        raise ValueError("row_seeds: every row has 0 seeds, so there is no trial to run; ask for one or more")
    seeds = sorted({t.seed for t in trials})
    dataset = study.dataset_at(settings.scale)
    resources = {k: v for k, v in dict(workers=settings.workers_per_trial, gpus_per_worker=settings.gpus_per_worker,
                                       cpus_per_worker=settings.cpus_per_worker).items() if v is not None}
    options = run_options(dataset, settings.scale, data_dir=absolute(settings.data_dir), download=settings.download,
                          storage_path="", max_failures=settings.max_failures, **resources)
    for trial in trials:  # precision against device; the dataset's files are checked once below
        dataclasses.replace(options, download=True).validate(trial.config)
    if check_data and not options.download:
        first = trials[0].config
        check_data_dir(first.dataset, options.data_dir, seed=first.seed, image_size=first.image_size)
        skipped = [] if is_remote(options.data_dir) else data_check.check_data(first.dataset, options.data_dir, seed=first.seed,
                                        image_size=first.image_size, evaluation_split=first.evaluation_split,
                                        skip_unreadable=settings.skip_unreadable)
        options = dataclasses.replace(options, skip_files=tuple(skipped))
    if check_data:  # every trial's batch against the training images, counted once
        images = None
        for trial in trials:
            images = options.check_batch(trial.config, images)
    num_samples = 0
    if study.across is not None:
        study.factor(study.across)
    for name, level in (study.baseline or {}).items():
        if level not in study.factor(name).at(settings.scale):
            raise ConfigError(f"study {study.name}: baseline {name}={level} is not a level of {name}")
    if study.search is not None:
        num_samples = settings.samples or (study.search.smoke_samples if settings.scale == "smoke"
                                           else study.search.num_samples)
        if len(study.search.objectives) > 1 and study.search.early_stopping:
            raise ValueError(f"study {study.name}: early stopping (ASHA) ranks trials by one metric; "
                             "use one objective or early_stopping=False")
    storage = absolute(settings.storage_path)
    # What every trial shares (the scale, the study's fixed fields, --set), each factor's declared levels,
    # and the workers (with the batch per worker, they set the global batch); a search's choices too.
    varied = {k for f in study.factors for level in f.at(settings.scale).values() for k in level} | {"seed"}
    shared = {k: v for k, v in trials[0].config.to_dict().items() if k not in varied}
    asked = {"levels": levels, "samples": num_samples} if study.search is not None else {}
    identity = {"shared": shared, "factors": {f.name: f.at(settings.scale) for f in study.factors},
                "workers": options.workers, **asked}
    tune_name = f"tune-{_digest(asked or sorted(t.key for t in trials))}"
    plan = StudyPlan(study, settings.scale, seeds, levels, dict(settings.overrides), options, trials, storage,
                     f"{study.name}-{settings.scale}-{_digest(identity)}", tune_name, num_samples,
                     findings, settings.looks)
    plan.options = dataclasses.replace(options, storage_path=plan.trials_path)
    return plan
