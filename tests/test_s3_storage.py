"""A run's storage on s3:// with a custom endpoint (AWS_ENDPOINT_URL, as MinIO or Ceph users set it),
on a real moto S3 server on loopback: failure.json, a damaged checkpoint set aside, and a store that
cannot be reached."""
import json

import pyarrow.fs
import pytest
import torch

from nvae_core.data_check import BadDataError
from nvae_platform.ray_internals import TRAIN_SNAPSHOT_FILE
from nvae_platform.train.checkpoints import read_state
from nvae_platform.train.failures import clear_failure, read_failure, write_failure
from nvae_platform.train.resume import choose_resume

RUN = "s3://nvae/runs/run"


@pytest.fixture
def bucket(s3_store, monkeypatch):
    """moto's S3 server as the run's store, reached through AWS_ENDPOINT_URL: its pyarrow filesystem."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    return s3_store.filesystem


def _files(filesystem, prefix):
    selector = pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return sorted(i.path[len(prefix) + 1:] for i in filesystem.get_file_info(selector)
                  if i.type == pyarrow.fs.FileType.File)


def _put(filesystem, path, data):
    with filesystem.open_output_stream(path) as f:
        f.write(data)


def test_a_failure_is_written_read_and_cleared_on_s3(bucket):
    try:
        raise BadDataError("unreadable.png")
    except BadDataError as error:
        write_failure(RUN, error)
    assert _files(bucket, "nvae/runs/run") == ["failure.json"]
    record = read_failure(RUN)
    assert record["status"] == "failed: BadDataError: unreadable.png" and "raise BadDataError" in record["traceback"]
    clear_failure(RUN)
    assert read_failure(RUN) is None and _files(bucket, "nvae/runs/run") == []


def test_a_checkpoint_cut_short_on_s3_is_set_aside_whole_and_the_run_resumes_before_it(bucket):
    """Epoch 2's upload ended before its state.pt: the folder moves to damaged_<name> with every
    object it had, and the run resumes from epoch 1's checkpoint; Ray Train's record is deleted."""
    names = [f"checkpoint_2026-01-01_10-00-0{epoch}.000000" for epoch in range(3)]
    for epoch, name in enumerate(names):
        folder = f"nvae/runs/run/{name}"
        _put(bucket, f"{folder}/metrics.json", json.dumps({"epoch": epoch, "train_bpd": 5.0}).encode())
        _put(bucket, f"{folder}/samples.png", b"png")
        if epoch < 2:
            buffer = pyarrow.BufferOutputStream()
            torch.save({"model": {"w": torch.full((3,), float(epoch))}, "epoch": epoch}, buffer)
            _put(bucket, f"{folder}/state.pt", buffer.getvalue())
    _put(bucket, f"nvae/runs/run/{TRAIN_SNAPSHOT_FILE}", b"{}")

    said = []
    resume, set_aside = choose_resume(RUN, say=said.append)
    assert resume == f"{RUN}/{names[1]}" and read_state(resume)["epoch"] == 1
    assert set_aside == [f"damaged_{names[2]}"]
    assert _files(bucket, f"nvae/runs/run/damaged_{names[2]}") == ["metrics.json", "samples.png"]
    assert _files(bucket, f"nvae/runs/run/{names[2]}") == []  # the old prefix is gone
    assert bucket.get_file_info(f"nvae/runs/run/{names[2]}").type == pyarrow.fs.FileType.NotFound
    assert bucket.get_file_info(f"nvae/runs/run/{TRAIN_SNAPSHOT_FILE}").type == pyarrow.fs.FileType.NotFound
    assert _files(bucket, f"nvae/runs/run/{names[1]}") == ["metrics.json", "samples.png", "state.pt"]
    assert said == [f"[nvae] checkpoint {names[2]} (epoch 3) is damaged (no state.pt); set aside as damaged_{names[2]}",
                    "[nvae] resuming from epoch 2, the newest checkpoint that loads"]
