"""Every dataset NVAE trains on, in one table: what its images are and how the model reads them.

The config validates against it, the loaders open what it names, and the platform's scales take a
dataset's data fields from it. Nothing here imports torch.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: image shape, bit depth, the likelihood the authors use on it, and where it comes from."""

    name: str
    channels: int
    size: int | None  # None: any size (image-folder, resized to the config's image_size)
    bits: int  # 1: binarized dynamically by the model (Bernoulli likelihood)
    likelihood_crop: int = 0  # pixels cropped from each side before the likelihood (MNIST's padding)
    offline: bool = False  # bundled with scikit-learn: no data_dir, no download
    default_size: int = 32  # image_size of a dataset of any size when none is given

    @property
    def binarized(self):
        return self.bits == 1

    @property
    def likelihood(self):
        return "bernoulli" if self.binarized else "logistic_mixture"

    def data_fields(self):
        """The NVAEConfig fields this dataset fixes."""
        return dict(dataset=self.name, image_channels=self.channels, image_size=self.size or self.default_size,
                    num_x_bits=self.bits, likelihood=self.likelihood, likelihood_crop=self.likelihood_crop)


DATASETS = {spec.name: spec for spec in (
    DatasetSpec("mnist", channels=1, size=32, bits=1, likelihood_crop=2),  # 28x28 padded to 32x32
    DatasetSpec("cifar10", channels=3, size=32, bits=8),
    DatasetSpec("celeba64", channels=3, size=64, bits=8),
    DatasetSpec("digits", channels=1, size=8, bits=1, offline=True),  # scikit-learn's 8x8 digits
    DatasetSpec("photo-patches", channels=3, size=32, bits=8, offline=True),  # tiles of its two photographs
    DatasetSpec("image-folder", channels=3, size=None, bits=8),  # any folder of images, read as RGB
)}


def dataset_spec(name):
    """The DatasetSpec of name; ValueError naming the known datasets otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(map(repr, DATASETS))}")
    return DATASETS[name]
