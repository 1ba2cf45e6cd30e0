"""The training objective: KL warm-up, KL balancing, spectral and BN regularization; bits/dim."""
import math

import torch

from .regularization import batchnorm_regularization


def kl_coefficient(step, total_steps, cfg):
    """Held at cfg.kl_min_coeff for the first kl_const_portion of training, then rising linearly,
    reaching 1 kl_anneal_portion of training later (the authors' schedule); never below the minimum."""
    const_steps = cfg.kl_const_portion * total_steps
    anneal_steps = max(1.0, cfg.kl_anneal_portion * total_steps)
    return max(min((step - const_steps) / anneal_steps, 1.0), cfg.kl_min_coeff)


def sr_coefficient(kl_coeff, cfg):
    """lambda, annealed log-linearly from sr_lambda_init to sr_lambda with the KL coefficient."""
    if cfg.sr_lambda_init <= 0 or cfg.sr_lambda <= 0:
        return cfg.sr_lambda
    log_lambda = (1 - kl_coeff) * math.log(cfg.sr_lambda_init) + kl_coeff * math.log(cfg.sr_lambda)
    return math.exp(log_lambda)


def kl_balance_weights(kl, size_factors):
    """Per-group weights (G,), detached, averaging 1: proportional to the group's batch-mean KL
    (+0.01) and inversely proportional to its size factor."""
    weights = kl.detach().abs().mean(dim=0) + 0.01
    weights = weights / size_factors.to(kl.device)
    return weights / weights.mean()


def bits_per_dim(nats, num_dims):
    """Nats per example -> bits per dimension."""
    return nats / (num_dims * math.log(2.0))


def nvae_loss(result, model, step, total_steps, spectral=None):
    """The scalar to minimize and a dict of float statistics of the batch.

    result: the model's ForwardResult; spectral: a SpectralRegularizer of the model (needed when
    cfg.sr_lambda > 0).
    """
    cfg = model.cfg
    kl_coeff = kl_coefficient(step, total_steps, cfg)
    if cfg.kl_balance and kl_coeff < 1.0:
        weights = kl_balance_weights(result.kl, model.kl_size_factors())
    else:
        weights = torch.ones(result.kl.shape[1], device=result.kl.device)
    weighted_kl = (result.kl * weights).sum(dim=1)
    loss = (result.recon_nll + kl_coeff * weighted_kl).mean()
    lam = sr_coefficient(kl_coeff, cfg)
    sr = bn = torch.zeros((), device=loss.device)
    if lam > 0:
        sr = spectral()
        bn = batchnorm_regularization(model).to(loss.device)
        loss = loss + lam * (sr + bn)
    return loss, {"kl_coeff": kl_coeff, "sr_lambda": lam, "spectral_reg": sr.detach(),
                  "bn_reg": bn.detach(), "kl_weights": weights.detach()}
