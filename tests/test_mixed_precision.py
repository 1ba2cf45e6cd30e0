"""The GPU's mixed-precision path (fp16 autocast + gradient scaler, and bf16) run on a CPU: train
steps for every normalization/activation/cell/flow kind, overflow skipping, the scaler through a
checkpoint, folded eval BN and the importance-weighted NLL under autocast."""
import io

import pytest
import torch
from conftest import tiny_batch, tiny_config

from nvae_core import NVAE, TrainStep, autocast, importance_weighted_nll, sample_images

pytestmark = pytest.mark.filterwarnings("ignore:precision='fp16'")

KINDS = [dict(normalization="batch_norm", activation="swish", encoder_cell="regular", decoder_cell="regular",
              flow_cell="shift", num_flows=1),
         dict(normalization="batch_norm", activation="elu", encoder_cell="separable", decoder_cell="separable",
              flow_cell="affine", num_flows=1),
         dict(normalization="weight_norm", activation="elu", encoder_cell="separable", decoder_cell="regular",
              flow_cell="affine", num_flows=1),
         dict(normalization="weight_norm", activation="elu", encoder_cell="regular", decoder_cell="separable",
              flow_cell="shift", num_flows=1)]


def _step(precision, **kind):
    cfg = tiny_config(precision=precision, **kind)
    return TrainStep(NVAE(cfg), steps_per_epoch=4, device="cpu"), cfg


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k['normalization']}-{k['activation']}-"
                         f"{k['encoder_cell']}-{k['flow_cell']}")
def test_mixed_precision_train_steps_are_finite(precision, kind):
    """Three steps under autocast: finite loss, finite fp32 parameters, the scaler on only for fp16."""
    step, cfg = _step(precision, **kind)
    x = tiny_batch(cfg)
    for _ in range(3):
        stats = step(x)
        assert torch.isfinite(stats["loss"])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in step.core.parameters())
    assert step.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert 1.0 <= step.scaler.get_scale() <= 1024.0


def test_overflowing_step_is_skipped_and_scale_halves():
    """A loss scale so large that the fp16 gradients overflow: the optimizer step is skipped (the
    parameters stay as they were) and the scale halves."""
    step, cfg = _step("fp16", **KINDS[0])
    x = tiny_batch(cfg)
    step(x)
    step.scaler.update(new_scale=2.0 ** 120)  # the scaled loss overflows in fp32's grads too
    before = [p.detach().clone() for p in step.core.parameters()]
    step(x)
    assert step.scaler.get_scale() == 2.0 ** 119
    assert all(torch.equal(a, p) for a, p in zip(before, step.core.parameters()))


def test_scaler_state_survives_a_checkpoint_and_resume_continues_with_it():
    """The scale after a few steps goes through torch.save/load; the resumed step continues with the
    same scale and the same parameters as the uninterrupted one."""
    step, cfg = _step("fp16", **KINDS[0])
    x = tiny_batch(cfg)
    for _ in range(3):
        step(x)
    buffer = io.BytesIO()
    torch.save({"model": step.core.state_dict(), "step": step.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed, _ = _step("fp16", **KINDS[0])
    resumed.core.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["step"])
    assert resumed.scaler.get_scale() == step.scaler.get_scale()
    assert resumed.scaler.state_dict() == step.scaler.state_dict()
    torch.manual_seed(5)
    step(x)
    torch.manual_seed(5)
    resumed(x)
    assert resumed.scaler.get_scale() == step.scaler.get_scale()
    for a, b in zip(step.core.parameters(), resumed.core.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_folded_eval_and_iw_nll_under_autocast_are_close_to_fp32(precision):
    """A BN model after two train steps, in eval mode (folded BN): the NELBO and the IW NLL under
    autocast are finite and within 2% of fp32 (half precision's ~3 significant digits, summed over
    many terms), and sampling with BN readjustment gives finite images."""
    step, cfg = _step("fp32", **KINDS[0])
    x = tiny_batch(cfg)
    for _ in range(2):
        step(x)
    model = step.core.eval()
    results = {}
    for p in ("fp32", precision):
        with torch.no_grad(), autocast(p, "cpu"):
            torch.manual_seed(3)
            nelbo = model(x).nelbo
            torch.manual_seed(3)
            iw = importance_weighted_nll(model, x, num_samples=4)
            torch.manual_seed(3)
            images = sample_images(model, 4, readjust_batches=1)
        assert torch.isfinite(nelbo).all() and torch.isfinite(iw).all() and torch.isfinite(images).all()
        results[p] = (nelbo.float(), iw.float())
    for a, b in zip(results["fp32"], results[precision]):
        torch.testing.assert_close(b, a, rtol=0.02, atol=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: precision='auto' is fp16 on CUDA")
def test_auto_precision_on_cuda_is_fp16_with_a_scaler():
    """On a GPU, 'auto' trains under fp16 autocast with the gradient scaler, and the loss is finite."""
    cfg = tiny_config(precision="auto")
    step = TrainStep(NVAE(cfg).cuda(), steps_per_epoch=4, device="cuda")
    assert step.precision == "fp16" and step.scaler.is_enabled()
    for _ in range(3):
        assert torch.isfinite(step(tiny_batch(cfg).cuda())["loss"])
