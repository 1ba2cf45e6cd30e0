"""A remote data dir copied once to each node (nvae_platform/train/data_cache.py), here from a file://
store (any URI pyarrow opens is read the same way; tests/test_s3_data.py reads moto's S3): the
copy is reused while the files are unchanged and made again when one changes, two processes of a
node copy once, and a copy cut short is never read as whole but resumed."""
import multiprocessing
import os
import re
import time

import pytest

from nvae_platform.train import data_cache
from nvae_platform.train.data_cache import DataCopyError, local_data_dir, remote_files, upload

CIFAR = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
         "batches.meta")


@pytest.fixture
def store(tmp_path):
    """A file:// data dir holding cifar10's files (their bytes are not read here): its URI and folder."""
    folder = tmp_path / "store"
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    for i, name in enumerate(CIFAR):
        (folder / "cifar-10-batches-py" / name).write_bytes(bytes([i]) * (1000 + i))
    return f"file://{folder}", folder


def _copy(uri, cache, lines=None):
    return local_data_dir(uri, "cifar10", say=(lines if lines is not None else []).append, cache_root=cache)


def test_the_copy_is_reused_while_the_files_are_unchanged_and_made_again_when_one_changes(store, tmp_path):
    uri, folder = store
    lines = []
    path, remote = _copy(uri, tmp_path / "cache", lines)
    assert remote["uri"] == uri and len(remote["digest"]) == 16
    assert sorted(os.listdir(os.path.join(path, "cifar-10-batches-py"))) == sorted(CIFAR)
    assert any("copied" in line and "7/7 files" in line for line in lines), lines
    again = []
    assert _copy(uri, tmp_path / "cache", again) == (path, remote) and again == []  # read from the cache
    changed = folder / "cifar-10-batches-py" / "test_batch"
    changed.write_bytes(b"new" * 334)  # a new upload: same name, new content and time
    os.utime(changed, ns=(time.time_ns() + 10**9,) * 2)
    new_path, new_remote = _copy(uri, tmp_path / "cache")
    assert new_remote["digest"] != remote["digest"] and new_path != path
    assert open(os.path.join(new_path, "cifar-10-batches-py", "test_batch"), "rb").read() == b"new" * 334


def _copy_slowly(uri, cache, results):
    real = data_cache._copy_file

    def slow(*args):
        time.sleep(0.3)
        return real(*args)

    data_cache._copy_file = slow
    lines = []
    path, _ = _copy(uri, cache, lines)
    results.put((path, lines))


def test_two_processes_of_a_node_copy_once(store, tmp_path):
    uri, _ = store
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_copy_slowly, args=(uri, tmp_path / "cache", results)) for _ in range(2)]
    for process in processes:
        process.start()
        time.sleep(0.2)  # the second arrives while the first copies
    found = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    lines = [line for _, said in found for line in said]
    assert len({path for path, _ in found}) == 1
    assert sum("copying to this node's disk" in line for line in lines) == 1, lines
    assert sum("waiting for another process" in line for line in lines) == 1, lines


def test_a_copy_cut_short_is_never_read_as_whole_and_the_next_one_resumes_it(store, tmp_path, monkeypatch):
    uri, _ = store
    real = data_cache._copy_file

    def fail_on_test_batch(filesystem, source, target, size, progress):
        if source.endswith("test_batch"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.with_name(target.name + ".part").write_bytes(b"half")  # a file cut short
            raise OSError("connection reset")
        return real(filesystem, source, target, size, progress)

    monkeypatch.setattr(data_cache, "_copy_file", fail_on_test_batch)
    with pytest.raises(DataCopyError, match=r"connection reset.*\b[0-6]/7 files are kept.*run the same command") as error:
        _copy(uri, tmp_path / "cache")
    kept = re.search(r"(\d)/7 files are kept", str(error.value)).group(1)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]  # no whole copy
    monkeypatch.setattr(data_cache, "_copy_file", real)
    lines = []
    path, _ = _copy(uri, tmp_path / "cache", lines)
    assert "resuming the copy" in lines[0] and f" {kept}/7 files" in lines[0], lines
    assert open(os.path.join(path, "cifar-10-batches-py", "test_batch"), "rb").read() == bytes([5]) * 1005
    assert not any(name.endswith(".part") for _, _, names in os.walk(path) for name in names)


@pytest.mark.parametrize("dataset, remove, said", [
    ("cifar10", "all", "holds nothing of dataset 'cifar10'"),
    ("cifar10", "test_batch", "holds no test_batch of dataset 'cifar10'"),
    ("image-folder", None, r"holds 0 image file\(s\)"),
])
def test_a_missing_or_empty_dataset_is_one_line_naming_the_upload(store, dataset, remove, said):
    uri, folder = store
    if remove == "all":
        uri += "/no-such-prefix"
    elif remove:
        (folder / "cifar-10-batches-py" / remove).unlink()
    with pytest.raises(ValueError, match=said) as error:
        remote_files(uri, dataset)
    assert f"--data-dir {uri}" in str(error.value) and "\n" not in str(error.value)
    assert "studies/download_data.py" in str(error.value)


def test_an_image_folder_uploads_to_a_file_uri_whose_folders_do_not_exist_yet(tmp_path):
    """file:// is a store too: its folders are made as the files go in (S3 needs none)."""
    for split, count in (("train", 3), ("test", 2)):
        (tmp_path / "images" / split).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "images" / split / f"{i}.png").write_bytes(b"png")
    (tmp_path / "images" / "top.png").write_bytes(b"png")
    files, size = upload("image-folder", tmp_path / "images", f"file://{tmp_path}/store/new/imgs")
    assert (files, size) == (6, 18)
    assert sorted(p.relative_to(tmp_path / "store/new/imgs").as_posix()
                  for p in (tmp_path / "store/new/imgs").rglob("*.png")) == [
        "test/0.png", "test/1.png", "top.png", "train/0.png", "train/1.png", "train/2.png"]
