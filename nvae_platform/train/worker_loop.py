"""The training loop each Ray Train worker runs: one NVAE configuration, data-parallel.

It reads as its steps: set_up, restore, then per epoch train_epoch, validate and
report_and_checkpoint, and final_evaluation with the last epoch.

Per epoch every worker reports the same metrics (Ray keeps rank 0's) and rank 0 writes a checkpoint
(model, optimizer, scaler, step, epoch, every rank's RNG state, the config, and the epoch's metrics
beside it: see checkpoints.py). A restarted worker group resumes
from the latest checkpoint. A non-finite loss on any rank stops all ranks within the step with the
status "diverged at step S"; the last good checkpoint stays.
"""
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import ray.train
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from nvae_core import NVAE, NVAEConfig, TrainStep, bits_per_dim, sample_images
from nvae_core.compiling import maybe_compile
from nvae_core.datasets import Batches, load_dataset
from nvae_core.layers import synchronize_batchnorm
from nvae_core.lineage import dataset_lineage
from nvae_platform.machine import peak_memory_gb, reset_peak_memory
from nvae_platform.storage import open_storage
from nvae_platform.train import fault_injection
from nvae_platform.train.checkpoints import CHECKPOINT_FILE, METRICS_FILE, SAMPLES_FILE, staging_folder
from nvae_platform.train.data_cache import local_data_dir
from nvae_platform.train.failures import is_deterministic, read_failure, write_failure
from nvae_platform.train.image_grid import save_grid
from nvae_platform.train.measures import final_figures as _final_evaluation
from nvae_platform.train.measures import nelbo_bpd as _evaluate_nelbo
from nvae_platform.train.run_options import RunOptions
from nvae_platform.train.worker_session import RayTrainSession, TrialSession


