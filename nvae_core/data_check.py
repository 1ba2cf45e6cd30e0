"""The data is opened on the driver before anything trains: a bad file is one error naming it, found in
seconds, instead of a worker's traceback mid-epoch (a day-long run lost at any hour, then retried).

Image files (image-folder, CelebA): every file's header is read and its structure verified (a PNG's
every chunk checksum; a JPEG's end-of-image marker), in parallel processes. Pickled and IDX sets (CIFAR-10,
MNIST): the real loader opens each split and decodes one batch.
"""
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from .datasets import _ON_DISK, _image_paths, load_dataset
from .paths import absolute

CHECK_BATCH = 16  # images decoded from each split of a pickled or IDX set
PARALLEL_FROM = 500  # fewer files are checked in this process: starting workers costs more


class BadDataError(ValueError):
    """Dataset files exist but cannot be read; the message names them and the way out."""


JPEG_END = b"\xff\xd9"  # the end-of-image marker; a JPEG cut short has none near its end
JPEG_TAIL = 1024  # bytes searched for it (some writers append a little after it)


def _verify(path):
    """None if the image's header parses and its structure verifies, else the reason. PIL's verify
    checks a PNG's every chunk; for a JPEG it checks nothing more than the header and costs 5x the
    header, so a JPEG is checked for its end-of-image marker instead (which catches a truncated file)."""
    try:
        with Image.open(path) as image:
            if image.format != "JPEG":
                image.verify()
                return None
            image.fp.seek(0, os.SEEK_END)
            image.fp.seek(max(0, image.fp.tell() - JPEG_TAIL))
            if JPEG_END not in image.fp.read():
                return "truncated JPEG: no end-of-image marker"
        return None
    except Exception as error:  # noqa: BLE001  whatever PIL raises, the file cannot be trained on
        return f"{type(error).__name__}: {error}"


def unreadable_images(paths, processes=None):
    """{path: reason} of the image files that cannot be read, checked in parallel processes."""
    paths = [str(p) for p in paths]
    if len(paths) < PARALLEL_FROM:
        reasons = map(_verify, paths)
    else:
        with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
            reasons = list(pool.map(_verify, paths, chunksize=256))
    return {path: reason for path, reason in zip(paths, reasons) if reason is not None}


def _image_files(name, root):
    if name == "image-folder":
        return _image_paths(root)
    return _image_paths(Path(root) / _ON_DISK["celeba64"][0] / "img_align_celeba")


def check_data(name, data_dir="data", seed=0, image_size=None, evaluation_split="test", skip_unreadable=False):
    """Open the dataset as training will; raise BadDataError naming what cannot be read. With
    skip_unreadable (image-folder only) return the unreadable files instead, sorted, for load_dataset's
    `exclude`. The files must exist (datasets.check_available); the sets in memory need no check."""
    root = absolute(data_dir)
    if name in ("image-folder", "celeba64"):
        bad = unreadable_images(_image_files(name, root))
        if bad and not (skip_unreadable and name == "image-folder"):
            shown = "; ".join(f"{path} ({reason[:120]})" for path, reason in sorted(bad.items())[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            fix = ("replace or delete it, or add --skip-unreadable to train without such files"
                   if name == "image-folder" else "replace it from the original img_align_celeba.zip")
            raise BadDataError(f"dataset {name!r}: {len(bad)} image file(s) cannot be read: {shown}{more}; {fix}")
        return sorted(bad)
    if name in ("mnist", "cifar10"):
        for split in ("train", evaluation_split):
            try:
                images = load_dataset(name, split, root, seed=seed, image_size=image_size)
                torch.stack([images[i] for i in range(min(CHECK_BATCH, len(images)))])
            except Exception as error:  # any failure to load is the files' fault here
                folder = Path(root) / _ON_DISK[name][0]
                raise BadDataError(
                    f"dataset {name!r}: the {split} split in {folder} cannot be read ({type(error).__name__}: "
                    f"{str(error)[:200]}); re-extract the original archive there, or delete the folder and "
                    "add --download") from error
    return []
