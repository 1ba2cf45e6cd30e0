"""Datasets whose items are float32 tensors C x H x W in [0, 1] (no labels), and their preprocessing.

`load_dataset(name, split, ...)` opens every set of dataset_registry.DATASETS. Two need no files at all,
so tests and smoke runs train on real images offline: "digits" (scikit-learn's bundled 8x8
handwritten digits) and "photo-patches" (32x32 tiles of scikit-learn's two bundled photographs).
"mnist", "cifar10" and "celeba64" read torchvision's on-disk layouts under data_dir (downloaded on
request), "image-folder" reads any folder of images. When files are missing, one
DatasetNotFoundError says where they were looked for and the ways out.
"""
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .dataset_registry import DATASETS, dataset_spec
from .paths import absolute

SPLITS = ("train", "test", "validation")  # validation: CelebA's own split; the other sets have none
DIGITS_LEVELS = 16  # load_digits intensities are integers 0..16
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MNIST_PAD = 2  # 28x28 -> 32x32; the likelihood is taken on the 28x28 crop (config.likelihood_crop)
PATCH = 32  # photo-patches tile side
PATCH_TEST_FRACTION = 0.2
FOLDER_TEST_FRACTION = 0.1  # image-folder split when data_dir has no train/ and test/ subfolders
CELEBA_BOX = (15, 40, 163, 188)  # the authors' crop (left, top, right, bottom) of the 178x218 image
CELEBA_SPLITS = {"train": "train", "validation": "valid", "test": "test"}  # ours -> torchvision's


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk and could not be downloaded; the message says what to do."""


# --- in-memory and file-backed datasets ---------------------------------------------------------

class TensorImages(Dataset):
    """Images held in memory as one N x C x H x W tensor: uint8 (read as value / 255) or float in [0, 1]."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, index):
        x = self.images[index]
        return x.float().div_(255) if x.dtype == torch.uint8 else x


class ImageFiles(Dataset):
    """Image files read as RGB, resized (shorter side) to `size` and centre-cropped to size x size."""

    def __init__(self, paths, size):
        from torchvision import transforms as T  # here: torchvision takes 1.5 s to import, and few runs read files

        self.paths = list(paths)
        self.transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


class ImagesOnly(Dataset):
    """The images of a dataset of (image, target) pairs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index][0]


# --- the bundled sets ---------------------------------------------------------------------------

def _check_split(split, name=None):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(repr(s) for s in SPLITS)}")
    if split == "validation" and name != "celeba64":
        raise ValueError(f"dataset {name!r} has no validation split: use 'train' or 'test'")


def _seeded_split(n, n_test, split, seed):
    """Sorted indices of `split` after a permutation of range(n) drawn from `seed`: the first n_test are test."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


