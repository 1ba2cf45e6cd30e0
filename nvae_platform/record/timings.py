"""How long earlier runs of a configuration took, read from the MLflow store: the seconds a study's
cost estimate starts from when the same model has run before on the same kind of device.

A run counts when it finished in one go (not resumed), with the same configuration except its seed
and epochs, the same options that change its time (workers, threads, evaluation), and a device of
the same kind (the CPU, or a GPU: the run's `nvae.device` tag names it).
"""
import os

from nvae_platform.record.store import StoreClient, sqlite_path, without_retries
from nvae_platform.record.tracking import STORE_ERRORS

# The run options whose values change how long a run takes (MLflow params run.<field>).
TIMED_OPTIONS = ("workers", "threads_per_worker", "iw_samples", "iw_max_batch", "eval_batch_size", "max_test_images",
                 "sample_count", "bn_readjust_batches", "loader_workers", "auto_compiles")
UNTIMED_FIELDS = ("seed", "epochs")  # a run of other epochs still measures the seconds per epoch
MAX_RUNS = 5  # the newest matching runs read


def _wanted(cfg, options):
    """The params (as MLflow stores them, strings) a matching run must have."""
    wanted = {k: str(v) for k, v in cfg.to_dict().items() if k not in UNTIMED_FIELDS}
    params = options.params()
    wanted.update({f"run.{k}": str(params[f"run.{k}"]) for k in TIMED_OPTIONS})
    return wanted


def earlier_timings(tracking_uri, cfg, options, on_gpu):
    """[{epochs, train_s, step_s, wall_s, device}] of up to MAX_RUNS earlier finished runs of cfg under
    options on a device of the kind asked (on_gpu), newest first; [] when the store holds none, does
    not exist yet (a SQLite file is never created here) or cannot be read (the study's own check of
    the store then says why)."""
    path = sqlite_path(tracking_uri)
    if path is not None and not os.path.exists(path):
        return []
    try:
        with without_retries():  # a server that is down answers at once
            return _read(StoreClient(tracking_uri), cfg, options, on_gpu)
    except STORE_ERRORS:
        return []


def _read(client, cfg, options, on_gpu):
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    wanted = _wanted(cfg, options)
    query = " and ".join(["tags.`nvae.status` = 'finished'", "metrics.start_epoch = 0"]
                         + [f"params.{k} = '{wanted[k]}'" for k in ("dataset", "num_channels_enc", "batch_size")])
    found = []
    for run in client.search_runs(experiments, query, max_results=1000, order_by=["attributes.start_time DESC"]):
        params, metrics, device = run.data.params, run.data.metrics, run.data.tags.get("nvae.device", "")
        if any(params.get(k) != v for k, v in wanted.items()) or (device != "cpu") != on_gpu or not device:
            continue
        if not all(k in metrics for k in ("training_hours", "step_seconds")) or run.info.end_time is None:
            continue
        found.append(dict(epochs=int(params["epochs"]), train_s=metrics["training_hours"] * 3600,
                          step_s=metrics["step_seconds"], wall_s=(run.info.end_time - run.info.start_time) / 1000,
                          device=device))
        if len(found) == MAX_RUNS:
            break
    return found
