"""Datasets as float tensors N x C x H x W in [0, 1], and dynamic binarization.

`digits` is scikit-learn's bundled 8x8 handwritten digits (1797 images, intensities 0..16): it needs
no download, so tests and smoke runs train on real images offline (config dataset="digits").
"""
import functools

import numpy as np
import torch

SPLITS = ("train", "test")
DIGITS_LEVELS = 16  # load_digits intensities are integers 0..16


@functools.lru_cache(maxsize=1)
def _digits_array():
    """All 1797 digits as a read-only float32 array N x 64 in [0, 1] (loaded once per process)."""
    from sklearn.datasets import load_digits

    images = load_digits().data.astype(np.float32) / DIGITS_LEVELS
    images.flags.writeable = False
    return images


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(repr(s) for s in SPLITS)}")


def digits(split, seed=0, test_fraction=0.2):
    """scikit-learn's 8x8 digits as a float tensor N x 1 x 8 x 8 in [0, 1] (intensity / 16).

    The images are shuffled by a permutation drawn from `seed` and the first
    round(test_fraction * 1797) of them form the test split, the rest the train split; the same
    seed and fraction always give the same, disjoint splits.
    """
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is not allowed: expected a number in (0, 1)")
    images = _digits_array()
    n = images.shape[0]
    n_test = int(round(test_fraction * n))
    order = np.random.default_rng(seed).permutation(n)
    index = order[:n_test] if split == "test" else order[n_test:]
    return torch.from_numpy(images[np.sort(index)]).reshape(-1, 1, 8, 8)  # fancy indexing copies


def dynamic_binarize(x, generator=None):
    """A fresh binary sample of x in [0, 1]: each pixel is 1 with probability its intensity."""
    return torch.bernoulli(x, generator=generator)
