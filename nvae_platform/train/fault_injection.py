"""Test-only fault injection for the recovery paths. Each hook does nothing unless its
RunOptions.debug_* field is set (>= 0), or, on the study driver, KILL_DRIVER_ENV is set; no study or
command sets them."""
import os
import signal


def poison_loss(options, step, stats):
    """debug_nan_at_step: the loss of that step becomes NaN (the divergence path)."""
    if options.debug_nan_at_step == step:
        stats["loss"] = stats["loss"] * float("nan")


def data_error(options, step):
    """debug_data_error_at_step: reading that step's batch fails on every attempt, as a bad file does."""
    if options.debug_data_error_at_step == step:
        from nvae_core.data_check import BadDataError

        raise BadDataError(f"fault injection: an unreadable batch at step {step}")


def kill_worker(options, step, rank, world, resumed):
    """debug_kill_at_step: the last rank SIGKILLs itself at that step, on the first attempt only
    (a lost worker: Ray Train restarts the group from the latest checkpoint)."""
    if options.debug_kill_at_step == step and rank == world - 1 and not resumed:
        os.kill(os.getpid(), signal.SIGKILL)


def crash_after_epoch(options, epoch, resumed):
    """debug_crash_after_epoch: every rank raises after that epoch's checkpoint, first attempt only."""
    if options.debug_crash_after_epoch == epoch and not resumed:
        raise RuntimeError(f"fault injection: crash after epoch {epoch}")


KILL_DRIVER_ENV = "NVAE_DEBUG_KILL_DRIVER_BEFORE_RECORDING"  # "TRIAL_KEY@EPOCH"


def kill_driver_before_recording(key, epoch):
    """$NVAE_DEBUG_KILL_DRIVER_BEFORE_RECORDING=KEY@EPOCH: the study driver SIGKILLs itself when that
    trial's epoch reaches it, after the checkpoint's commit and before MLflow records it."""
    if os.environ.get(KILL_DRIVER_ENV) == f"{key}@{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)
