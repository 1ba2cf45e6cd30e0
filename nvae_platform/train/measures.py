"""What a trained model measures on a loader's batches: single-sample NELBO, importance-weighted NLL,
active units and the KL of each latent group. The training workers take them over their ranks'
shards (torch.distributed sums them), the evaluate command over its shards. No Ray here.

Each measure draws its noise (dynamic binarization, posterior samples) from its seed and leaves the
caller's random state as it was: a recorded figure is recomputed exactly from its checkpoint (same
images, batches and seed), and evaluating does not change the course of training.
"""
import contextlib

import torch
import torch.distributed as dist
from torch.utils.data import Subset

from nvae_core import autocast, bits_per_dim, importance_weighted_nll
from nvae_core.datasets import Batches, load_dataset
from nvae_core.evaluation import active_unit_sums, counts_from_sums, eval_mode
from nvae_platform.train.data_cache import local_data_dir


@contextlib.contextmanager
def seeded(seed, device):
    """torch's random numbers (CPU, and a CUDA device's) drawn from seed; the caller's state restored after."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _tensors_summed_over_ranks(tensors):
    """The tensors (float64, flattened), each summed over every rank, in one all-reduce."""
    flat = torch.cat([t.double().cpu().flatten() for t in tensors])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    return list(flat.split([t.numel() for t in tensors]))


def _sum_over_ranks(values):
    """A list of floats, each summed over every rank."""
    return _tensors_summed_over_ranks([torch.tensor(values)])[0].tolist()


def mean_over_ranks(per_example, loader, prepare):
    """Mean of per_example(x) (a tensor with one value per image) over every rank's shard."""
    total = count = 0.0
    for x in loader:
        values = per_example(prepare(x))
        total, count = total + values.sum().item(), count + values.numel()
    total, count = _sum_over_ranks([total, count])
    return total / max(count, 1)


def nelbo_bpd(model, loader, cfg, device, seed):
    """Single-sample test NELBO in bits/dim over all ranks' shards (the per-epoch val_bpd)."""
    with torch.no_grad(), eval_mode(model), seeded(seed, device), autocast(cfg.precision, device):
        nats = mean_over_ranks(lambda x: model(x).nelbo, loader, Batches(cfg, device, seed))
    return bits_per_dim(nats, cfg.num_dims)


def iw_nll_nats(model, loader, cfg, device, num_samples, max_batch, seed):
    """Importance-weighted NLL from num_samples samples, in nats per image, over all ranks' shards."""
    with seeded(seed, device), autocast(cfg.precision, device):
        return mean_over_ranks(lambda x: importance_weighted_nll(model, x, num_samples, max_batch),
                               loader, Batches(cfg, device, seed))


def unit_counts(model, loader, cfg, device, seed):
    """Active units per latent group and in all, over every rank's shard, both ways: posterior-mean
    variance (Burda et al.; active_units*) and the authors' per-channel KL count (active_units_kl*)."""
    with seeded(seed, device), autocast(cfg.precision, device):
        prepare = Batches(cfg, device, seed)
        mean_sum, mean_sq, kl_sum, count = active_unit_sums(model, (prepare(x) for x in loader))
    groups = len(mean_sum)
    *sums, total = _tensors_summed_over_ranks([*mean_sum, *mean_sq, *kl_sum, torch.tensor([count])])
    units, channels = counts_from_sums(sums[:groups], sums[groups:2 * groups], sums[2 * groups:], total.item())
    return {"active_units": sum(units), **{f"active_units_group_{i}": u for i, u in enumerate(units)},
            "active_units_kl": sum(channels), **{f"active_units_kl_group_{i}": u for i, u in enumerate(channels)}}


def kl_per_group(model, loader, cfg, device, seed):
    """The KL term of each latent group (decoder order) in nats per image, mean over these batches."""
    total, count = torch.zeros(cfg.num_groups, dtype=torch.float64), 0
    with torch.no_grad(), eval_mode(model), seeded(seed, device), autocast(cfg.precision, device):
        prepare = Batches(cfg, device, seed)
        for x in loader:
            kl = model(prepare(x)).kl.double().cpu()
            total, count = total + kl.sum(0), count + kl.shape[0]
    return (total / max(count, 1)).tolist()


def final_figures(model, loader, cfg, device, options, seed):
    """Importance-weighted test bits/dim (options.iw_samples samples) and active units, over all
    ranks' shards."""
    nats = iw_nll_nats(model, loader, cfg, device, options.iw_samples, options.iw_max_batch, seed)
    return {"test_bpd": bits_per_dim(nats, cfg.num_dims), "test_nats": nats,
            **unit_counts(model, loader, cfg, device, seed)}


def evaluation_images(cfg, data_dir, max_images=0):
    """The images a run's test figures are over: the first max_images (0: all) of its dataset's
    evaluation split (cfg.evaluation_split), in order."""
    data_dir, _ = local_data_dir(data_dir, cfg.dataset)  # a remote data dir: this node's copy
    images = load_dataset(cfg.dataset, cfg.evaluation_split, data_dir, seed=cfg.seed, image_size=cfg.image_size)
    return Subset(images, range(min(len(images), max_images))) if max_images else images