@functools.lru_cache(maxsize=1)
def _digits_array():
    """All 1797 digits as a read-only float32 array N x 64 in [0, 1] (loaded once per process), read
    from the file scikit-learn ships them in, as its load_digits does: importing scikit-learn takes
    about 1 s, paid by every new trial process of a smoke study."""
    sklearn = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = os.path.join(sklearn.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if not os.path.exists(path):  # a scikit-learn that keeps the file elsewhere
        from sklearn.datasets import load_digits

        pixels = load_digits().data
    else:
        pixels = np.loadtxt(path, delimiter=",")[:, :-1]  # each row: 64 pixels, then the label
    images = pixels.astype(np.float32) / DIGITS_LEVELS
    images.flags.writeable = False
    return images


def digits(split, seed=0, test_fraction=0.2):
    """scikit-learn's 8x8 digits as a float tensor N x 1 x 8 x 8 in [0, 1] (intensity / 16).

    The images are shuffled by a permutation drawn from `seed` and the first
    round(test_fraction * 1797) of them form the test split, the rest the train split; the same
    seed and fraction always give the same, disjoint splits.
    """
    _check_split(split, "digits")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is not allowed: expected a number in (0, 1)")
    images = _digits_array()
    n = images.shape[0]
    index = _seeded_split(n, round(test_fraction * n), split, seed)
    return torch.from_numpy(images[index]).reshape(-1, 1, 8, 8)  # fancy indexing copies


@functools.lru_cache(maxsize=1)
def _photo_tiles():
    """Every non-overlapping 32x32 tile of scikit-learn's two sample photos: read-only uint8 N x 3 x 32 x 32."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    tiles = []
    for _, photo in sorted(zip(map(os.path.basename, photos.filenames), photos.images), key=lambda p: p[0]):
        rows, cols = photo.shape[0] // PATCH, photo.shape[1] // PATCH
        grid = photo[:rows * PATCH, :cols * PATCH].reshape(rows, PATCH, cols, PATCH, 3)
        tiles.append(grid.transpose(0, 2, 4, 1, 3).reshape(-1, 3, PATCH, PATCH))
    tiles = np.ascontiguousarray(np.concatenate(tiles))
    tiles.flags.writeable = False
    return tiles


def photo_patches(split, seed=0):
    """32x32 RGB tiles of china.jpg and flower.jpg as a float tensor N x 3 x 32 x 32, a seeded 80/20 split.

    Tiles do not overlap, so no pixel is in both splits; 2 photos x 13 x 20 tiles = 520 in all.
    """
    _check_split(split, "photo-patches")
    tiles = _photo_tiles()
    n = tiles.shape[0]
    index = _seeded_split(n, round(PATCH_TEST_FRACTION * n), split, seed)
    return torch.from_numpy(tiles[index]).float().div_(255)


def random_flip(x, generator=None):
    """Each image of the batch x (B x C x H x W) mirrored left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)


def dynamic_binarize(x, generator=None):
    """A fresh binary sample of x in [0, 1]: each pixel is 1 with probability its intensity."""
    return torch.bernoulli(x, generator=generator)


def quantize(x, num_bits):
    """8-bit intensities in [0, 1] on 2**num_bits levels: floor(255 x / 2**(8 - bits)) / (2**bits - 1)."""
    if not (isinstance(num_bits, int) and 1 <= num_bits <= 8):
        raise ValueError(f"num_bits={num_bits!r} is not allowed: expected an integer in 1..8")
    if num_bits == 8:
        return x
    bins = torch.div(torch.round(x * 255), 2 ** (8 - num_bits), rounding_mode="floor")
    return bins / (2 ** num_bits - 1)


class Batches:
    """Turns a loader's batches of intensities into model inputs, from its own seeded generator:
    for training (train=True) a random horizontal flip where the config asks for one; then a fresh
    dynamic binarization for 1-bit data, or quantization to num_x_bits."""

    def __init__(self, cfg, device, seed, train=False):
        self.cfg, self.device = cfg, device
        self.flip = train and cfg.flips_training_images
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x):
        if self.flip:
            x = random_flip(x, self.generator)
        x = dynamic_binarize(x, self.generator) if self.cfg.num_x_bits == 1 else quantize(x, self.cfg.num_x_bits)
        return x.to(self.device, non_blocking=True)


# --- the downloadable sets ----------------------------------------------------------------------

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_CELEBA_LISTS = ("list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt",
                 "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")
# name: (folder under data_dir, entries that must exist there, the layout in words)
_ON_DISK = {
    "mnist": ("MNIST/raw", _MNIST_FILES,
              "MNIST/raw/ with the four uncompressed IDX files " + ", ".join(_MNIST_FILES)),
    "cifar10": ("cifar-10-batches-py", _CIFAR_FILES,
                ("cifar-10-batches-py/ with data_batch_1 .. data_batch_5, test_batch and batches.meta, as "
                "extracted from cifar-10-python.tar.gz")),
    "celeba64": ("celeba", ("img_align_celeba",) + _CELEBA_LISTS,
                 "celeba/ with img_align_celeba/ (the aligned jpgs) and " + ", ".join(_CELEBA_LISTS)),
}
DOWNLOADABLE = tuple(_ON_DISK)  # the sets torchvision downloads into data_dir
_WAYS_OUT = "or use an offline set that needs no files: --dataset digits or --dataset photo-patches"