def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_reduce(values, op=dist.ReduceOp.SUM):
    """Sum (or max) a list of floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def _replica_spread(model):
    """Largest difference across ranks of per-tensor fingerprints (sum, sum of squares) of the
    parameters and of the BN running statistics: both 0.0 when the replicas are in sync."""
    def fingerprint(tensors):
        return torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]).flatten()

    params = fingerprint([p.detach().cpu() for p in model.parameters()])
    stats = fingerprint([b.detach().cpu() for n, b in model.named_buffers() if "running_" in n] or [torch.zeros(1)])
    both = torch.cat([params, stats])
    high, low = both.clone(), both.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
    spread = high - low
    return spread[: params.numel()].max().item(), spread[params.numel():].max().item()


def _save_samples(model, cfg, path, options):
    rows = [sample_images(model, options.sample_count, t, options.bn_readjust_batches)
            for t in options.sample_temperatures]
    save_grid(torch.cat(rows), path, nrow=options.sample_count)


def _write_json(values, path):
    with open(path, "w") as f:
        json.dump(values, f)


def _checkpoint_state(model, step, epoch, cfg):
    _rank, world = _world()
    rng = [None] * world
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if world > 1:
        dist.all_gather_object(rng, state)
    else:
        rng = [state]
    return {"model": model.state_dict(), "train_step": step.state_dict(), "epoch": epoch, "rng": rng,
            "config": cfg.to_dict()}


def _checkpoint_at(path):
    filesystem, inner = open_storage(path)
    return ray.train.Checkpoint(inner, filesystem=filesystem)


def _restore(model, step, checkpoint):
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    step.load_state_dict(state["train_step"])
    rank, world = _world()
    if len(state["rng"]) == world:
        torch.set_rng_state(state["rng"][rank]["cpu"])
        if state["rng"][rank]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"][rank]["cuda"])
    return state["epoch"] + 1


def _report(session, metrics, run_folder, checkpoint_state=None, files=()):
    """Report from every rank; rank 0 attaches the checkpoint folder, staged in the run folder."""
    rank, _ = _world()
    if checkpoint_state is None or rank != 0:
        session.report(metrics)
        return
    with staging_folder(run_folder) as folder:
        # serialized first: torch.save's own file writer hides a full disk (ENOSPC) behind "unexpected pos"
        serialized = io.BytesIO()
        torch.save(checkpoint_state, serialized)
        with open(os.path.join(folder, CHECKPOINT_FILE), "wb") as f:
            f.write(serialized.getbuffer())
        del serialized
        for make in files:
            make(folder)
        session.report(metrics, folder)


@dataclass
class Worker:
    """What one worker holds through its run (set_up makes it; restore fills in model and start)."""

    cfg: NVAEConfig
    options: RunOptions
    rank: int
    world: int
    device: torch.device
    sampler: DistributedSampler
    loader: DataLoader
    test_loader: DataLoader
    model: nn.Module  # DistributedDataParallel around core when world > 1
    step: TrainStep
    session: object  # RayTrainSession or TrialSession (worker_session.py)
    start_epoch: int = 0
    nodes: str = ""  # the Ray nodes this attempt's workers run on
    lineage: dict = None  # rank 0: the data's name, split sizes and digest (nvae_core.lineage)

    @property
    def core(self):
        return self.step.core

    @property
    def resumed(self):
        return self.start_epoch > 0


def set_up(cfg, options, session):
    """Data loaders (this rank's shards), the model and its train step, on this worker's device."""
    rank, world = _world()
    device = session.device()
    reset_peak_memory(device)  # a study's trial process trains one trial after another
    torch.set_num_threads(options.threads_per_worker)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    data_dir, remote = local_data_dir(options.data_dir, cfg.dataset, say)  # a remote one: this node's copy
    common = dict(data_dir=data_dir, download=options.download, seed=cfg.seed, image_size=cfg.image_size,
                  exclude=options.skip_files)
    train_set = load_dataset(cfg.dataset, "train", **common)
    test_set = load_dataset(cfg.dataset, cfg.evaluation_split, **common)
    lineage = None
    if rank == 0:
        lineage = dataset_lineage(cfg.dataset, {"train": train_set, cfg.evaluation_split: test_set},
                                  source=remote["uri"] if remote else os.path.abspath(data_dir))
        if remote:
            lineage["files_digest"] = remote["digest"]
    if options.max_test_images:
        test_set = Subset(test_set, range(min(len(test_set), options.max_test_images)))
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=options.loader_workers, pin_memory=device.type == "cuda")
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world)),
                             batch_size=options.eval_batch_size, num_workers=options.loader_workers)
    if len(loader) == 0:
        raise ValueError(f"batch_size={cfg.batch_size} x {world} workers is more than the "
                         f"{len(train_set)} training images of {cfg.dataset}; lower the batch size")
    model = NVAE(cfg).to(device)
    step = TrainStep(model, steps_per_epoch=len(loader), device=device)
    return Worker(cfg, options, rank, world, device, sampler, loader, test_loader, model, step, session,
                  lineage=lineage)


def restore(w):
    """Resume from Ray's latest checkpoint of this fit, else from the one the driver chose, else
    initialize weight norm from data; then wrap the model for data parallelism and learn which nodes
    this attempt runs on."""
    checkpoint = w.session.latest_checkpoint()  # this fit's latest, after a restart of the worker group
    if checkpoint is None and w.options.resume_checkpoint:  # an earlier invocation's, chosen by the driver
        checkpoint = _checkpoint_at(w.options.resume_checkpoint)
    if checkpoint is not None:
        w.start_epoch = _restore(w.model, w.step, checkpoint)
        if w.rank == 0:  # after a lost worker or a rerun: the console says where training picks up
            say(f"[nvae] resuming at epoch {w.start_epoch + 1}/{w.cfg.epochs} from {checkpoint.path}")
    elif w.step.needs_data_init:  # every rank inits from its own batch; DDP then broadcasts rank 0's
        w.sampler.set_epoch(0)
        w.step.data_init(Batches(w.cfg, w.device, w.cfg.seed, train=True)(next(iter(w.loader))))
    if w.world > 1:
        w.model = nn.parallel.DistributedDataParallel(
            synchronize_batchnorm(w.model), device_ids=[w.device.index] if w.device.type == "cuda" else None)
    # after data init and DDP; compile='auto' compiles only where the scale's options allow it
    w.model = w.step.model = maybe_compile(w.model, w.cfg.compile, w.device, w.options.auto_compiles)
    nodes = [w.session.node()] * w.world
    if w.world > 1:
        dist.all_gather_object(nodes, nodes[0])
    w.nodes = ",".join(sorted(set(nodes)))


def _finite_everywhere(w, stats):
    """Whether this step's loss (and, outside fp16, gradient norm) is finite on every rank."""
    finite = math.isfinite(stats["loss"].item())
    if w.step.precision != "fp16":  # fp16's gradient scaler expects, and skips, overflowing steps
        finite = finite and math.isfinite(float(stats["grad_norm"]))
    return _all_reduce([0.0 if finite else 1.0], op=dist.ReduceOp.MAX)[0] == 0


GPU_SAMPLE_STEPS = 20  # steps between two readings of the GPU's utilization


def _cpu_seconds():
    times = os.times()
    return times.user + times.system


def _gpu_utilization(device):
    """The GPU's utilization in percent over the last sample period, or None where NVML cannot be read."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001  no bindings or no driver library (NVMLError is no RuntimeError): no reading
        return None


def train_epoch(w, epoch):
    """One pass over this rank's shard: the epoch's mean training metrics over all ranks, or, at the
    first non-finite step on any rank, the divergence outcome {"status": "diverged at step S", ...}."""
    cfg, step = w.cfg, w.step
    w.sampler.set_epoch(epoch)
    prepare = Batches(cfg, w.device, seed=cfg.seed * 100003 + epoch * 1009 + w.rank, train=True)
    sums = {"loss": 0.0, "nelbo": 0.0, "recon": 0.0, "kl": 0.0, "grad_norm": 0.0}
    kl_groups = torch.zeros(cfg.num_groups, dtype=torch.float64)
    steps, start, cpu_start, gpu = 0, time.perf_counter(), _cpu_seconds(), []
    for x in w.loader:
        stats = step(prepare(x), measure_grad_norm=True)
        if steps % GPU_SAMPLE_STEPS == 0 and w.device.type == "cuda":
            gpu.append(_gpu_utilization(w.device))
        fault_injection.poison_loss(w.options, step.step, stats)
        fault_injection.data_error(w.options, step.step)
        fault_injection.kill_worker(w.options, step.step, w.rank, w.world, w.resumed)
        if not _finite_everywhere(w, stats):
            return {"epoch": epoch, "step": step.step, "status": f"diverged at step {step.step}", "diverged": 1.0}
        for key in sums:
            sums[key] += float(stats[key])
        kl_groups += stats["kl_per_group"].double().cpu()
        steps += 1
    seconds = time.perf_counter() - start
    # Every rank reduces the same number of values: NaN where a rank has no GPU reading.
    system = [(_cpu_seconds() - cpu_start) / seconds, sum(gpu) / len(gpu) if gpu and None not in gpu else math.nan]
    reduced = _all_reduce([v / steps for v in sums.values()] + system + [steps * cfg.batch_size / seconds])
    metrics = {f"train_{k}": v / w.world for k, v in zip(sums, reduced)}
    # Worker means: CPU cores busy per worker process; GPU utilization in percent (NVML, as nvidia-smi).
    metrics.update({name: v / w.world for name, v in zip(("cpu_utilization", "gpu_utilization"),
                                                          reduced[len(sums):-1]) if math.isfinite(v)})
    metrics["train_bpd"] = bits_per_dim(metrics["train_nelbo"], cfg.num_dims)
    metrics.update({f"train_kl_group_{i}": v / steps for i, v in enumerate(kl_groups.tolist())})
    metrics.update(epoch=epoch, step=step.step, lr=stats["lr"], kl_coeff=stats["kl_coeff"],
                   images_per_s=reduced[-1], epoch_seconds=seconds, step_seconds=seconds / steps, status="running",
                   diverged=0.0)
    return metrics


def validate(w):
    """Validation bits/dim, and what describes the run: size, device, memory, replica agreement."""
    num_params = sum(p.numel() for p in w.core.parameters())
    device_name = torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else "cpu"
    param_spread, bn_spread = _replica_spread(w.core)
    return dict(val_bpd=_evaluate_nelbo(w.model, w.test_loader, w.cfg, w.device, seed=w.cfg.seed + 7),
                num_params=num_params, device=device_name, peak_memory_gb=peak_memory_gb(w.device),
                replica_param_spread=param_spread, replica_bn_spread=bn_spread,
                worker_nodes=len(w.nodes.split(",")), nodes=w.nodes, start_epoch=w.start_epoch,
                set_aside_checkpoints=",".join(w.options.set_aside_checkpoints), **_data_fields(w))


def _data_fields(w):
    """Rank 0's lineage of the data, as strings: MLflow records them as the run's dataset input."""
    if not w.lineage:
        return {}
    return {"data_name": w.lineage["name"], "data_digest": w.lineage["digest"],
            "data_source": w.lineage["source"], "data_splits": json.dumps(w.lineage["splits"]),
            **({"data_files_digest": w.lineage["files_digest"]} if "files_digest" in w.lineage else {})}


def final_evaluation(w):
    """The last epoch's test figures (importance-weighted bits/dim, active units), status finished."""
    return {**_final_evaluation(w.core, w.test_loader, w.cfg, w.device, w.options, seed=w.cfg.seed + 7),
            "status": "finished"}


def say(line):
    """A line on the worker's stdout, once. Not print: Ray Train replaces print in its workers with a
    call to its logger that also copies the line to stdout, and train.py's console showed it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def report_and_checkpoint(w, epoch, metrics, last):
    """Print the epoch (rank 0), report it with its checkpoint (and the sample grid after the last
    epoch), and wait until Ray has committed that checkpoint."""
    files = []
    if w.rank == 0:
        files.append(lambda folder: _write_json(metrics, os.path.join(folder, METRICS_FILE)))
        if last:
            files.append(lambda folder: _save_samples(w.core, w.cfg, os.path.join(folder, SAMPLES_FILE), w.options))
        shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in ("train_bpd", "val_bpd", "images_per_s") if k in metrics)
        tail = f"  test_bpd {metrics['test_bpd']:.4f}" if last else ""
        say(f"[nvae] epoch {epoch + 1}/{w.cfg.epochs}  {shown}{tail}")
    _report(w.session, metrics, w.options.run_folder, _checkpoint_state(w.core, w.step, epoch, w.cfg), files)
    w.session.wait_committed()


def train_loop_per_worker(config):
    """Ray Train entry point. config: {"nvae": NVAEConfig dict, "options": RunOptions dict}. A bad
    dataset or config ends the run as "failed: <reason>" after one attempt (see failures.py)."""
    cfg, options = NVAEConfig.from_dict(config["nvae"]), RunOptions.from_dict(config["options"])
    return run_worker(cfg, options, RayTrainSession())


def train_in_trial(cfg, options, on_report):
    """Train cfg as the only worker, in this process (a study trial's): checkpoints go straight to
    options.run_folder, each epoch's metrics to on_report. Returns how the loop ended."""
    return run_worker(cfg, options, TrialSession(options, on_report))


def run_worker(cfg, options, session):
    """The loop of one worker, reporting through session; an error a retry would meet again is
    recorded (failures.py) before it is raised, and the next attempt reports it without training."""
    failure = read_failure(options.run_folder)
    if failure is not None:  # an earlier attempt met a deterministic error: a retry would meet it again
        if _world()[0] == 0:
            say(f"[nvae] {failure['status']}; not retried (the same error would come back)")
        session.report({"status": failure["status"]})
        return failure
    try:
        return _train(cfg, options, session)
    except Exception as error:
        if is_deterministic(error):
            write_failure(options.run_folder, error)
        raise


def _train(cfg, options, session):
    w = set_up(cfg, options, session)
    restore(w)
    for epoch in range(w.start_epoch, cfg.epochs):
        metrics = train_epoch(w, epoch)
        if metrics["status"] != "running":  # diverged: every rank stops; the last good checkpoint stays
            if w.rank == 0:
                kept = "last good checkpoint kept" if epoch > 0 else "before its first checkpoint: none kept"
                say(f"[nvae] {metrics['status']} (epoch {epoch}); {kept}")
            _report(w.session, {**metrics, **_data_fields(w)}, w.options.run_folder)  # a run diverged in its first epoch still says what it read
            return metrics
        metrics.update(validate(w))
        last = epoch == cfg.epochs - 1
        if last:
            metrics.update(final_evaluation(w))
        report_and_checkpoint(w, epoch, metrics, last)
        fault_injection.crash_after_epoch(options, epoch, w.resumed)
    return {"status": "finished", "epoch": cfg.epochs - 1, "step": w.step.step}
