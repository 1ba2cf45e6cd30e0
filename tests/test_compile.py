"""compile='on': torch.compile of a tiny BN model with flows gives eager's loss and gradients on CPU;
without a C++ compiler the setting is refused before any work, in one line naming the fix."""
import pytest
import torch
from conftest import tiny_batch, tiny_config

from nvae_core import NVAE, ConfigError, compiling, nvae_loss
from nvae_core.compiling import check_compile, compiler_found, maybe_compile, resolve_compile
from nvae_core.regularization import SpectralRegularizer
from nvae_platform.train.run_options import RunOptions
from nvae_platform.train.scales import SCALES, run_options


def _loss_and_grads(model, core, x):
    torch.manual_seed(1)
    result = model(x)
    loss, _ = nvae_loss(result, core, 0, 10, SpectralRegularizer(core))
    grads = torch.autograd.grad(loss, [p for p in core.parameters() if p.requires_grad], allow_unused=True)
    return loss.detach(), grads


@pytest.mark.skipif(compiler_found() is None, reason="torch.compile needs a C++ compiler on CPU "
                    "(none of $CXX, c++, g++, clang++): apt-get install g++")
def test_compiled_model_matches_eager_loss_and_gradients(monkeypatch):
    """One training forward and backward of a BN+Swish model with both flows' cells, compiled and eager,
    on the same batch and noise: the loss within 1e-4 relative and every gradient within 1e-3 (fp32;
    inductor fuses and reorders reductions, so sums differ in the last bits and grow through 2 scales)."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's randn, same noise
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
    loss, grads = _loss_and_grads(compiled, core, x)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, eager_grads):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


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
