"""Synchronized batch norm over 2 real processes (gloo) equals one process on the concatenated batch.

One spawn of two workers runs every case and hands back, per case and quantity, the largest
difference either rank saw from a single-process computation in stock PyTorch (nn.BatchNorm2d's
forward, activation, upsampling, conv) over the concatenated batch. Ranks hold unequal batches.
"""
import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nvae_core.config import NVAEConfig
from nvae_core.layers import BatchNorm2d, NormActConv, synchronize_batchnorm

WORLD = 2
CFG = NVAEConfig(normalization="batch_norm", activation="swish")

# name: (module maker, per-rank batch sizes, BN momentum)
CASES = {
    "fused": (lambda: NormActConv(4, 6, 3, CFG), (3, 5), 0.05),
    "fused_upsample": (lambda: NormActConv(4, 6, 3, CFG, upsample=True), (2, 5), 0.05),
    "fused_depthwise_upsample_no_act": (
        lambda: NormActConv(4, 4, 5, CFG, groups=4, upsample=True, bias=False, weight_norm=False, activate=False),
        (4, 1), 0.05),
    "fused_cumulative": (lambda: NormActConv(4, 6, 3, CFG), (3, 5), None),
    "plain": (lambda: BatchNorm2d(4), (3, 5), 0.05),
    "plain_equal": (lambda: BatchNorm2d(4), (4, 4), 0.05),
    "plain_cumulative": (lambda: BatchNorm2d(4), (5, 2), None),
}


def _bn(m):
    return m if isinstance(m, BatchNorm2d) else m.bn


def _reference(m, x):
    """Stock PyTorch in one process: nn.BatchNorm2d's training forward, then act, upsample, conv."""
    if isinstance(m, BatchNorm2d):
        return m(x)
    a = m.bn(x)
    a = F.silu(a) if m.act == "swish" else a
    return m.conv(F.interpolate(a, scale_factor=2.0, mode="nearest") if m.upsample else a)


