"""Which data a run used: the dataset's name, split sizes and a digest of its images, so that two runs
on different data are never compared silently (a re-extracted archive, another image folder, another
split seed of the sets split here all change the digest)."""
import hashlib
import os

import torch

from .datasets import ImageFiles, ImagesOnly, TensorImages


def _update(digest, dataset):
    if isinstance(dataset, TensorImages):  # digits, photo patches, MNIST, CIFAR-10: the pixels themselves
        digest.update(str(tuple(dataset.images.shape)).encode())
        digest.update(dataset.images.contiguous().view(torch.uint8).numpy().tobytes())
    elif isinstance(dataset, (ImageFiles, ImagesOnly)):  # image files: each one's name and size
        paths = dataset.paths if isinstance(dataset, ImageFiles) else [
            os.path.join(dataset.dataset.root, dataset.dataset.base_folder, "img_align_celeba", name)
            for name in dataset.dataset.filename]
        for path in paths:
            digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}\n".encode())
    else:
        raise TypeError(f"no digest for a {type(dataset).__name__}")


def dataset_lineage(name, splits, source):
    """{"name", "digest" (16 hex digits of SHA-256), "source", "splits": {split: images}} of a dataset
    given as {split: torch Dataset} (as load_dataset returns them); source says where it was read."""
    digest = hashlib.sha256(name.encode())
    for split, dataset in splits.items():
        digest.update(split.encode())
        _update(digest, dataset)
    return {"name": name, "digest": digest.hexdigest()[:16], "source": source,
            "splits": {split: len(dataset) for split, dataset in splits.items()}}
