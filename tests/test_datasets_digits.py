"""nvae_core.datasets: the offline scikit-learn digits set and dynamic binarization."""
import math

import pytest
import torch

from nvae_core.datasets import digits, dynamic_binarize

NUM_DIGITS = 1797  # images in sklearn.datasets.load_digits


def test_split_sizes_add_up_and_shapes():
    """Train and test together hold all 1797 images, N x 1 x 8 x 8 float32, test ~ 20%."""
    train, test = digits("train"), digits("test")
    assert train.shape[1:] == test.shape[1:] == (1, 8, 8)
    assert train.dtype == test.dtype == torch.float32
    assert train.shape[0] + test.shape[0] == NUM_DIGITS
    assert test.shape[0] == round(0.2 * NUM_DIGITS)
    assert digits("test", test_fraction=0.5).shape[0] == round(0.5 * NUM_DIGITS)


def test_splits_are_disjoint_and_cover_the_data():
    """Every image lands in exactly one split (compared as multisets of the raw images)."""
    from sklearn.datasets import load_digits

    everything = torch.cat([digits("train", seed=3), digits("test", seed=3)]).flatten(1)
    raw = torch.from_numpy(load_digits().data).float() / 16
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, raw.tolist()))


def test_digits_are_read_from_scikit_learns_file_without_importing_it():
    """The digits come from the file load_digits reads, equal to its images, and a new process that
    loads them has not imported scikit-learn (about 1 s of every smoke trial process's start)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from nvae_core.datasets import _digits_array

    assert torch.equal(torch.tensor(_digits_array()), torch.from_numpy(load_digits().data).float() / 16)
    code = "import sys; from nvae_core.datasets import digits; digits('train'); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_values_are_intensities_over_16():
    """Values lie in [0, 1] on the grid k/16, reaching both ends."""
    x = digits("train")
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(x * 16, torch.round(x * 16))


def test_split_is_fixed_under_a_seed():
    """The same seed gives the same split on every call."""
    assert torch.equal(digits("test", seed=7), digits("test", seed=7))
    assert torch.equal(digits("train", seed=7), digits("train", seed=7))


def test_split_differs_across_seeds():
    """Different seeds give different test splits."""
    a, b = digits("test", seed=0), digits("test", seed=1)
    assert a.shape == b.shape and not torch.equal(a, b)


def test_returned_tensors_do_not_share_memory():
    """Editing a returned tensor in place does not change later calls (no shared cache)."""
    x = digits("test")
    x.fill_(0.5)
    assert digits("test").min() == 0.0


@pytest.mark.parametrize("bad", ["valid", "Train", "", None])
def test_bad_split_name_is_a_clear_value_error(bad):
    """An unknown split raises ValueError naming the bad value and the allowed splits."""
    with pytest.raises(ValueError) as info:
        digits(bad)
    message = str(info.value)
    assert repr(bad) in message and "'train'" in message and "'test'" in message


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction_is_rejected(fraction):
    """A test fraction outside (0, 1) raises ValueError naming the field."""
    with pytest.raises(ValueError, match="test_fraction"):
        digits("train", test_fraction=fraction)


def test_dynamic_binarize_is_binary_with_the_input_mean():
    """Samples are 0/1 and their mean is within 5 standard errors of the mean intensity.

    The pixels are independent Bernoulli(p_i), so the sample mean has variance
    sum p_i (1 - p_i) / n^2; 5 standard errors make a false failure a < 1e-6 event.
    """
    x = digits("train")
    b = dynamic_binarize(x, torch.Generator().manual_seed(0))
    assert b.shape == x.shape and b.dtype == x.dtype
    assert torch.all((b == 0) | (b == 1))
    n = x.numel()
    stderr = math.sqrt(float((x * (1 - x)).sum())) / n
    assert abs(float(b.mean()) - float(x.mean())) < 5 * stderr
    # Pixels of intensity 0 or 1 are deterministic.
    assert torch.all(b[x == 0] == 0) and torch.all(b[x == 1] == 1)


def test_dynamic_binarize_per_pixel_probability():
    """Each pixel is 1 with its own probability: per-intensity frequencies match (5 stderr)."""
    p = torch.tensor([0.1, 0.5, 0.9]).view(3, 1).expand(3, 20000).contiguous()
    b = dynamic_binarize(p, torch.Generator().manual_seed(1))
    freq = b.mean(dim=1)
    stderr = torch.sqrt(p[:, 0] * (1 - p[:, 0]) / p.shape[1])
    assert torch.all((freq - p[:, 0]).abs() < 5 * stderr)


def test_dynamic_binarize_is_fresh_and_seedable():
    """Each call draws a fresh sample; the same generator seed reproduces it."""
    x = digits("test")
    first = dynamic_binarize(x, torch.Generator().manual_seed(5))
    again = dynamic_binarize(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    a, b = dynamic_binarize(x, g), dynamic_binarize(x, g)
    assert torch.equal(first, again)
    assert not torch.equal(a, b)
