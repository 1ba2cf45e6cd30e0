"""How one configuration is run: resources, storage, evaluation (not part of the model). No Ray here:
declaring a study or a scale builds these without starting anything."""
from dataclasses import asdict, dataclass

from nvae_core.compiling import check_compile
from nvae_core.datasets import TRAIN_IMAGES, check_data_folder, train_images
from nvae_core.paths import absolute
from nvae_core.training import check_precision
from nvae_platform.train.data_cache import check_data_dir, is_remote


@dataclass
class RunOptions:
    """How a configuration is run (resources, storage, evaluation); not part of the model."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    data_dir: str = "data"
    download: bool = False
    skip_files: tuple = ()  # image-folder files left out as unreadable (--skip-unreadable; data_check)
    resume_checkpoint: str = ""  # set by the driver (resume.py): where this invocation resumes, "" for none
    set_aside_checkpoints: tuple = ()  # set by the driver: damaged checkpoint folders it renamed
    storage_path: str = "runs"
    name: str = "nvae"
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    checkpoints_to_keep: int = 0  # 0 keeps every epoch's checkpoint
    iw_samples: int = 100  # K of the importance-weighted test NLL (1000 in the paper)
    iw_max_batch: int = 256
    eval_batch_size: int = 64
    max_test_images: int = 0  # 0 = the whole test split
    sample_count: int = 8
    sample_temperatures: tuple = (1.0, 0.8, 0.6)
    bn_readjust_batches: int = 0
    loader_workers: int = 0
    auto_compiles: bool = False  # compile='auto' compiles on CUDA (set by the small and paper scales)
    train_log_level: str = "WARNING"  # Ray Train's own console logs (its per-report INFO lines are noise here)
    # Fault injection, for tests of the recovery paths (-1 = off).
    debug_nan_at_step: int = -1  # the loss becomes NaN at this step
    debug_data_error_at_step: int = -1  # reading this step's batch raises a data error, on every attempt
    debug_kill_at_step: int = -1  # the last rank SIGKILLs itself at this step (first attempt only)
    debug_crash_after_epoch: int = -1  # the workers raise after this epoch's checkpoint (first attempt only)

    @property
    def run_folder(self):
        """<storage_path>/<name>, where the run's checkpoints go; a local path made absolute (Ray
        workers do not start in this directory)."""
        return f"{absolute(self.storage_path).rstrip('/')}/{self.name}"

    def validate(self, cfg):
        """Raise ValueError naming the bad option, before anything starts."""
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} is not allowed: expected an integer >= 1")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("gpus_per_worker must be >= 0 and cpus_per_worker > 0")
        if self.iw_samples < 1:
            raise ValueError(f"iw_samples={self.iw_samples} is not allowed: expected an integer >= 1")
        if self.max_failures < 0:
            raise ValueError(f"max_failures={self.max_failures} is not allowed: expected an integer >= 0 "
                             "(Ray's -1, unlimited, would retry a failure that repeats forever)")
        check_precision(cfg.precision, "cuda" if self.gpus_per_worker > 0 else "cpu")
        check_compile(cfg.compile)
        if not is_remote(self.data_dir):
            check_data_folder(cfg.dataset, self.data_dir)
        if not self.download:  # a missing dataset fails here, in seconds, not in every worker
            check_data_dir(cfg.dataset, self.data_dir, seed=cfg.seed, image_size=cfg.image_size)

    def check_batch(self, cfg, images=None):
        """Raise ValueError unless every worker gets at least one batch of cfg.batch_size from the
        training split (of `images` images; counted here when None). A worker's sampler gives it
        floor(images / workers) of them, and training drops the last partial batch."""
        if images is None and is_remote(self.data_dir) and cfg.dataset not in TRAIN_IMAGES:
            return None  # an image folder in a bucket is counted by each node once it has its copy
        if images is None:
            images = train_images(cfg.dataset, self.data_dir, seed=cfg.seed, image_size=cfg.image_size,
                                  exclude=self.skip_files)
        if cfg.batch_size * self.workers > images:
            raise ValueError(f"--set batch_size={cfg.batch_size} x {self.workers} worker(s) is more than the {images} "
                             f"training images of {cfg.dataset}, so no batch fits: lower it to at most "
                             f"{images // self.workers}")
        return images

    def params(self):
        """The options as MLflow params (run.<field>), without the run's name, storage and test hooks."""
        # skip_files: its count here, the names in an artifact; resume state: not part of what is trained
        skip = ("name", "storage_path", "skip_files", "resume_checkpoint", "set_aside_checkpoints")
        return {**{f"run.{k}": v for k, v in asdict(self).items() if k not in skip and "debug" not in k},
                "run.skipped_files": len(self.skip_files)}

    def to_dict(self):
        """Plain values, as a Ray Train loop config carries them."""
        return {**asdict(self), "sample_temperatures": list(self.sample_temperatures), "skip_files": list(self.skip_files),
                "set_aside_checkpoints": list(self.set_aside_checkpoints)}

    @classmethod
    def from_dict(cls, values):
        return cls(**{**values, "sample_temperatures": tuple(values["sample_temperatures"]),
                      "skip_files": tuple(values.get("skip_files", ())),
                      "set_aside_checkpoints": tuple(values.get("set_aside_checkpoints", ()))})
