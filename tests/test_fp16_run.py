"""precision='fp16' through the platform on a CPU (the GPU's path: autocast and the gradient scaler):
the worker loop trains, validates and checkpoints each epoch; a crash after the first epoch resumes
from the platform's checkpoint with the scaler's state and gives bitwise the straight run's model and
scaler; studies/evaluate.py scores the run under fp16 with finite figures."""
import json
import math
import os

import pytest
import torch

from nvae_platform.train.checkpoints import epoch_checkpoints
from nvae_platform.train.run import CHECKPOINT_FILE, run_training
from nvae_platform.train.scales import run_config, run_options
from studies.evaluate import main as evaluate

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:precision='fp16'")]


def _state(checkpoint):
    return torch.load(os.path.join(checkpoint, CHECKPOINT_FILE), map_location="cpu", weights_only=False)


def test_fp16_run_checkpoints_resumes_with_its_scaler_and_evaluates(local_ray, tmp_path):
    cfg = run_config("digits", "smoke", epochs=2, precision="fp16")
    common = dict(workers=1, storage_path=str(tmp_path / "runs"), iw_samples=2, max_test_images=64, sample_count=2)
    straight = run_training(cfg, run_options("digits", "smoke", name="straight", **common))
    crashed_options = run_options("digits", "smoke", name="crashed", debug_crash_after_epoch=0, max_failures=1,
                                  **common)
    crashed = run_training(cfg, crashed_options)
    for run in (straight, crashed):
        assert run.status == "finished", run.status
        assert [m["epoch"] for m in run.history] == [0, 1]
        assert all(math.isfinite(m["val_bpd"]) and math.isfinite(m["train_bpd"]) for m in run.history)
        assert 0 < run.metrics["test_bpd"] < 1

    first = _state(epoch_checkpoints(crashed_options.run_folder)[0].path)
    assert first["config"]["precision"] == "fp16"
    # the scaler's state after the first epoch is not its initial one (its count of steps without an
    # overflow, which doubles the scale at 2000), so a resume that lost it would differ below
    scaler = first["train_step"]["scaler"]
    assert scaler["_growth_tracker"] > 0 or scaler["scale"] != 2.0 ** 10, scaler
    ours, reference = _state(crashed.checkpoint_path), _state(straight.checkpoint_path)
    assert ours["train_step"]["scaler"] == reference["train_step"]["scaler"]
    assert ours["train_step"]["step"] == reference["train_step"]["step"]
    assert all(torch.equal(ours["model"][k], reference["model"][k]) for k in reference["model"])

    out = tmp_path / "evaluation"
    assert evaluate([crashed.checkpoint_path, "--out", str(out), "--iw-samples", "3", "--max-test-images", "32",
                     "--temperatures", "0.8", "--readjust-batches", "1", "--grid", "2"]) == 0
    metrics = json.loads((out / "evaluation_iw3.json").read_text())["metrics"]
    assert metrics["test_bpd_iw3"] > 0
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
