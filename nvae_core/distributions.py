"""The latent Normal (soft-clamped, residual) and the two output likelihoods.

All maths here runs in float32 whatever the autocast precision of the network around it.
"""
import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
# Noise is drawn in the standard layout so a seed gives the same z with or without channels_last.
DENSE = torch.contiguous_format


def soft_clamp5(x):
    """5 * tanh(x / 5): the identity near 0, bounded by +-5."""
    return 5.0 * torch.tanh(x / 5.0)


class Normal:
    """Diagonal Normal with mu and log_sigma soft-clamped; sigma = exp(log_sigma) + 1e-2."""

    def __init__(self, mu, log_sigma):
        self.mu = soft_clamp5(mu.float())
        self.sigma = torch.exp(soft_clamp5(log_sigma.float())) + 1e-2

    def sample(self, temperature=1.0):
        return self.mu + temperature * self.sigma * torch.randn_like(self.mu, memory_format=DENSE)

    def log_prob(self, z):
        normalized = (z - self.mu) / self.sigma
        return -0.5 * normalized * normalized - 0.5 * LOG_2PI - torch.log(self.sigma)

    def kl(self, other):
        """Analytic KL(self || other) per dimension."""
        mean_term = (self.mu - other.mu) / other.sigma
        ratio = self.sigma / other.sigma
        return 0.5 * (mean_term * mean_term + ratio * ratio) - 0.5 - torch.log(ratio)


def standard_normal_like(t):
    """N(0, I) with t's shape; its log_sigma is 0 so sigma = 1 + 1e-2 as for every latent Normal."""
    return Normal(torch.zeros_like(t, dtype=torch.float32), torch.zeros_like(t, dtype=torch.float32))


def split_params(params):
    mu, log_sigma = params.float().chunk(2, dim=1)
    return mu, log_sigma


def crop(x, pixels):
    return x if pixels == 0 else x[:, :, pixels:-pixels, pixels:-pixels]


class Bernoulli:
    """Pixel-wise Bernoulli with logits, for binarized data."""

    num_params_per_channel = 1

    def __init__(self, params):
        self.logits = params.float()

    def log_prob(self, x):
        """log p(x) per pixel and channel, x in {0, 1}."""
        return -F.binary_cross_entropy_with_logits(self.logits, x, reduction="none")

    def mean(self):
        return torch.sigmoid(self.logits)

    def sample(self):
        return torch.bernoulli(self.mean())


