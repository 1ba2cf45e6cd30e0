"""Data is checked on the driver before anything trains: unreadable images and unreadable pickles are
one error naming them; --skip-unreadable trains without the bad image files and records them."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nvae_core.data_check import BadDataError, check_data, unreadable_images
from nvae_core.datasets import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(path, good=6):
    """good PNGs, a file of random bytes named .png, and a PNG cut in half."""
    path.mkdir(exist_ok=True)
    for i in range(good):
        Image.fromarray(np.full((8, 8, 3), i * 30 % 256, np.uint8)).save(path / f"{i}.png")
    (path / "corrupt.png").write_bytes(os.urandom(300))
    whole = (path / "0.png").read_bytes()
    (path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return path


def test_unreadable_images_are_named_and_the_way_out_given(tmp_path):
    folder = _folder(tmp_path / "images")
    with pytest.raises(BadDataError) as error:
        check_data("image-folder", folder, image_size=8)
    message = str(error.value)
    assert "2 image file(s) cannot be read" in message and "corrupt.png" in message and "truncated.png" in message
    assert "--skip-unreadable" in message


def test_skipping_leaves_exactly_the_bad_files_out(tmp_path):
    folder = _folder(tmp_path / "images")
    skipped = check_data("image-folder", folder, image_size=8, skip_unreadable=True)
    assert [os.path.basename(p) for p in skipped] == ["corrupt.png", "truncated.png"]
    kept = [load_dataset("image-folder", s, folder, image_size=8, exclude=skipped) for s in ("train", "test")]
    assert sum(len(k) for k in kept) == 6
    for images in kept:
        for i in range(len(images)):
            assert images[i].shape == (3, 8, 8)


def test_many_files_are_checked_in_parallel_processes(tmp_path):
    folder = _folder(tmp_path / "images", good=600)
    bad = unreadable_images(sorted(folder.iterdir()), processes=2)
    assert sorted(os.path.basename(p) for p in bad) == ["corrupt.png", "truncated.png"]
    assert all(reason for reason in bad.values())


def _cifar(root, key=b"data"):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:  # bytes keys, as Python 2's pickles of the archive had them
            pickle.dump({key: np.zeros((4, 3072), np.uint8), b"labels": [0] * 4}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["x"] * 10}, f)
    return folder


@pytest.mark.slow
def test_a_pickled_set_in_the_wrong_format_is_refused_by_the_train_command_before_ray(tmp_path, commands):
    folder = _cifar(tmp_path)
    with pytest.raises(BadDataError, match="cannot be read"):
        check_data("cifar10", tmp_path)
    result = commands.run(os.path.join(ROOT, "studies/train.py"), ["--dataset", "cifar10", "--data-dir", str(tmp_path),
                                                                   "--num-cpus", "1"], cwd=ROOT, env=dict(os.environ))
    assert result.returncode == 2
    assert f"the train split in {folder} cannot be read (KeyError" in result.stderr
    assert "--download" in result.stderr and "Started a local Ray instance" not in result.stderr


@pytest.mark.slow
def test_the_train_command_refuses_bad_images_or_skips_them_and_records_which(tmp_path, commands):
    folder = _folder(tmp_path / "images", good=40)
    command = [sys.executable, "studies/train.py", "--dataset", "image-folder", "--data-dir", str(folder),
               "--set", "image_size=8", "--set", "epochs=1", "--set", "batch_size=8", "--num-cpus", "2",
               "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    refused = commands.run_argv(command, cwd=ROOT, env=dict(os.environ))
    assert refused.returncode == 2 and "corrupt.png" in refused.stderr and "--skip-unreadable" in refused.stderr
    assert "Started a local Ray instance" not in refused.stderr

    skipped = subprocess.run([*command, "--skip-unreadable"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert skipped.returncode == 0, skipped.stdout[-2000:] + skipped.stderr[-2000:]
    assert "2 unreadable image file(s) left out" in skipped.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.data.params["run.skipped_files"] == "2" and run.data.tags["nvae.status"] == "finished"
    listed = client.download_artifacts(run.info.run_id, "unreadable_files.txt", str(tmp_path))
    assert [os.path.basename(line) for line in open(listed).read().split()] == ["corrupt.png", "truncated.png"]
