"""A dataset in moto's S3 (a real S3 server on loopback): uploaded once by studies/download_data.py in
the layout every node reads, copied by a training run to its node's cache and recorded in its
lineage; an upload of new content of the same size within the same second makes a new copy (the
key holds the objects' ETags, not only their times)."""
import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from test_datasets import write_cifar10

from nvae_platform.train.data_cache import local_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bucket(s3_store, monkeypatch, tmp_path):
    """moto's S3 server reached through AWS_ENDPOINT_URL, and a node cache of this test's own."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    monkeypatch.setenv("NVAE_DATA_CACHE", str(tmp_path / "cache"))
    return s3_store.filesystem


def _put(filesystem, path, data):
    with filesystem.open_output_stream(path) as f:
        f.write(data)


def test_new_content_of_the_same_size_uploaded_within_a_second_makes_a_new_copy(bucket, tmp_path):
    for name in ("a.png", "b.png"):
        _put(bucket, f"nvae/photos/{name}", b"first")
    path, remote = local_data_dir("s3://nvae/photos", "image-folder", say=lambda line: None)
    _put(bucket, "nvae/photos/b.png", b"other")  # same size, and S3's Last-Modified has whole seconds
    new_path, new_remote = local_data_dir("s3://nvae/photos", "image-folder", say=lambda line: None)
    assert new_remote["digest"] != remote["digest"]
    assert open(os.path.join(new_path, "b.png"), "rb").read() == b"other"
    assert open(os.path.join(path, "b.png"), "rb").read() == b"first"  # the old copy is left whole


def test_a_run_trains_on_an_uploaded_dataset_copied_once_to_its_node_and_recorded(bucket, tmp_path, commands):
    (tmp_path / "local").mkdir()
    write_cifar10(tmp_path / "local", per_batch=8)
    env = dict(os.environ, PYTHONPATH=ROOT)
    upload = subprocess.run([sys.executable, os.path.join(ROOT, "studies", "download_data.py"), "cifar10",
                             "--local-dir", str(tmp_path / "local"), "--data-dir", "s3://nvae/data"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert upload.returncode == 0, upload.stderr
    assert "cifar10: uploaded to s3://nvae/data (7 files" in upload.stdout, upload.stdout
    train = commands.run(os.path.join(ROOT, "studies", "train.py"), ["--num-cpus", "2", "--dataset", "cifar10",
                                                                     "--data-dir", "s3://nvae/data", "--set", "epochs=1"],
                         cwd=tmp_path, env=env, timeout=600)  # forked from the tests' command server
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    said = [line for line in train.stdout.splitlines() if "s3://nvae/data" in line]
    assert sum("copying to this node's disk s3://nvae/data: 0/7 files" in line for line in said) == 1, said
    assert sum("copied s3://nvae/data: 7/7 files" in line for line in said) == 1, said
    copies = [name for name in os.listdir(tmp_path / "cache") if not name.endswith(".lock")]
    assert len(copies) == 1 and copies[0].startswith("cifar10-"), copies
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run, = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.source_type == "s3"
    assert json.loads(dataset.source) == {"path": "s3://nvae/data", "files_digest": copies[0].split("-", 1)[1]}
