"""Test-time measures: importance-weighted NLL, active units, prior samples; training determinism."""
import pytest
import torch
from conftest import tiny_batch, tiny_config
from torch import nn

from nvae_core import NVAE, TrainStep, active_unit_counts, active_units, importance_weighted_nll, sample_images
from nvae_core.cells import Cell
from nvae_core.distributions import Normal
from nvae_core.evaluation import active_unit_sums, counts_from_sums


@pytest.fixture(scope="module")
def model():
    """An untrained tiny NVAE whose BN running statistics have seen a few batches."""
    torch.manual_seed(0)
    m = NVAE(tiny_config())
    with torch.no_grad():
        for seed in range(3):
            m(tiny_batch(m.cfg, 8, seed=seed))
    m.eval()
    return m


def _single_sample_nll(model, x):
    with torch.no_grad():
        r = model(x)
    return r.recon_nll + r.log_q - r.log_p


def test_iw_nll_with_one_sample_is_single_sample_bound(model):
    """K=1: -(log p(x|z) + log p(z) - log q(z|x)) of one posterior sample under the same seed."""
    x = tiny_batch(model.cfg, 6, seed=11)
    model.train()  # the evaluation switches to eval mode (BN running statistics) and back
    try:
        torch.manual_seed(123)
        iw = importance_weighted_nll(model, x, num_samples=1)
        assert model.training
    finally:
        model.eval()
    torch.manual_seed(123)
    single = _single_sample_nll(model, x)
    assert iw.shape == (6,)
    assert torch.allclose(iw, single, rtol=1e-5, atol=1e-3)
    torch.manual_seed(124)  # a different sample: a different value (the check can fail)
    assert not torch.allclose(importance_weighted_nll(model, x, num_samples=1), single, rtol=1e-5, atol=1e-3)


def test_iw_nll_tightens_with_more_samples(model):
    """The mean IW bound over examples is lower with K=50 than with K=1 (by many standard errors)."""
    x = tiny_batch(model.cfg, 32, seed=12)
    torch.manual_seed(5)
    k1 = torch.stack([importance_weighted_nll(model, x, 1) for _ in range(2)]).mean(0)
    k50 = importance_weighted_nll(model, x, 50, max_batch=800)
    gap = (k1 - k50).double()
    # E[NLL_K] is non-increasing in K. With this untrained model the gap is 3-8 nats per example and
    # its mean over 32 examples was 7.5-15 standard errors above 0 for 6 model x 3 data/RNG seeds.
    std_err = gap.std() / gap.numel() ** 0.5
    assert gap.mean() > 3 * std_err, (gap.mean(), std_err)
    assert torch.isfinite(k50).all()


def _table_noise(monkeypatch, num_groups, rows, seed):
    """Make Normal.sample draw row r of a fixed noise table per group, whatever the chunking:
    each forward calls sample() once per group in order, so a counter identifies the group and a
    per-group offset advances through that group's rows."""
    g = torch.Generator().manual_seed(seed)
    tables, offsets, calls = {}, [0] * num_groups, [0]

    def sample(self, temperature=1.0):
        group = calls[0] % num_groups
        calls[0] += 1
        n = self.mu.shape[0]
        if group not in tables:
            tables[group] = torch.randn((rows,) + tuple(self.mu.shape[1:]), generator=g)
        noise = tables[group][offsets[group]: offsets[group] + n]
        offsets[group] += n
        assert noise.shape == self.mu.shape
        return self.mu + temperature * self.sigma * noise

    monkeypatch.setattr(Normal, "sample", sample)

    def reset():
        offsets[:] = [0] * num_groups
        calls[0] = 0
    return reset


