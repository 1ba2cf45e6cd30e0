"""compile='on': torch.compile of a tiny BN model with flows gives eager's loss and gradients on CPU;
compiled training steps equal eager ones after the weight-norm data init and under DDP with synchronized
BN on 2 gloo ranks; without a C++ compiler the setting is refused before any work, in one line naming
the fix; compile='auto' compiles on CUDA at the small and paper scales only.

Only the first test runs inductor (minutes of C++ kernel builds on 2 cores). The data-init and DDP
tests compile with backend="aot_eager": what can go wrong there is in capture, not in code generation
(dynamo's guards on the init state, the graph split at DDP's buckets and its gradient hooks, the
synchronized BN's autograd functions and collectives, AOTAutograd's compiled backward), and
aot_eager runs exactly that path, then the captured aten graphs eagerly, in seconds.
"""
import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_batch, tiny_config
from torch import nn

from nvae_core import NVAE, ConfigError, TrainStep, compiling, nvae_loss
from nvae_core.compiling import check_compile, compiler_found, maybe_compile, resolve_compile
from nvae_core.layers import Conv2d, synchronize_batchnorm
from nvae_core.regularization import SpectralRegularizer
from nvae_platform.train.run_options import RunOptions
from nvae_platform.train.scales import SCALES, run_options


def _loss_and_grads(model, core, x):
    torch.manual_seed(1)
    result = model(x)
    loss, _ = nvae_loss(result, core, 0, 10, SpectralRegularizer(core))
    grads = torch.autograd.grad(loss, [p for p in core.parameters() if p.requires_grad], allow_unused=True)
    return loss.detach(), grads


@pytest.mark.slow
@pytest.mark.skipif(compiler_found() is None, reason="torch.compile needs a C++ compiler on CPU "
                    "(none of $CXX, c++, g++, clang++): apt-get install g++")
def test_compiled_model_matches_eager_loss_and_gradients():
    """One training forward and backward of a BN+Swish model with both flows' cells, compiled and eager,
    on the same batch and noise: the loss within 1e-4 relative and every gradient within 1e-3 (fp32;
    inductor fuses and reorders reductions, so sums differ in the last bits and grow through 2 scales)."""
    torch._dynamo.reset()
    cfg = tiny_config(num_latent_scales=1, num_flows=1, flow_cell="affine", compile="on", channels_last=False)
    core = NVAE(cfg)
    x = tiny_batch(cfg)
    core(x)  # BN statistics start equal for both runs below
    state = {k: v.clone() for k, v in core.state_dict().items()}
    eager_loss, eager_grads = _loss_and_grads(core, core, x)
    core.load_state_dict(state)
    compiled = maybe_compile(core, cfg.compile, "cpu")
    assert compiled is not core
    # fallback_random: eager's randn, the same noise. Scalar C++ kernels (vec_isa_ok=False): half the
    # CPU seconds of the AVX512 ones; the lowering and fusion checked here are a GPU's too, the
    # vectorized C++ code is CPU-only and opt-in. (torch's own patch: pytest's monkeypatch, undone,
    # deletes a torch config entry.)
    with torch._inductor.config.patch({"fallback_random": True, "cpp.vec_isa_ok": False}):
        loss, grads = _loss_and_grads(compiled, core, x)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, eager_grads):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


def _steps(model, xs):
    """TrainStep on each batch of xs, the same noise each time: the losses, and the state after."""
    step = TrainStep(model, steps_per_epoch=len(xs))
    losses = []
    for i, x in enumerate(xs):
        torch.manual_seed(100 + i)
        losses.append(step(x)["loss"].item())
    return losses, {k: v.detach().clone() for k, v in step.core.state_dict().items()}


def _largest_change(after, before):
    """The largest change of any floating-point tensor, relative to its largest value before (floored at
    1e-2, the scale of the smallest weights: tensors near zero, e.g. BN biases of 1e-7, count absolutely)."""
    return max(((after[k].double() - before[k].double()).abs().max() / before[k].double().abs().max().clamp_min(1e-2)).item()
               for k in before if before[k].is_floating_point())


# Compiled against eager after a few Adamax steps: eager against itself on 1 and 2 threads (only
# the order of fp32 sums differs) already differs by up to 2.2e-4 (WN test's model, 3 steps), and
# compiled against eager by 1.9e-4 (WN) and 1.3e-4 (DDP), so 1e-3 is 5x that noise.
TOLERANCE = 1e-3


