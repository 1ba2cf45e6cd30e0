"""One NVAE configuration trained by Ray Train's TorchTrainer on N workers, with recovery."""
import dataclasses
from dataclasses import dataclass, field

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from nvae_core import NVAEConfig
from nvae_core.paths import absolute
from nvae_platform.ray_cluster import init_ray
from nvae_platform.train.checkpoints import (
    CHECKPOINT_FILE,
    SAMPLES_FILE,
    checkpoint_uri,
    epoch_checkpoints,
    remove_staging_leftovers,
    storage_file_exists,
    storage_uri,
)
from nvae_platform.train.failures import clear_failure, read_failure, reason
from nvae_platform.train.resume import choose_resume
from nvae_platform.train.run_options import RunOptions
from nvae_platform.train.worker_loop import train_in_trial, train_loop_per_worker


@dataclass
class RunResult:
    status: str  # "finished", "diverged at step S", or "failed: <error>"
    metrics: dict  # the last report (final evaluation when finished)
    history: list = field(default_factory=list)  # one metrics dict per completed epoch, in order
    checkpoint_path: str = ""
    samples_path: str = ""


def prepare_run(cfg, options):
    """options, validated, for a new attempt at cfg's run: a deterministic failure an earlier attempt
    recorded is forgotten (this one tries again), checkpoints a killed process was staging are
    deleted, and the run resumes from its newest checkpoint that loads (resume.py)."""
    options.validate(cfg)
    clear_failure(options.run_folder)
    remove_staging_leftovers(options.run_folder)
    resume, set_aside = choose_resume(options.run_folder)
    return dataclasses.replace(options, resume_checkpoint=resume, set_aside_checkpoints=tuple(set_aside))


# Workers on GPUs: NCCL carries the CUDA tensors (DDP's gradients, synchronized BN's statistics) and
# Gloo the CPU ones (each epoch's metrics, the finite-loss vote, the RNG states). A process group of
# NCCL alone (Ray Train's default with GPUs) refuses CPU tensors.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def make_trainer(cfg, options, callbacks=()):
    """The TorchTrainer for cfg under options (not started; see prepare_run); callbacks are Ray Train
    UserCallbacks."""
    options = prepare_run(cfg, options)
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = options.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"nvae": cfg.to_dict(), "options": options.to_dict()},
        torch_config=TorchConfig(backend=GPU_BACKEND if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=options.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=options.name, storage_path=absolute(options.storage_path), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=options.checkpoints_to_keep or None),
            logging_config=ray.train.LoggingConfig(log_level=options.train_log_level)))


def summarize(result):
    """RunResult from a Ray Train Result: the status, the last metrics and the epoch history."""
    run_folder = storage_uri(result.path, result.filesystem) if result.path else ""
    # every epoch on storage, earlier invocations' included (Ray's own list holds this fit's only)
    history = epoch_checkpoints(run_folder) if run_folder else []
    checkpoint = checkpoint_uri(result.checkpoint) if result.checkpoint is not None else ""
    metrics = dict(result.metrics or {})
    if not metrics and history:  # nothing reported in this fit: it resumed after the last epoch's checkpoint
        metrics, checkpoint = dict(history[-1].metrics), history[-1].path
    metrics = _with_outcome(metrics, getattr(result, "return_value", None) or {})  # rank 0's return
    if result.error is not None:
        metrics["status"], metrics["traceback"] = _failure(result.error, run_folder)
    elif not str(metrics.get("status", "")).startswith(("finished", "diverged", "failed")):
        metrics["status"] = "failed: Ray Train ended before the last epoch without reporting an error"
    return _run_result(metrics, history, checkpoint)


def _with_outcome(metrics, outcome):
    """The last checkpoint's metrics, updated with how the loop ended when it diverged or failed (a
    report without a checkpoint: Ray keeps no metrics of it)."""
    if str(outcome.get("status", "")).startswith(("diverged", "failed")):
        return {**metrics, **outcome}
    return metrics




def run_training(cfg: NVAEConfig, options: RunOptions) -> RunResult:
    """Train cfg on a Ray cluster (a local one is started if none is running) and summarize."""
    trainer = make_trainer(cfg, options)
    if not ray.is_initialized():
        init_ray()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        return failed_run(error, options)
    return summarize(result)


def run_in_this_process(cfg, options, on_report):
    """Train cfg as one worker in this process (a study trial on a local Ray: no Train controller or
    worker actors to start), each epoch's metrics passed to on_report, and summarize as summarize
    does. Like a Train run, a failed attempt resumes from the newest checkpoint, up to
    options.max_failures times; an error a retry would meet again ends the run at once."""
    for attempt in range(options.max_failures + 1):
        try:
            outcome = train_in_trial(cfg, prepare_run(cfg, options), on_report)
            break
        except Exception as error:  # noqa: BLE001  as Ray Train does: any error ends the attempt
            if read_failure(options.run_folder) is not None or attempt == options.max_failures:
                status, traceback = _failure(error, options.run_folder)
                return _run_result({"status": status, "traceback": traceback},
                                   epoch_checkpoints(options.run_folder), "")
            print(f"[nvae] attempt {attempt + 1} failed ({reason(error)}); resuming from the newest checkpoint",
                  flush=True)
    history = epoch_checkpoints(options.run_folder)
    metrics = _with_outcome(dict(history[-1].metrics) if history else {}, outcome)
    return _run_result(metrics, history, history[-1].path if history else "")


def _run_result(metrics, history, checkpoint):
    """A RunResult from the last metrics, the run's EpochCheckpoints and its newest checkpoint's path."""
    samples = f"{checkpoint}/{SAMPLES_FILE}" if checkpoint else ""
    return RunResult(status=metrics.get("status", "failed"), metrics=metrics, history=[c.metrics for c in history],
                     checkpoint_path=checkpoint, samples_path=samples if samples and storage_file_exists(samples) else "")


def failed_run(error, options):
    """The RunResult of a Train run whose retries ran out."""
    status, traceback = _failure(error, options.run_folder)
    return RunResult(status=status, metrics={"traceback": traceback})


def _failure(error, run_folder):
    """(status, traceback) of a failed run: the deterministic failure its workers recorded, which
    says more than Ray's error, else Ray's error in one line."""
    failure = read_failure(run_folder) if run_folder else None
    if failure is not None:
        return failure["status"], failure["traceback"]
    return f"failed: {reason(error, run_folder)}", str(error)


__all__ = ["CHECKPOINT_FILE", "RunOptions", "RunResult", "failed_run", "make_trainer",
           "prepare_run", "run_in_this_process", "run_training", "summarize"]
