"""The paper's evaluation of a trained model on Ray: the importance-weighted test NLL over shards of
the evaluation split, the KL of each latent group and both active-unit counts, and sample grids at
several temperatures after BN readjustment. N actors each hold the model and the split and take
tasks as they come free; the figures are then written to a folder and, for a model found through its
MLflow run, logged back to that run.

A shard's figures are measured as a training worker measures its own (measures.py), with the
worker's seed cfg.seed + 7 shifted by the shard's index, so a K equal to the run's gives the run's
test bits/dim up to sampling noise.
"""
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass

import ray
import torch
from mlflow.entities import Metric
from ray.util import ActorPool
from torch.utils.data import DataLoader, Subset

from nvae_core import NVAE, NVAEConfig, bits_per_dim, sample_images
from nvae_platform.record.store import StoreClient
from nvae_platform.train.image_grid import save_grid
from nvae_platform.train.measures import evaluation_images, iw_nll_nats, kl_per_group, seeded, unit_counts

EVAL_SEED = 7  # the training workers evaluate with cfg.seed + 7
MIN_SHARDS = 20  # progress at least every 5%
SHARDS_PER_WORKER = 4


@dataclass
class EvaluationSettings:
    """What the evaluation measures, on which images, with which resources."""

    iw_samples: int = 1000  # K of the importance-weighted NLL, as in the paper
    max_test_images: int = 0  # 0: the whole evaluation split
    temperatures: tuple = (1.0, 0.8, 0.7, 0.6)
    readjust_batches: int = 500  # sampling batches that re-estimate BN statistics before each grid
    grid: int = 8  # a sample grid is grid x grid images
    data_dir: str = "data"
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    eval_batch_size: int = 64
    iw_max_batch: int = 256


@ray.remote
class _Evaluator:
    """One worker: the model in eval mode and the evaluation images, on its device."""

    def __init__(self, config, weights, settings):
        self.cfg, self.settings = NVAEConfig.from_dict(config), settings
        torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
        self.device = torch.device("cuda" if settings.gpus_per_worker > 0 else "cpu")
        self.model = NVAE(self.cfg)
        self.model.load_state_dict(weights)
        self.model.to(self.device).eval()
        self.images = evaluation_images(self.cfg, settings.data_dir, settings.max_test_images)

    def count(self):
        return len(self.images)

    def _loader(self, start, stop):
        return DataLoader(Subset(self.images, range(start, stop)), batch_size=self.settings.eval_batch_size)

    def iw_nll(self, start, stop, seed):
        nats = iw_nll_nats(self.model, self._loader(start, stop), self.cfg, self.device, self.settings.iw_samples,
                           self.settings.iw_max_batch, seed)
        return "iw", (nats, stop - start)

    def latents(self, seed):
        loader = self._loader(0, len(self.images))
        return "latents", {"kl": kl_per_group(self.model, loader, self.cfg, self.device, seed),
                           **unit_counts(self.model, loader, self.cfg, self.device, seed)}

    def samples(self, temperature, seed):
        with seeded(seed, self.device):
            images = sample_images(self.model, self.settings.grid ** 2, temperature, self.settings.readjust_batches)
        return "samples", (temperature, images.float().cpu())


def shard_bounds(count, workers):
    """(start, stop) of each shard of count images: more shards than workers, so progress shows."""
    shards = max(1, min(count, max(MIN_SHARDS, SHARDS_PER_WORKER * workers)))
    edges = [round(i * count / shards) for i in range(shards + 1)]
    return list(itertools.pairwise(edges))


def _time_left(elapsed, done, total):
    if done == 0:
        return "estimating the time left"
    seconds = elapsed / done * (total - done)
    return f"{seconds / 60:.1f} min left" if seconds >= 90 else f"{seconds:.0f} s left"


def evaluate(trained, settings, say=print):
    """The figures of trained (a TrainedModel) on the running Ray: ({metric: value}, {temperature:
    images}). say(line) reports progress as tasks finish."""
    cfg = trained.config
    weights = ray.put({k: v.cpu() for k, v in trained.model.state_dict().items()})
    actor = _Evaluator.options(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker)
    actors = [actor.remote(cfg.to_dict(), weights, settings) for _ in range(settings.workers)]
    count = ray.get(actors[0].count.remote())
    shards, seed = shard_bounds(count, settings.workers), cfg.seed + EVAL_SEED
    say(f"[evaluate] {cfg.dataset} {cfg.evaluation_split} split, {count} images, K = {settings.iw_samples}: "
        f"{len(shards)} shards on {settings.workers} worker(s)")
    pool = ActorPool(actors)
    pool.submit(lambda a, _: a.latents.remote(seed), None)
    for t in settings.temperatures:
        pool.submit(lambda a, t: a.samples.remote(t, cfg.seed), t)
    for i, (start, stop) in enumerate(shards):
        pool.submit(lambda a, shard: a.iw_nll.remote(*shard), (start, stop, seed + i))
    iw, grids, latents, began = [], {}, None, time.perf_counter()
    while pool.has_next():
        kind, value = pool.get_next_unordered()
        if kind == "iw":
            iw.append(value)
        elif kind == "samples":
            grids[value[0]] = value[1]
        else:
            latents = value
        say(f"[evaluate] IW NLL {len(iw)}/{len(shards)} shards, sample grids {len(grids)}/"
            f"{len(settings.temperatures)}, {_time_left(time.perf_counter() - began, len(iw), len(shards))}")
    for a in actors:
        ray.kill(a)
    nats = sum(mean * n for mean, n in iw) / count
    k = settings.iw_samples
    metrics = {f"test_bpd_iw{k}": bits_per_dim(nats, cfg.num_dims), f"test_nats_iw{k}": nats, "test_images": count,
               "test_kl": sum(latents["kl"]), **{f"test_kl_group_{i}": v for i, v in enumerate(latents["kl"])},
               **{f"test_{name}": v for name, v in latents.items() if name != "kl"}}
    return metrics, grids


def write_files(trained, settings, metrics, grids, folder):
    """samples_T<t>.png per temperature and evaluation_iw<K>.json (source, settings, metrics) in
    folder; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for t, images in grids.items():
        paths.append(os.path.join(folder, f"samples_T{t}.png"))
        save_grid(images, paths[-1], nrow=settings.grid)
    paths.append(os.path.join(folder, f"evaluation_iw{settings.iw_samples}.json"))
    about = {"checkpoint": trained.checkpoint, "run_id": trained.run_id, "epoch": trained.epoch,
             "dataset": trained.config.dataset, "split": trained.config.evaluation_split}
    with open(paths[-1], "w") as f:
        json.dump({"source": about, "settings": {**asdict(settings), "temperatures": list(settings.temperatures)},
                   "metrics": metrics}, f, indent=2)
    return paths


def record(run_id, tracking_uri, metrics, paths, step):
    """Log the metrics (at step, the checkpoint's epoch) and the files to the MLflow run."""
    client = StoreClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])
    for path in paths:
        client.log_artifact(run_id, path)
