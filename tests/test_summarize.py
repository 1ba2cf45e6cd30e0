"""summarize: a Ray Train Result read together with the run's checkpoints on storage.

A fit that reports nothing (no metrics, no error) is a real case: a driver killed after the last
epoch's checkpoint was committed, then run again, resumes past the last epoch. These build real
ray.train.Result objects over real run folders; the Ray Train runs themselves are in
test_training_run.py.
"""
import json

import pyarrow.fs
import ray.train

from nvae_platform.train.checkpoints import CHECKPOINT_PREFIX, METRICS_FILE
from nvae_platform.train.run import summarize


def _run_folder(tmp_path, statuses):
    """A run folder with one checkpoint per epoch, each with its metrics file."""
    run = tmp_path / "run"
    for epoch, status in enumerate(statuses):
        folder = run / f"{CHECKPOINT_PREFIX}2026-11-22_10-00-0{epoch}.000000"
        folder.mkdir(parents=True)
        (folder / METRICS_FILE).write_text(json.dumps({"epoch": epoch, "status": status, "val_bpd": 1.0 - epoch / 10}))
    return run


def _silent_fit(run):
    """The Result of a fit that reported nothing and raised nothing."""
    return ray.train.Result(metrics=None, checkpoint=None, error=None, path=str(run),
                            _storage_filesystem=pyarrow.fs.LocalFileSystem())


def test_a_fit_resumed_past_its_last_epoch_is_that_epochs_finished_run(tmp_path):
    run = _run_folder(tmp_path, ["running", "running", "finished"])
    result = summarize(_silent_fit(run))
    assert result.status == "finished"
    assert result.metrics["epoch"] == 2 and result.metrics["val_bpd"] == 0.8
    assert result.checkpoint_path.endswith("10-00-02.000000")
    assert [m["epoch"] for m in result.history] == [0, 1, 2]


def test_a_fit_that_stops_early_without_an_error_fails_with_a_reason(tmp_path):
    for statuses in (["running", "running"], []):
        result = summarize(_silent_fit(_run_folder(tmp_path / str(len(statuses)), statuses)))
        assert result.status == "failed: Ray Train ended before the last epoch without reporting an error"
