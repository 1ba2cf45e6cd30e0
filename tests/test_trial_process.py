"""A one-worker run trained in this process, as a study trial on a local Ray trains: the same
checkpoints on storage as a Ray Train run, and the same recovery (no Ray started here)."""
import json
import os

import pytest
import torch

from nvae_platform.train.checkpoints import CHECKPOINT_FILE, METRICS_FILE, epoch_checkpoints
from nvae_platform.train.failures import FAILURE_FILE
from nvae_platform.train.run import run_in_this_process
from nvae_platform.train.scales import run_config, run_options
from nvae_platform.train.worker_session import TrialSession

EPOCHS = 3


def _options(storage, name, **overrides):
    return run_options("digits", "smoke", workers=1, storage_path=str(storage), name=name, **overrides)


def _final_model(result):
    return torch.load(os.path.join(result.checkpoint_path, CHECKPOINT_FILE), weights_only=False)["model"]


def _epoch_folder(tmp_path, epoch):
    folder = tmp_path / f"epoch{epoch}"
    folder.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(b"state")
    (folder / METRICS_FILE).write_text(json.dumps({"epoch": epoch}))
    return str(folder)


def test_a_trial_session_stores_checkpoints_as_ray_train_names_them_and_keeps_the_newest(tmp_path):
    reports = []
    session = TrialSession(_options(tmp_path / "runs", "run", checkpoints_to_keep=2), reports.append)
    for epoch in range(3):
        session.report({"epoch": epoch}, _epoch_folder(tmp_path, epoch))
    session.report({"status": "diverged at step 9"})  # no checkpoint: reported, nothing stored
    stored = epoch_checkpoints(str(tmp_path / "runs" / "run"))
    assert [c.epoch for c in stored] == [1, 2]  # epoch 0's folder deleted, as num_to_keep=2 does
    assert all(os.path.basename(c.path).startswith("checkpoint_") for c in stored)
    assert (tmp_path / "runs" / "run").is_dir() and len(os.listdir(tmp_path / "runs" / "run")) == 2
    assert reports == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}, {"status": "diverged at step 9"}]


@pytest.mark.slow
def test_a_crash_resumes_from_the_newest_checkpoint_with_bitwise_the_same_parameters(tmp_path):
    cfg = run_config("digits", "smoke", epochs=EPOCHS)
    straight = run_in_this_process(cfg, _options(tmp_path, "straight"), lambda metrics: None)
    reports = []
    crashed = run_in_this_process(cfg, _options(tmp_path, "crashed", debug_crash_after_epoch=0, max_failures=1),
                                  reports.append)
    assert straight.status == crashed.status == "finished"
    assert 0.0 < crashed.metrics["test_bpd"] < 1.0 and os.path.getsize(crashed.samples_path) > 0
    assert [m["epoch"] for m in crashed.history] == list(range(EPOCHS))  # each epoch once
    assert [m["start_epoch"] for m in crashed.history] == [0, 1, 1]  # epochs 1 and 2 by the resumed attempt
    assert [m["epoch"] for m in reports] == list(range(EPOCHS))
    ours, reference = _final_model(crashed), _final_model(straight)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_a_data_error_ends_the_run_after_one_attempt_with_its_reason(tmp_path):
    options = _options(tmp_path, "bad-data", max_failures=2, debug_data_error_at_step=50)  # 44 steps an epoch
    failed = run_in_this_process(run_config("digits", "smoke", epochs=2), options, lambda metrics: None)
    assert failed.status == "failed: BadDataError: fault injection: an unreadable batch at step 50"
    assert "BadDataError" in failed.metrics["traceback"]
    assert [m["epoch"] for m in failed.history] == [0]  # epoch 0 ended before step 50; its checkpoint stays
    assert os.path.exists(tmp_path / "bad-data" / FAILURE_FILE)

