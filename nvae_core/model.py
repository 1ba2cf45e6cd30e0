"""The NVAE: a bottom-up encoder, a top-down hierarchy of latent groups, and the likelihood."""
from dataclasses import dataclass

import torch
from torch import nn

from .cells import Cell
from .distributions import (
    Normal,
    crop,
    likelihood,
    num_likelihood_params,
    reconstruction_nll,
    split_params,
    standard_normal_like,
)
from .flows import Flow
from .layers import ELU, Conv2d


@dataclass
class ForwardResult:
    """Per-example quantities of one pass over a batch (all float32)."""

    output: torch.Tensor  # the likelihood's parameters, B x P x H x W
    recon_nll: torch.Tensor  # -log p(x|z), (B,)
    kl: torch.Tensor  # per group, (B, G): analytic KL, or log q - log p of the sample with flows
    kl_channels: list  # per group, the KL summed over space per latent channel, B x L
    log_q: torch.Tensor  # log q(z|x) of the sampled z, all groups, (B,)
    log_p: torch.Tensor  # log p(z) of the sampled z, all groups, (B,)
    posterior_means: list  # per group, the mean of q(z_l | x, z_<l), B x L x h x w

    @property
    def nelbo(self):
        return self.recon_nll + self.kl.sum(dim=1)


class LatentGroup(nn.Module):
    """One step of the top-down pass: cells, prior, posterior, flows, and z merged into the state."""

    def __init__(self, cfg, c_enc, c_dec, first):
        super().__init__()
        latent = cfg.num_latent_per_group
        self.first = first
        self.latent = latent
        self.residual_normal = cfg.residual_normal
        self.cells = nn.Sequential(*[Cell(cfg.decoder_cell, c_dec, c_dec, 1, cfg)
                                     for _ in range(0 if first else cfg.num_cell_per_cond_dec)])
        if first:  # prior N(0, I); posterior from the top encoder features alone
            self.encoder_head = nn.Sequential(ELU(), Conv2d(c_enc, c_enc, 1), ELU())
        else:
            self.prior_head = nn.Sequential(ELU(), Conv2d(c_dec, 2 * latent, 1))
            self.decoder_to_encoder = Conv2d(c_dec, c_enc, 1)
        self.posterior_head = Conv2d(c_enc, 2 * latent, 3, padding=1)
        self.flows = nn.ModuleList(Flow(latent, c_enc, cfg.flow_cell) for _ in range(cfg.num_flows))
        self.merge = Conv2d(c_dec + latent, c_dec, 1)

    def _merge(self, s, z):
        return self.merge(torch.cat([s, z.to(s.dtype)], dim=1))

    def forward(self, s, encoder_feature):
        """Posterior pass; returns the new state and (kl, log_q, log_p, posterior mean)."""
        s = self.cells(s)
        if self.first:
            feature = self.encoder_head(encoder_feature)
            q = Normal(*split_params(self.posterior_head(feature)))
            prior = standard_normal_like(q.mu)
        else:
            mu_p, log_sigma_p = split_params(self.prior_head(s))
            prior = Normal(mu_p, log_sigma_p)
            feature = encoder_feature + self.decoder_to_encoder(s)
            d_mu, d_log_sigma = split_params(self.posterior_head(feature))
            q = Normal(mu_p + d_mu, log_sigma_p + d_log_sigma) if self.residual_normal else Normal(d_mu, d_log_sigma)
        z = q.sample()
        log_q = q.log_prob(z)
        for flow in self.flows:
            z, log_det = flow(z, feature)
            log_q = log_q - log_det
        log_p = prior.log_prob(z)
        kl = log_q - log_p if self.flows else q.kl(prior)
        stats = (kl.sum(dim=(2, 3)), log_q.flatten(1).sum(1), log_p.flatten(1).sum(1), q.mu)
        return self._merge(s, z), stats

    def sample(self, s, temperature):
        """Prior pass: z drawn from p(z_l | z_<l) at the given temperature."""
        s = self.cells(s)
        if self.first:
            prior = standard_normal_like(s.new_zeros(s.shape[0], self.latent, *s.shape[2:]))
        else:
            prior = Normal(*split_params(self.prior_head(s)))
        return self._merge(s, prior.sample(temperature))


