"""Deterministic failures (bad data, bad config) end a run after one attempt with their reason and
traceback; a lost worker is still retried, and a rerun after a fix trains."""
import os

import pytest

from nvae_core.data_check import BadDataError
from nvae_platform.train.failures import (
    FAILURE_FILE,
    clear_failure,
    is_deterministic,
    read_failure,
    reason,
    storage_stopped,
    write_failure,
)
from nvae_platform.train.run import run_training
from nvae_platform.train.scales import run_config, run_options


def test_bad_data_and_config_are_deterministic_and_lost_peers_or_disks_are_not():
    assert is_deterministic(BadDataError("x")) and is_deterministic(OSError("image file is truncated (3 bytes)"))
    assert not is_deterministic(RuntimeError("Connection closed by peer"))
    assert not is_deterministic(OSError(28, "No space left on device"))


def test_a_failure_is_one_line_its_last_exception_and_a_full_disk_says_what_to_do():
    ray_text = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call "
                "last):\n  File \"x.py\", line 3, in f\n    g()\nValueError: first\n\nDuring handling...\n"
                "  File \"y.py\", line 9\nRuntimeError: the real one")
    assert reason(ray_text) == "RuntimeError: the real one"
    assert reason(KeyError("data")) == "KeyError: 'data'"
    full = reason(ray_text + "\nOSError: [Errno 28] Error writing bytes. Detail: No space left on device")
    assert full.startswith("the run's storage is full (OSError: [Errno 28]") and "run the same command" in full


def test_an_object_store_that_cannot_be_reached_is_one_line_naming_it_and_what_to_do(monkeypatch):
    """pyarrow's own text (25.0.1, libcurl) for a store whose port is closed, inside Ray's worker error."""
    refused = ("OSError: When getting information for key 'runs/r/checkpoint_2026-12-03_10-41-56.675053' in bucket "
               "'nvae': AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to "
               "server; Details: Failed to connect to 127.0.0.1 port 36971 after 0 ms: Could not connect to server")
    ray_text = f"Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback ...\n{refused}\n"
    line = reason(ray_text, "s3://nvae/runs/r")
    assert line == ("the run's storage s3://nvae/runs/r at 127.0.0.1:36971 cannot be reached (AWS Error "
                    "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to server); once it "
                    "answers, run the same command: it resumes from the newest checkpoint")
    assert reason(line) == line  # a study's view reads a trial's status through reason again
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")  # no address in the text: the user's endpoint
    assert reason(OSError(refused.split("; Details")[0].removeprefix("OSError: "))).startswith(
        "the run's storage at http://minio.example:9000 cannot be reached (AWS Error NETWORK_CONNECTION during ")
    full = reason("OSError: [Errno 28] Error writing bytes. Detail: No space left on device")
    assert reason(full) == full


def test_a_studys_folder_that_tune_cannot_reach_or_fill_is_one_line_and_other_errors_are_not_the_storages():
    """pyarrow's text when Tune, ending, lists the study's folder on a store that is down."""
    listing = OSError("When listing objects under key 'runs/s/tune-60e49e5c/' in bucket 'nvae': AWS Error "
                      "NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7, Could not connect to server; "
                      "Details: Failed to connect to 127.0.0.1 port 59325 after 0 ms: Could not connect to server")
    assert storage_stopped(listing, "s3://nvae/runs/s", "study") == (
        "the study's storage s3://nvae/runs/s at 127.0.0.1:59325 cannot be reached (AWS Error NETWORK_CONNECTION "
        "during ListObjectsV2 operation: curlCode: 7, Could not connect to server); once it answers, run the same "
        "command: it resumes from the newest checkpoint")
    assert storage_stopped(OSError(28, "No space left on device"), "/runs/s", "study").startswith(
        "the study's storage is full (OSError: [Errno 28] No space left on device)")
    assert storage_stopped(OSError(13, "Permission denied"), "s3://nvae/runs/s", "study") is None


def test_a_failure_is_written_read_and_cleared(tmp_path):
    try:
        raise BadDataError("unreadable.png")
    except BadDataError as error:
        write_failure(tmp_path / "run", error)
    record = read_failure(tmp_path / "run")
    assert record["status"] == "failed: BadDataError: unreadable.png" and "raise BadDataError" in record["traceback"]
    clear_failure(tmp_path / "run")
    assert read_failure(tmp_path / "run") is None and not (tmp_path / "run" / FAILURE_FILE).exists()


@pytest.mark.slow
def test_a_data_error_mid_epoch_ends_the_run_once_with_its_reason_and_a_rerun_trains(local_ray, tmp_path):
    cfg = run_config("digits", "smoke", epochs=2)
    options = run_options("digits", "smoke", workers=2, storage_path=str(tmp_path), name="bad-data",
                          max_failures=2, debug_data_error_at_step=30)
    failed = run_training(cfg, options)
    # Ray Train's own "failed: TrainingFailedError" would mean every retry ran into the error again
    assert failed.status == "failed: BadDataError: fault injection: an unreadable batch at step 30"
    assert "BadDataError" in failed.metrics["traceback"]
    assert [m["epoch"] for m in failed.history] == [0]  # epoch 0 ended before step 30; its checkpoint stays
    assert os.path.exists(tmp_path / "bad-data" / FAILURE_FILE)

    fixed = run_training(cfg, run_options("digits", "smoke", workers=2, storage_path=str(tmp_path), name="bad-data"))
    assert fixed.status == "finished" and [m["epoch"] for m in fixed.history] == [0, 1]
    assert not os.path.exists(tmp_path / "bad-data" / FAILURE_FILE)


@pytest.mark.slow
def test_with_no_retries_left_the_recorded_reason_still_names_the_failure(local_ray, tmp_path):
    options = run_options("digits", "smoke", workers=1, storage_path=str(tmp_path), name="no-retries",
                          max_failures=0, debug_data_error_at_step=3)
    failed = run_training(run_config("digits", "smoke", epochs=1), options)
    assert failed.status == "failed: BadDataError: fault injection: an unreadable batch at step 3"
    assert "BadDataError" in failed.metrics["traceback"]