def files_layout(name):
    """Where name's files sit under a data folder: (subfolder, entries that must be in it) for the sets
    torchvision reads from files, ("", ()) for image-folder (the whole folder), None for the offline sets."""
    if name in _ON_DISK:
        return _ON_DISK[name][:2]
    return ("", ()) if name == "image-folder" else None


def _missing(name, root):
    folder, entries, _ = _ON_DISK[name]
    return [entry for entry in entries if not (Path(root) / folder / entry).exists()]


def _not_found(name, path, reason, layout):
    error = DatasetNotFoundError(f"dataset {name!r} not found: looked in {path} ({reason}). Either point "
                                 f"--data-dir at a copy of it (a folder with {layout}), {_WAYS_OUT}.")
    error.dataset, error.path = name, str(path)
    return error


def _brief(error):
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240] + '...' if len(text) > 240 else text}"


def _require_on_disk(name, root):
    """Raise DatasetNotFoundError unless name's files are all under root."""
    folder, _, layout = _ON_DISK[name]
    missing = _missing(name, root)
    if missing:
        raise _not_found(name, Path(root) / folder, f"missing {', '.join(missing)}; download=False", layout)


def _open_on_disk(name, root, download, build):
    """build(download) once name's files are on disk under root, downloading them first if asked."""
    folder, _, layout = _ON_DISK[name]
    path = Path(root) / folder
    if not _missing(name, root):
        return build(False)
    if not download:
        _require_on_disk(name, root)
    try:
        return build(True)
    except Exception as error:  # no network, gdown missing, a bad mirror...: all end the same way
        missing = _missing(name, root)
        if not missing:
            raise  # the files are there: a real problem with them, not a missing dataset
        raise _not_found(name, path, f"missing {', '.join(missing)}; the download failed: {_brief(error)}",
                         layout) from error


def _mnist(split, root, download):
    from torchvision.datasets import MNIST

    mnist = _open_on_disk("mnist", root, download, lambda dl: MNIST(root, train=split == "train", download=dl))
    return TensorImages(F.pad(mnist.data.unsqueeze(1), (MNIST_PAD,) * 4))  # uint8, zero padding


def _cifar10(split, root, download):
    from .torchvision_sets import CIFAR10Files

    cifar = _open_on_disk("cifar10", root, download,
                          lambda dl: CIFAR10Files(root, train=split == "train", download=dl))
    return TensorImages(torch.from_numpy(cifar.data).permute(0, 3, 1, 2).contiguous())  # N x H x W x C -> NCHW


def _crop_celeba(image):
    return image.convert("RGB").crop(CELEBA_BOX)


def _celeba64(split, root, download):
    from torchvision import transforms as T

    from .torchvision_sets import CelebAFiles

    size = DATASETS["celeba64"].size
    transform = T.Compose([T.Lambda(_crop_celeba), T.Resize(size), T.ToTensor()])
    # target_type=[]: no labels are returned, but torchvision reads all five list files regardless.
    celeba = _open_on_disk("celeba64", root, download,
                           lambda dl: CelebAFiles(root, split=CELEBA_SPLITS[split], target_type=[],
                                                   transform=transform, download=dl))
    return ImagesOnly(celeba)