class NVAE(nn.Module):
    """NVAE built from an NVAEConfig; forward(x) with x in [0, 1] gives a ForwardResult."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ce, cd, groups = cfg.num_channels_enc, cfg.num_channels_dec, cfg.groups_per_scale
        enc, dec = cfg.encoder_cell, cfg.decoder_cell

        self.stem = Conv2d(cfg.image_channels, ce, 3, padding=1)
        pre, mult = [], 1
        for _ in range(cfg.num_preprocess_blocks):
            for c in range(cfg.num_preprocess_cells):
                down = c == cfg.num_preprocess_cells - 1
                pre.append(Cell(enc, ce * mult, ce * mult * (2 if down else 1), 2 if down else 1, cfg, 3))
            mult *= 2
        self.preprocess = nn.Sequential(*pre)

        self.encoder_groups, self.encoder_down, enc_mults = nn.ModuleList(), nn.ModuleList(), []
        for scale, n in enumerate(groups):
            for _ in range(n):
                self.encoder_groups.append(nn.Sequential(
                    *[Cell(enc, ce * mult, ce * mult, 1, cfg) for _ in range(cfg.num_cell_per_cond_enc)]))
                enc_mults.append(mult)
            if scale < len(groups) - 1:
                self.encoder_down.append(Cell(enc, ce * mult, ce * mult * 2, 2, cfg))
                mult *= 2

        side = cfg.image_size // cfg.downsampling
        self.decoder_input = nn.Parameter(torch.rand(cd * mult, side, side))
        self.latent_groups, self.decoder_up = nn.ModuleList(), nn.ModuleList()
        for scale in reversed(range(len(groups))):
            for _ in range(groups[scale]):
                first = len(self.latent_groups) == 0
                self.latent_groups.append(LatentGroup(cfg, ce * mult, cd * mult, first))
            if scale > 0:
                self.decoder_up.append(Cell(dec, cd * mult, cd * mult // 2, -1, cfg))
                mult //= 2

        post = []
        for _ in range(cfg.num_postprocess_blocks):
            post.append(Cell(dec, cd * mult, cd * mult // 2, -1, cfg, 3))
            mult //= 2
            post += [Cell(dec, cd * mult, cd * mult, 1, cfg, 3) for _ in range(cfg.num_postprocess_cells - 1)]
        self.postprocess = nn.Sequential(*post)
        self.output_head = nn.Sequential(ELU(), Conv2d(cd, num_likelihood_params(cfg), 3, padding=1))
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def encode(self, x):
        """Bottom-up features saved for each group, encoder order (finest scale first)."""
        h = self.preprocess(self.stem(2.0 * x - 1.0))
        features, group = [], 0
        for scale, n in enumerate(self.cfg.groups_per_scale):
            for _ in range(n):
                h = self.encoder_groups[group](h)
                features.append(h)
                group += 1
            if scale < len(self.encoder_down):
                h = self.encoder_down[scale](h)
        return features

    def _top_down(self, batch, step):
        """Run the decoder, calling step(index, group, state) -> state for each latent group."""
        s = self.decoder_input.unsqueeze(0).expand(batch, -1, -1, -1)
        if self.cfg.channels_last:
            s = s.contiguous(memory_format=torch.channels_last)
        index, groups = 0, self.cfg.groups_per_scale
        for up, scale in enumerate(reversed(range(len(groups)))):
            for _ in range(groups[scale]):
                s = step(index, self.latent_groups[index], s)
                index += 1
            if scale > 0:
                s = self.decoder_up[up](s)
        return self.output_head(self.postprocess(s))

    def forward(self, x, repeats=1):
        """The posterior pass on x. With repeats > 1, the result for x.repeat(repeats, 1, 1, 1): the
        bottom-up pass, which draws no samples, runs once on x and its features are repeated, so
        importance sampling pays only the top-down pass per sample."""
        features = self.encode(x)
        if repeats > 1:
            layout = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
            features = [f.repeat(repeats, 1, 1, 1).contiguous(memory_format=layout) for f in features]
            x = x.repeat(repeats, 1, 1, 1)
        stats = []

        def posterior_step(index, group, s):
            s, group_stats = group(s, features[-1 - index])
            stats.append(group_stats)
            return s

        output = self._top_down(x.shape[0], posterior_step).float()
        kl_channels, log_q, log_p, means = zip(*stats)
        return ForwardResult(output=output, recon_nll=reconstruction_nll(self.cfg, output, x),
                             kl=torch.stack([k.sum(1) for k in kl_channels], dim=1),
                             kl_channels=list(kl_channels), log_q=torch.stack(log_q, 1).sum(1),
                             log_p=torch.stack(log_p, 1).sum(1), posterior_means=list(means))

    def sample(self, n, temperature=1.0):
        """n images drawn ancestrally from the prior (pixel probabilities for Bernoulli data)."""
        output = self._top_down(n, lambda index, group, s: group.sample(s, temperature)).float()
        dist = likelihood(self.cfg, output)
        images = dist.mean() if self.cfg.likelihood == "bernoulli" else dist.sample()
        return crop(images, self.cfg.likelihood_crop)

    def kl_size_factors(self):
        """Per group, decoder order: latent area of its scale / groups at that scale, min 1."""
        groups = self.cfg.groups_per_scale
        factors, coarsest = [], len(groups) - 1
        for scale in reversed(range(len(groups))):
            factors += [4.0 ** (coarsest - scale) / groups[scale]] * groups[scale]
        factors = torch.tensor(factors)
        return factors / factors.min()