def test_compiled_steps_after_weight_norm_data_init_match_eager():
    """A WN+ELU model compiled before its first step: TrainStep's first call initializes the weight
    norms from that batch eagerly (on the uncompiled core), then the compiled model trains. Three steps
    give eager's losses within 1e-5 and its weights within TOLERANCE, and no convolution re-initializes."""
    torch._dynamo.reset()
    cfg = tiny_config(normalization="weight_norm", activation="elu", num_latent_scales=1, warmup_epochs=0.0)
    xs = [tiny_batch(cfg, seed=s) for s in range(3)]
    torch.manual_seed(0)
    eager = NVAE(cfg)
    compiled_core = copy.deepcopy(eager)
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    want_losses, want = _steps(eager, xs)
    losses, got = _steps(torch.compile(compiled_core, backend="aot_eager"), xs)
    convs = [m for m in compiled_core.modules() if isinstance(m, Conv2d) and m.data_init]
    assert convs and not any(m.init_pending for m in convs)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert _largest_change(got, want) < TOLERANCE < _largest_change(want, before) / 10  # steps moved the weights


WORLD = 2


def _ddp_worker(rank, port, out):
    """On each rank: the worker's wrapping (synchronized BN, DDP, then compile) of a tiny BN+Swish
    model, eager and compiled from the same weights, two TrainSteps on this rank's batches; writes the
    largest differences over both ranks. (Dynamo captures the model in one graph; DDP's own forward
    wrapper breaks twice, outside it.)"""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch._dynamo.reset()
        cfg = tiny_config(num_latent_scales=1, warmup_epochs=0.0)
        xs = [tiny_batch(cfg, seed=10 * rank + s) for s in range(2)]
        torch.manual_seed(0)
        core = NVAE(cfg)
        twin = copy.deepcopy(core)
        before = {k: v.clone() for k, v in core.state_dict().items()}
        want_losses, want = _steps(nn.parallel.DistributedDataParallel(synchronize_batchnorm(core)), xs)
        compiled = torch.compile(nn.parallel.DistributedDataParallel(synchronize_batchnorm(twin)), backend="aot_eager")
        losses, got = _steps(compiled, xs)
        worst = torch.tensor([_largest_change(got, want), max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses)),
                              _largest_change(want, before)], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(dict(zip(("state", "loss", "moved"), worst.tolist())), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_ddp_steps_match_eager_on_two_gloo_ranks(tmp_path):
    """Two TrainSteps of a BN+Swish model, wrapped as the worker wraps it (synchronized BN, DDP,
    compile) on 2 gloo ranks, equal the eager DDP steps from the same weights: the losses within 1e-5,
    every parameter and BN statistic within TOLERANCE (eager DDP against itself is bitwise equal)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    mp.spawn(_ddp_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    result = json.loads(out.read_text())
    assert result["loss"] < 1e-5 and result["state"] < TOLERANCE < result["moved"] / 10, result


def test_compile_on_without_a_compiler_is_refused(monkeypatch, tmp_path):
    """With no compiler on PATH, compile='on' raises a one-line ConfigError naming the fix; 'auto'
    and 'off' run eager; any other value is a bad config field."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"compile='on' needs a C\+\+ compiler.*apt-get install g\+\+") as info:
        check_compile("on")
    assert "\n" not in str(info.value)
    assert not resolve_compile("auto", "cuda") and not resolve_compile("auto", "cpu")
    check_compile("auto")
    with pytest.raises(ConfigError, match="compile='yes'"):
        tiny_config(compile="yes")


def test_auto_compiles_on_cuda_at_small_and_paper_scale_only(monkeypatch):
    """compile='auto' with a compiler: on for CUDA at the small and paper scales, eager at smoke scale
    and on CPU at every scale (and for RunOptions built without a scale); 'on' and 'off' ignore the scale."""
    monkeypatch.setattr(compiling, "compiler_found", lambda: "/usr/bin/g++")
    auto = {scale: run_options("cifar10", scale).auto_compiles for scale in SCALES}
    assert auto == {"smoke": False, "small": True, "paper": True}
    for scale, allowed in auto.items():
        assert resolve_compile("auto", "cuda", allowed) == (scale != "smoke")
        assert not resolve_compile("auto", "cpu", allowed)
        assert resolve_compile("on", "cpu", allowed) and not resolve_compile("off", "cuda", allowed)
    assert not RunOptions(gpus_per_worker=1.0).auto_compiles