def _image_paths(folder):
    """Image files under folder, at any depth (hidden ones left out), sorted."""
    return sorted(path for path in Path(folder).rglob("*")
                  if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _image_folder(split, root, seed, image_size, exclude=()):
    """Images under root/train and root/test when both exist, else a seeded 90/10 split of all of them;
    the files in exclude (paths as strings) are left out before the split."""
    layout = ("images, flat or in class subfolders, split 90/10 under the seed; or with train/ and test/ "
              "subfolders of them, used as the splits")
    root, exclude = Path(root), set(exclude)
    if (root / "train").is_dir() and (root / "test").is_dir():
        paths = [p for p in _image_paths(root / split) if str(p) not in exclude]
        if not paths:
            raise _not_found("image-folder", root / split, f"no {', '.join(IMAGE_EXTENSIONS)} files", layout)
        return ImageFiles(paths, image_size)
    paths = [p for p in _image_paths(root) if str(p) not in exclude] if root.is_dir() else []
    if len(paths) < 2:
        reason = f"{len(paths)} image file(s), at least 2 needed" if root.is_dir() else "no such folder"
        raise _not_found("image-folder", root, reason, layout)
    index = _seeded_split(len(paths), max(1, round(FOLDER_TEST_FRACTION * len(paths))), split, seed)
    return ImageFiles([paths[i] for i in index], image_size)


def check_data_folder(name, data_dir):
    """Raise ValueError when data_dir, or a folder above it, is a file: no dataset of files can be
    read from or downloaded into it (the offline sets need no folder)."""
    if dataset_spec(name).offline:
        return
    path = Path(absolute(data_dir))
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--data-dir {data_dir}: {folder} is a file, not a folder; point --data-dir at a "
                                 "folder (--download downloads the dataset into it)")
            return


def check_available(name, data_dir="data", seed=0, image_size=None):
    """Raise now what load_dataset(download=False) would raise for a missing dataset, without
    reading any images (a driver calls this before it starts workers)."""
    root = absolute(data_dir)
    if name in _ON_DISK:
        _require_on_disk(name, root)
    elif name == "image-folder":  # lists the files of both splits; opens none
        for split in ("train", "test"):
            load_dataset(name, split, data_dir, seed=seed, image_size=image_size)


TRAIN_IMAGES = {"mnist": 60000, "cifar10": 50000, "celeba64": 162770}  # the published training splits


def train_images(name, data_dir="data", seed=0, image_size=None, exclude=()):
    """How many images the training split of name holds: the published count of a downloadable set
    (no files needed), else the split's length (an image-folder's files are listed, none is read)."""
    if name in TRAIN_IMAGES:
        return TRAIN_IMAGES[name]
    return len(load_dataset(name, "train", data_dir, seed=seed, image_size=image_size, exclude=exclude))


def load_dataset(name, split, data_dir="data", download=False, seed=0, image_size=None, exclude=()):
    """Dataset `name` ("train", "test", or CelebA's "validation" split) whose items are float32
    tensors C x H x W in [0, 1].

    Binarized sets (mnist, digits) hold intensities: the model binarizes them dynamically. seed fixes
    the split of the sets split here (digits, photo-patches, a flat image-folder). image_size is
    required for image-folder and must match the fixed size of any other set. exclude: image-folder
    files to leave out (data_check.check_data's unreadable ones).
    """
    size = dataset_spec(name).size
    _check_split(split, name)
    if name == "image-folder":
        if not (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0):
            raise ValueError(f"image_size={image_size!r}: dataset 'image-folder' needs image_size, a positive "
                             "integer (images are resized and centre-cropped to image_size x image_size)")
    elif image_size is not None and image_size != size:
        raise ValueError(f"image_size={image_size!r} is not allowed for dataset {name!r}: its images are "
                         f"{size} x {size}")
    root = absolute(data_dir)
    if name == "digits":
        return TensorImages(digits(split, seed))
    if name == "photo-patches":
        return TensorImages(photo_patches(split, seed))
    if name == "image-folder":
        return _image_folder(split, root, seed, image_size, exclude)
    open_set = {"mnist": _mnist, "cifar10": _cifar10, "celeba64": _celeba64}[name]
    return open_set(split, root, download)
