"""Test-time measures: importance-weighted NLL, active latent units (two ways), and prior samples."""
import contextlib
import math
import warnings

import torch
from torch import nn

from .objective import bits_per_dim


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def importance_weighted_nll(model, x, num_samples, max_batch=256):
    """-log p(x) in nats per example, from num_samples importance samples of the posterior:
    -(logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K).

    Samples are drawn in chunks of at most max_batch images, so K = 1000 fits in memory; each chunk
    runs the encoder once on x and the decoder on all its samples (NVAE.forward's repeats).
    """
    batch = x.shape[0]
    per_chunk = max(1, max_batch // batch)
    total, done = None, 0
    with eval_mode(model):
        while done < num_samples:
            k = min(per_chunk, num_samples - done)
            result = model(x, repeats=k)
            log_w = (-result.recon_nll - result.log_q + result.log_p).view(k, batch)
            chunk = torch.logsumexp(log_w.double(), dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
            done += k
    return -(total - math.log(num_samples)).float()


def test_bits_per_dim(model, batches, num_samples, max_batch=256):
    """Mean importance-weighted NLL over batches of x, in bits/dim and in nats."""
    nats, count = 0.0, 0
    for x in batches:
        nll = importance_weighted_nll(model, x, num_samples, max_batch)
        nats += nll.sum().item()
        count += nll.numel()
    mean = nats / count
    return {"bpd": bits_per_dim(mean, model.cfg.num_dims), "nats": mean}


@torch.no_grad()
def active_unit_sums(model, batches):
    """What both active-unit counts need, from one pass over batches: per group, the sums over images
    of the posterior means and of their squares (per unit) and of the KL (per channel), as float64
    tensors, then the number of images. Sums over disjoint shards add up to the whole set's."""
    mean_sum = mean_sq = kl_sum = None
    count = 0
    with eval_mode(model):
        for x in batches:
            out = model(x)
            means = [m.double().flatten(1) for m in out.posterior_means]
            mean_sum = _plus(mean_sum, [m.sum(0) for m in means])
            mean_sq = _plus(mean_sq, [(m * m).sum(0) for m in means])
            kl_sum = _plus(kl_sum, [k.double().sum(0) for k in out.kl_channels])
            count += x.shape[0]
    return mean_sum, mean_sq, kl_sum, count


def counts_from_sums(mean_sum, mean_sq, kl_sum, count, mean_threshold=0.01, kl_threshold=0.1):
    """(active_units, active_units_kl) per group from active_unit_sums' sums."""
    units = [int(((s2 / count - (s / count) ** 2) > mean_threshold).sum()) for s, s2 in zip(mean_sum, mean_sq)]
    channels = [int((k / count > kl_threshold).sum()) for k in kl_sum]
    return units, channels


def active_unit_counts(model, batches, mean_threshold=0.01, kl_threshold=0.1):
    """(active_units, active_units_kl) per group, from one pass over batches."""
    return counts_from_sums(*active_unit_sums(model, batches), mean_threshold, kl_threshold)


def active_units(model, batches, threshold=0.01):
    """Per group, the number of latent units whose posterior mean has variance > threshold over x
    (Burda et al.); the means are those of q(z_l | x, z_<l) along one posterior sample."""
    return active_unit_counts(model, batches, mean_threshold=threshold)[0]


def active_units_kl(model, batches, threshold=0.1):
    """Per group, the authors' count of active latent channels: a channel is active when its KL,
    summed over space and averaged over the data, exceeds threshold."""
    return active_unit_counts(model, batches, kl_threshold=threshold)[1]


def _plus(totals, terms):
    """Running per-group sums: totals + terms, element by element (terms when there are none yet)."""
    return terms if totals is None else [a + b for a, b in zip(totals, terms)]


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def sample_images(model, n, temperature=1.0, readjust_batches=0, readjust_batch_size=None):
    """n prior samples at a temperature. With readjust_batches > 0, BN statistics are first
    re-estimated (cumulative average over that many sample batches); the model's own statistics
    are restored afterwards, and statistics that come out non-finite are never used."""
    bns, was_training = _batchnorms(model), model.training
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in bns]
    try:
        if readjust_batches > 0 and bns:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average
            model.train()
            for _ in range(readjust_batches):
                model.sample(readjust_batch_size or n, temperature)
            if not all(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
                       for m in bns):
                warnings.warn("BN readjustment gave non-finite statistics; sampling with the trained ones")
                _restore(bns, saved)
        model.eval()
        return model.sample(n, temperature)
    finally:
        _restore(bns, saved)
        model.train(was_training)


def _restore(bns, saved):
    for m, (mean, var, tracked, momentum) in zip(bns, saved):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(tracked)
        m.momentum = momentum