def test_iw_nll_chunking_matches_one_big_chunk(model, monkeypatch):
    """Same K posterior samples split into chunks (3+3+1) give the one-chunk logsumexp result."""
    x = tiny_batch(model.cfg, 4, seed=13)
    k = 7
    reset = _table_noise(monkeypatch, model.cfg.num_groups, rows=k * 4, seed=3)
    whole = importance_weighted_nll(model, x, k, max_batch=k * 4)
    reset()
    chunked = importance_weighted_nll(model, x, k, max_batch=12)  # 3 samples per chunk
    reset()
    tiny_chunks = importance_weighted_nll(model, x, k, max_batch=1)  # fewer than the batch: 1 per chunk
    # Only float32 rounding differs (convs on different batch sizes): ~1e-6 of ~1200 nats.
    assert torch.allclose(chunked, whole, rtol=2e-6, atol=1e-3)
    assert torch.allclose(tiny_chunks, whole, rtol=2e-6, atol=1e-3)
    # The same K samples scored one by one: the IW value is -(logsumexp_k(-nll_k) - log K), which
    # lies strictly between the best and the mean single-sample bound (the weights differ).
    reset()
    singles = _single_sample_nll(model, x.repeat(k, 1, 1, 1)).view(k, 4).double()
    expected = -(torch.logsumexp(-singles, dim=0) - torch.log(torch.tensor(float(k), dtype=torch.float64)))
    assert torch.allclose(whole.double(), expected, rtol=0, atol=1e-3)
    assert (whole > singles.min(0).values + 1e-2).all()
    assert (whole < singles.mean(0) - 1e-2).all()


def test_iw_nll_identical_samples_give_the_single_value(model, monkeypatch):
    """When all K samples coincide (posterior means), the chunked IW NLL is that one value."""
    monkeypatch.setattr(Normal, "sample", lambda self, temperature=1.0: self.mu)
    x = tiny_batch(model.cfg, 3, seed=14)
    single = _single_sample_nll(model, x)
    for k, max_batch in [(1, 256), (5, 256), (5, 6), (10, 1)]:
        assert torch.allclose(importance_weighted_nll(model, x, k, max_batch), single, rtol=0, atol=1e-3), \
            (k, max_batch)


def test_active_units_counts(model):
    """One count per group in [0, units]; matches a hand count of posterior-mean variances."""
    x = tiny_batch(model.cfg, 16, seed=15)
    model.train()  # measured in eval mode, the mode restored afterwards
    try:
        torch.manual_seed(9)
        counts = active_units(model, [x[:8], x[8:]])
        assert model.training
    finally:
        model.eval()
    assert len(counts) == model.cfg.num_groups
    assert all(isinstance(c, int) for c in counts)
    torch.manual_seed(9)
    with torch.no_grad():
        first = model(x[:8]).posterior_means
        second = model(x[8:]).posterior_means
    for count, a, b in zip(counts, first, second):
        means = torch.cat([a, b]).double().flatten(1)
        assert 0 <= count <= means.shape[1]
        assert count == int((means.var(0, unbiased=False) > 0.01).sum())
    # Thresholds at the extremes: every unit varies by more than -1, none by more than 1e9.
    units = [a.flatten(1).shape[1] for a in first]
    assert active_units(model, [x], threshold=-1.0) == units
    assert active_units(model, [x], threshold=1e9) == [0] * len(units)



def test_both_active_unit_counts_come_from_one_pass_equal_to_hand_counts(model):
    """active_unit_counts runs the model once per batch and gives, from that one pass, the Burda count
    of posterior-mean variances and the authors' count of per-channel KL."""
    x = tiny_batch(model.cfg, 16, seed=16)
    calls = []
    hook = model.register_forward_hook(lambda module, args, out: calls.append(out))
    try:
        torch.manual_seed(10)
        units, channels = active_unit_counts(model, [x[:8], x[8:]], mean_threshold=0.01, kl_threshold=0.05)
    finally:
        hook.remove()
    assert len(calls) == 2
    for g, (count, kl_count) in enumerate(zip(units, channels)):
        means = torch.cat([c.posterior_means[g] for c in calls]).double().flatten(1)
        assert count == int((means.var(0, unbiased=False) > 0.01).sum())
        kl = torch.cat([c.kl_channels[g] for c in calls]).double().mean(0)
        assert kl_count == int((kl > 0.05).sum())

def _bn_state(model):
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
            for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("training", [False, True])
def test_sample_images_with_readjustment(model, training):
    """Finite images in [0, 1] of the data shape; BN statistics and train/eval mode are restored."""
    model.train(training)
    try:
        before = _bn_state(model)
        assert before
        torch.manual_seed(4)
        images = sample_images(model, 5, temperature=0.8, readjust_batches=3, readjust_batch_size=4)
        assert images.shape == (5, 3, 8, 8)
        assert torch.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1
        assert torch.allclose(images * 255, torch.round(images * 255), atol=1e-4)  # 8-bit grid
        assert model.training == training
        assert all(m.training == training for m in model.modules())
        after = _bn_state(model)
        for (m0, v0, n0, mom0), (m1, v1, n1, mom1) in zip(before, after):
            assert torch.equal(m0, m1) and torch.equal(v0, v1) and torch.equal(n0, n1) and mom0 == mom1
    finally:
        model.eval()