class LogisticMixture:
    """Discretized mixture of logistics (PixelCNN++) with linear autoregression over channels.

    Parameter layout on the channel axis: M mixture logits, then per image channel M means and M
    log-scales, then M coefficients per channel pair (j < c): mean_c += coeff_cj * x_j.
    """

    def __init__(self, params, num_bits, num_channels, num_mixtures, top_bin="exact"):
        b, _, h, w = params.shape
        m, c = num_mixtures, num_channels
        params = params.float()
        self.logit_probs = params[:, :m]  # B M H W
        rest = params[:, m:]
        self.means = rest[:, : c * m].reshape(b, c, m, h, w)
        self.log_scales = rest[:, c * m: 2 * c * m].reshape(b, c, m, h, w).clamp_min(-7.0)
        self.coeffs = torch.tanh(rest[:, 2 * c * m:].reshape(b, c * (c - 1) // 2, m, h, w))
        self.num_channels = c
        self.max_val = 2.0 ** num_bits - 1
        # Where the top bin starts, in [-1, 1]: exactly above the second-highest level, or the
        # authors' 0.99, which at 8 bits also gives level 254 all the mass above 253.5 (not normalized).
        self.top_threshold = 0.99 if top_bin == "authors" else 1.0 - 1.0 / self.max_val

    @staticmethod
    def num_params(num_channels, num_mixtures):
        c = num_channels
        return num_mixtures * (1 + 2 * c + c * (c - 1) // 2)

    def _conditioned_means(self, x):
        """Means of each channel, shifted by the (true or sampled) values of earlier channels."""
        means, k = [], 0
        for c in range(self.num_channels):
            mean = self.means[:, c]
            for j in range(c):
                mean = mean + self.coeffs[:, k] * x[:, j: j + 1]
                k += 1
            means.append(mean)
        return torch.stack(means, dim=1)  # B C M H W

    def log_prob(self, x):
        """log p(x) per pixel (channels summed), x in [0, 1] on the grid of num_bits levels."""
        x = 2.0 * x.float() - 1.0
        centered = x.unsqueeze(2) - self._conditioned_means(x)
        inv_s = torch.exp(-self.log_scales)
        half_bin = 1.0 / self.max_val
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the lowest bin
        log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)): the highest bin
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in)
        # Where the bin mass underflows, use the density at the bin centre times the bin width.
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)),
                              log_pdf_mid - math.log(self.max_val / 2.0))
        xe = x.unsqueeze(2)
        lowest, highest = xe < -1.0 + half_bin, xe > self.top_threshold
        log_probs = torch.where(lowest, log_cdf_plus, torch.where(highest, log_one_minus_cdf_min, log_mid))
        return torch.logsumexp(log_probs.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1), dim=1)

    def _pick(self, t, one_hot):
        return (t * one_hot.unsqueeze(1)).sum(dim=2)  # B C H W

    def sample(self):
        """A sample in [0, 1] on the data grid."""
        u = torch.rand_like(self.logit_probs, memory_format=DENSE).clamp(1e-5, 1.0 - 1e-5)
        gumbel = -torch.log(-torch.log(u))
        one_hot = F.one_hot((self.logit_probs + gumbel).argmax(dim=1), self.logit_probs.shape[1])
        one_hot = one_hot.permute(0, 3, 1, 2).float()  # B M H W
        mu, log_s = self._pick(self.means, one_hot), self._pick(self.log_scales, one_hot)
        u = torch.rand_like(mu, memory_format=DENSE).clamp(1e-5, 1.0 - 1e-5)
        noise = torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
        return self._decode(mu, noise, one_hot)

    def mean(self):
        """The mode-free point estimate: the chosen components' means with no logistic noise."""
        one_hot = F.one_hot(self.logit_probs.argmax(dim=1), self.logit_probs.shape[1])
        one_hot = one_hot.permute(0, 3, 1, 2).float()
        return self._decode(self._pick(self.means, one_hot), 0.0, one_hot)

    def _decode(self, mu, noise, one_hot):
        x = mu + noise
        coeffs = self._pick(self.coeffs, one_hot) if self.num_channels > 1 else None
        out, k = [], 0
        for c in range(self.num_channels):
            value = x[:, c]
            for j in range(c):
                value = value + coeffs[:, k] * out[j]
                k += 1
            out.append(value.clamp(-1.0, 1.0))
        x = torch.stack(out, dim=1)
        return torch.round((x + 1.0) / 2.0 * self.max_val) / self.max_val


def likelihood(cfg, params):
    """The output distribution named by cfg.likelihood over the decoder's parameters."""
    if cfg.likelihood == "bernoulli":
        return Bernoulli(params)
    return LogisticMixture(params, cfg.num_x_bits, cfg.image_channels, cfg.num_mixtures, cfg.logistic_top_bin)


def num_likelihood_params(cfg):
    if cfg.likelihood == "bernoulli":
        return cfg.image_channels
    return LogisticMixture.num_params(cfg.image_channels, cfg.num_mixtures)


def reconstruction_nll(cfg, params, x):
    """-log p(x | z) per example, summed over the (cropped) pixels and channels."""
    dist = likelihood(cfg, crop(params, cfg.likelihood_crop))
    log_p = dist.log_prob(crop(x, cfg.likelihood_crop))
    return -log_p.flatten(1).sum(dim=1)