def _errors(make, sizes, momentum, steps=2):
    """Per quantity, the largest |synced - reference| on this rank over `steps` training steps."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    synced = make().double()
    _bn(synced).momentum = momentum
    reference = copy.deepcopy(synced)
    synchronize_batchnorm(synced)
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    errors = {}

    def note(name, got, want):
        errors[name] = max(errors.get(name, 0.0), (got - want).abs().max().item())

    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = (torch.randn(sum(sizes), 4, 5, 5, generator=g, dtype=torch.float64) * 3 + 2).requires_grad_()
        want = _reference(reference, x)
        upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
        (want * upstream).sum().backward()
        x_mine = x.detach()[mine].clone().requires_grad_()
        got = synced(x_mine)
        (got * upstream[mine]).sum().backward()
        note("output", got, want[mine])
        note("grad_x", x_mine.grad, x.grad[mine])
        for (name, p), q in zip(synced.named_parameters(), reference.parameters()):
            total = p.grad.clone()
            dist.all_reduce(total)  # each rank holds its share; DDP would reduce them
            note(f"grad_{name}", total, q.grad)
            p.grad, q.grad = None, None
    for (name, b), r in zip(synced.named_buffers(), reference.buffers()):
        if name.startswith("bn.") or isinstance(synced, BatchNorm2d):
            note(name, b.double(), r.double())
    return errors


def _large_mean_variance_errors():
    """Relative errors in float32 of the synced running variance, and of E[x^2] - E[x]^2, on data
    with mean 1e4 and std 1 (the first cumulative-average step sets running_var to the batch's)."""
    sizes, rank = (3, 5), dist.get_rank()
    x = torch.randn(sum(sizes), 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1e4
    exact = x.var(dim=(0, 2, 3))
    bn = synchronize_batchnorm(BatchNorm2d(4))
    bn.momentum = None
    start = sum(sizes[:rank])
    bn(x[start:start + sizes[rank]].float())
    xf = x.float()
    naive = ((xf * xf).mean((0, 2, 3)) - xf.mean((0, 2, 3)) ** 2) * xf[:, 0].numel() / (xf[:, 0].numel() - 1)
    return {"synced": ((bn.running_var.double() - exact) / exact).abs().max().item(),
            "naive": ((naive.double() - exact) / exact).abs().max().item()}


AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _autocast_errors(sizes=(3, 5)):
    """Per half precision, the largest |synced - one process| of the fused unit's output, input
    gradient and conv-weight gradient under CPU autocast, relative to the largest |one process|."""
    rank, errors = dist.get_rank(), {}
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    for name, dtype in AUTOCAST.items():
        torch.manual_seed(0)
        synced = NormActConv(4, 6, 3, CFG)
        reference = copy.deepcopy(synced)
        synchronize_batchnorm(synced)
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(sum(sizes), 4, 5, 5, generator=g) * 3 + 2).requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            want = _reference(reference, x)
        upstream = torch.randn(want.shape, generator=g)
        (want.float() * upstream).sum().backward()
        x_mine = x.detach()[mine].clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            got = synced(x_mine)
        (got.float() * upstream[mine]).sum().backward()
        weight_grad = synced.conv.weight.grad.clone()
        dist.all_reduce(weight_grad)
        for q, a, b in [("output", got, want[mine]), ("grad_x", x_mine.grad, x.grad[mine]),
                        ("grad_conv.weight", weight_grad, reference.conv.weight.grad)]:
            rel = ((a.float() - b.float()).abs().max() / b.float().abs().max()).reshape(1)
            dist.all_reduce(rel, op=dist.ReduceOp.MAX)
            errors[f"{name}_{q}"] = rel.item()
    return errors


def _saved_bytes(module, x):
    """Bytes autograd saves for backward in one forward pass of module on x."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total[0]


def _worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {name: _errors(*case) for name, case in CASES.items()}
        for errors in results.values():
            worst = torch.tensor(list(errors.values()), dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            errors.update(zip(errors, worst.tolist()))
        results["large_mean"] = _large_mean_variance_errors()
        results["autocast"] = _autocast_errors()
        torch.manual_seed(0)
        module = NormActConv(32, 32, 3, CFG, upsample=True, bias=False, weight_norm=False)
        x = torch.randn(4, 32, 16, 16)
        unsynced = _saved_bytes(module, x)
        synced = _saved_bytes(synchronize_batchnorm(module), x)
        results["saved_bytes"] = {"unsynced": unsynced, "synced": synced, "x": x.nbytes,
                                  "conv_weight": module.conv.weight.nbytes}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("sync_bn") / "results.json"
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_synced_equals_one_process_over_the_whole_batch(results, case):
    errors = results[case]
    expected = {"output", "grad_x", "grad_weight", "grad_bias", "running_mean", "running_var",
                "num_batches_tracked"} if case.startswith("plain") else {
        "output", "grad_x", "grad_bn.weight", "grad_bn.bias", "grad_conv.weight", "bn.running_mean",
        "bn.running_var", "bn.num_batches_tracked"}
    assert expected <= set(errors)
    assert all(v <= 1e-6 for v in errors.values()), errors


def test_variance_is_accurate_in_float32_for_a_large_mean(results):
    errors = results["large_mean"]
    assert errors["synced"] < 1e-3, errors
    assert errors["naive"] > 0.5, errors  # what E[x^2] - E[x]^2 in float32 would give


def test_synced_fused_unit_saves_no_activations(results):
    saved = results["saved_bytes"]
    assert saved["synced"] == saved["unsynced"], saved
    # x, the conv weight and four per-channel vectors (BN weight and bias, mean, 1/std): nothing else
    assert saved["synced"] == saved["x"] + saved["conv_weight"] + 4 * 32 * 4, saved


def test_synced_equals_one_process_under_autocast(results):
    """Under fp16 and bf16 autocast the synced fused unit (BN statistics in fp32, conv in half) equals
    one process within 4 units in the last place of the half type, relative to the largest value:
    the two sides round the same fp32 activations to half, and fp32 statistics that differ in their
    last bits flip at most a few of those roundings, each by one half-precision ulp."""
    errors = results["autocast"]
    for name, dtype in AUTOCAST.items():
        tolerance = 4 * torch.finfo(dtype).eps
        assert {k: v for k, v in errors.items() if k.startswith(name) and v > tolerance} == {}, (tolerance, errors)