def test_sample_images_uses_readjusted_statistics(model):
    """With readjust_batches > 0 the samples use BN statistics averaged over the readjusting batches."""
    cell = next(m for m in model.postprocess.modules() if isinstance(m, Cell))
    bn = next(m for m in cell.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    trained = bn.running_mean.clone()
    seen = []

    def hook(module, inputs, output):  # readjusting passes: BN runs as a module, in training mode
        seen.append((module.training, inputs[0].mean(dim=(0, 2, 3)), module.running_mean.clone()))

    def cell_hook(module, inputs):  # the sampling pass folds BN into the convs: read its statistics here
        if not module.training:
            seen.append((bn.training, None, bn.running_mean.clone()))

    handles = [bn.register_forward_hook(hook), cell.register_forward_pre_hook(cell_hook)]
    try:
        sample_images(model, 2, readjust_batches=3)
    finally:
        for handle in handles:
            handle.remove()
    assert [training for training, _, _ in seen] == [True, True, True, False]  # 3 readjusting, 1 sampling
    # The sampling pass used the cumulative average of the readjusting batches' means ...
    batch_means = torch.stack([mean for _, mean, _ in seen[:3]])
    assert torch.allclose(seen[-1][2], batch_means.mean(0), atol=1e-5)
    assert not torch.allclose(seen[-1][2], trained)
    assert torch.equal(bn.running_mean, trained)  # ... and the trained statistics are back


def test_training_is_deterministic_under_a_seed():
    """Two models built and trained 2 steps under the same seed have bitwise equal parameters."""
    cfg = tiny_config()
    x = tiny_batch(cfg, 4, seed=16)
    states = []
    for _ in range(2):
        torch.manual_seed(42)
        m = NVAE(cfg)
        step = TrainStep(m, steps_per_epoch=10)
        for _ in range(2):
            stats = step(x)
        assert torch.isfinite(stats["loss"])
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    # Not vacuous: training moved the parameters away from a freshly built model's.
    torch.manual_seed(42)
    fresh = NVAE(cfg).state_dict()
    assert any(not torch.equal(fresh[k], states[0][k]) for k in fresh if fresh[k].is_floating_point())


@pytest.mark.parametrize("flows", [0, 1])
def test_repeats_is_the_pass_on_the_repeated_batch(flows):
    """forward(x, repeats=k) (one encoder pass, features repeated) equals forward on x repeated k
    times under the same seed: every output, with and without flows (which read the features)."""
    torch.manual_seed(0)
    model = NVAE(tiny_config(num_flows=flows)).eval()
    x = tiny_batch(model.cfg, 3, seed=5)
    with torch.no_grad():
        torch.manual_seed(11)
        repeated = model(x.repeat(4, 1, 1, 1))
        torch.manual_seed(11)
        shared = model(x, repeats=4)
    assert shared.output.shape == repeated.output.shape == (12, *repeated.output.shape[1:])
    for name in ("output", "recon_nll", "kl", "log_q", "log_p"):
        assert torch.allclose(getattr(shared, name), getattr(repeated, name), rtol=1e-5, atol=1e-4), name


def test_active_unit_sums_of_two_shards_add_up_to_the_whole_sets(model):
    """The sums behind both counts add over disjoint shards (what the training workers all-reduce):
    the same figures as one pass over the whole set."""
    x = tiny_batch(model.cfg, 16, seed=16)
    torch.manual_seed(10)
    whole = active_unit_sums(model, [x[:8], x[8:]])
    torch.manual_seed(10)  # the same posterior samples, drawn in the same order
    first, second = active_unit_sums(model, [x[:8]]), active_unit_sums(model, [x[8:]])
    added = [[a + b for a, b in zip(f, s)] for f, s in zip(first[:3], second[:3])] + [first[3] + second[3]]
    for got, want in zip(added[:3], whole[:3]):
        assert all(torch.allclose(g, w, rtol=1e-12, atol=0) for g, w in zip(got, want))
    assert added[3] == whole[3] == 16
    assert counts_from_sums(*added) == counts_from_sums(*whole)
