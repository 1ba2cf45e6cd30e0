"""nvae_core.datasets.load_dataset on real on-disk formats written tiny into tmp_path, and quantize."""
import pickle
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torchvision.datasets.celeba
from PIL import Image

from nvae_core import ConfigError, NVAEConfig, preset
from nvae_core.datasets import DATASETS, Batches, DatasetNotFoundError, load_dataset, quantize

DOWNLOADABLE = ("mnist", "cifar10", "celeba64")
CELEBA_LISTS = ("list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt",
                "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")


# --- writers of the real formats ----------------------------------------------------------------

def _mnist_images(n, offset):
    """n 28x28 uint8 images, image i holding value offset + i at (i, 2 * i) and 255 at (27, 27)."""
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        images[i, i, 2 * i] = offset + i
        images[i, 27, 27] = 255
    return images


def write_mnist(root, n_train=3, n_test=2):
    """The four uncompressed big-endian IDX files under root/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, offset in (("train", n_train, 10), ("t10k", n_test, 100)):
        images = _mnist_images(n, offset)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        labels = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_cifar10(root, per_batch=2):
    """cifar-10-batches-py as torchvision reads it: pickled dicts with str keys (the py2 originals load so)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((per_batch, 3072), np.uint8)
        data[:, 0] = b  # batch id in pixel (0, 0, 0)
        if name == "test_batch":
            data[1, 2 * 1024 + 5 * 32 + 7] = 200  # channel 2, row 5, column 7 of test image 1
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0] * per_batch}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


CELEBA_PARTITION = {"000001.jpg": 0, "000002.jpg": 0, "000003.jpg": 0, "000004.jpg": 1,
                    "000005.jpg": 2, "000006.jpg": 2, "000007.jpg": 1}
CELEBA_COLORS = {"000001.jpg": (200, 30, 30), "000002.jpg": (30, 200, 30), "000003.jpg": (120, 120, 120),
                 "000004.jpg": (90, 90, 90), "000005.jpg": (220, 220, 40), "000006.jpg": (40, 220, 220),
                 "000007.jpg": (60, 60, 200)}


def write_celeba(root):
    """celeba/img_align_celeba/*.jpg (178 x 218, a solid colour exactly in the authors' crop box
    (left 15, top 40, right 163, bottom 188), black around it; greys saved as L) and the five list
    files torchvision reads."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    for name, color in CELEBA_COLORS.items():
        image = np.zeros((218, 178, 3), np.uint8)
        image[40:188, 15:163] = color  # the box is 148 x 148, 5 pixels above the image's centre
        image = Image.fromarray(image)
        image = image.convert("L") if len(set(color)) == 1 else image
        image.save(folder / "img_align_celeba" / name, quality=100)
    names = sorted(CELEBA_PARTITION)
    rows = lambda values: "".join(f"{n} {' '.join(map(str, v))}\n" for n, v in zip(names, values))
    (folder / "list_eval_partition.txt").write_text(rows([[CELEBA_PARTITION[n]] for n in names]))
    (folder / "identity_CelebA.txt").write_text(rows([[i + 1] for i in range(len(names))]))
    (folder / "list_attr_celeba.txt").write_text(
        f"{len(names)}\nSmiling Young\n" + rows([[1, -1]] * len(names)))
    (folder / "list_bbox_celeba.txt").write_text(
        f"{len(names)}\nimage_id x_1 y_1 width height\n" + rows([[1, 2, 3, 4]] * len(names)))
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{len(names)}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
        "rightmouth_x rightmouth_y\n" + rows([list(range(10))] * len(names)))


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def _all(dataset):
    return torch.stack([dataset[i] for i in range(len(dataset))])


# --- MNIST --------------------------------------------------------------------------------------

def test_mnist_reads_idx_files_pads_to_32_and_keeps_intensities(tmp_path):
    """IDX images come back as 1 x 32 x 32 intensities / 255 with a 2-pixel zero border, per split."""
    write_mnist(tmp_path)
    train, test = load_dataset("mnist", "train", tmp_path), load_dataset("mnist", "test", tmp_path)
    assert (len(train), len(test)) == (3, 2)
    for dataset, offset in ((train, 10), (test, 100)):
        x = _all(dataset)
        assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() == 1.0
        expected = torch.zeros(len(dataset), 1, 32, 32)
        for i in range(len(dataset)):
            expected[i, 0, 2 + i, 2 + 2 * i] = (offset + i) / 255
            expected[i, 0, 29, 29] = 1.0
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)


def test_mnist_gz_files_alone_are_not_enough(tmp_path):
    """torchvision reads only the uncompressed IDX files: .gz copies alone are a missing dataset."""
    write_mnist(tmp_path)
    for path in (tmp_path / "MNIST" / "raw").iterdir():
        path.rename(path.with_name(path.name + ".gz"))
    with pytest.raises(DatasetNotFoundError, match="uncompressed"):
        load_dataset("mnist", "train", tmp_path)


# --- CIFAR-10 -----------------------------------------------------------------------------------

def test_cifar10_reads_python_batches_channel_major(tmp_path):
    """Train joins data_batch_1..5, test is test_batch, and a pixel lands at its (c, h, w) / 255."""
    write_cifar10(tmp_path)
    train, test = load_dataset("cifar10", "train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert (len(train), len(test)) == (10, 2)
    x = _all(test)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    expected = torch.zeros(2, 3, 32, 32)
    expected[:, 0, 0, 0] = 5 / 255
    expected[1, 2, 5, 7] = 200 / 255
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)
    assert _all(train)[:, 0, 0, 0].mul(255).round().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


# --- CelebA -------------------------------------------------------------------------------------

def test_celeba64_crops_the_authors_box_resizes_to_64_and_splits(tmp_path):
    """Each split holds its partition's jpgs as 3 x 64 x 64 RGB: the (15, 40, 163, 188) box, no
    black frame (a centre crop would keep 5 black rows at the top); validation is partition 1."""
    write_celeba(tmp_path)
    for split, names in (("train", ["000001.jpg", "000002.jpg", "000003.jpg"]),
                         ("validation", ["000004.jpg", "000007.jpg"]), ("test", ["000005.jpg", "000006.jpg"])):
        x = _all(load_dataset("celeba64", split, tmp_path))
        assert x.shape == (len(names), 3, 64, 64) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        for image, name in zip(x, names):
            color = torch.tensor(CELEBA_COLORS[name]).view(3, 1, 1) / 255
            assert (image[:, 2:-2, 2:-2] - color).abs().max() < 0.03  # solid colour (JPEG rings at the edges)
            for edge in (image[:, :2], image[:, -2:], image[:, :, :2], image[:, :, -2:]):  # no black frame
                assert (edge.mean(dim=(1, 2)) - color.flatten()).abs().max() < 0.1  # black would be > 0.7


def test_only_celeba64_has_a_validation_split(tmp_path):
    """Asking another set for a validation split is a clear error, as is eval_split='validation'."""
    with pytest.raises(ValueError, match="no validation split"):
        load_dataset("digits", "validation")
    with pytest.raises(ConfigError, match="eval_split"):
        NVAEConfig(dataset="cifar10", eval_split="validation")
    assert NVAEConfig(dataset="celeba64", image_size=64).evaluation_split == "validation"
    assert NVAEConfig(dataset="celeba64", image_size=64, eval_split="test").evaluation_split == "test"
    assert NVAEConfig(dataset="cifar10").evaluation_split == "test"


# --- training augmentation ---------------------------------------------------------------------

def _flipped_fraction(cfg, train, n=400):
    """Share of n left-right asymmetric images that come out of Batches mirrored."""
    x = torch.zeros(n, cfg.image_channels, cfg.image_size, cfg.image_size)
    x[..., 0] = 1.0  # only the leftmost column is lit: a flip moves it to the right
    out = Batches(cfg, "cpu", seed=3, train=train)(x)
    mirrored = out[..., -1].flatten(1).amin(1) == 1.0
    kept = out[..., 0].flatten(1).amin(1) == 1.0
    assert bool((mirrored ^ kept).all()), "each image is either kept or exactly mirrored"
    return mirrored.float().mean().item()


@pytest.mark.parametrize("name", ["cifar10", "celeba64"])
def test_training_images_of_colour_sets_flip_and_test_images_never(name):
    """The authors' augmentation: a random horizontal flip of about half the training images of
    CIFAR-10 and CelebA 64 (train_flip='auto'), none at evaluation; 'off' turns it off."""
    cfg = preset(name)
    assert cfg.train_flip == "auto" and cfg.flips_training_images
    assert 0.4 < _flipped_fraction(cfg, train=True) < 0.6
    assert _flipped_fraction(cfg, train=False) == 0.0
    assert _flipped_fraction(cfg.replace(train_flip="off"), train=True) == 0.0


def test_binarized_sets_do_not_flip_unless_asked():
    """MNIST (and any 1-bit set) is not flipped under 'auto'; 'on' flips it."""
    cfg = preset("mnist")
    assert not cfg.flips_training_images
    assert _flipped_fraction(cfg, train=True) == 0.0
    assert 0.4 < _flipped_fraction(cfg.replace(train_flip="on"), train=True) < 0.6


# --- image-folder -------------------------------------------------------------------------------

def test_image_folder_flat_is_split_90_10_under_the_seed(tmp_path):
    """A flat folder of 20 images splits 18/2, disjoint and covering, fixed by the seed."""
    for i in range(20):
        write_png(tmp_path / f"img{i:02d}.png", np.full((6, 6, 3), 10 * i))

    def ids(split, seed):
        return sorted(round(float(x[0, 0, 0]) * 255 / 10) for x in load_dataset(
            "image-folder", split, tmp_path, seed=seed, image_size=4))

    train, test = ids("train", 0), ids("test", 0)
    assert (len(train), len(test)) == (18, 2)
    assert sorted(train + test) == list(range(20))
    assert ids("test", 0) == test
    assert any(ids("test", seed) != test for seed in (1, 2, 3))


def test_image_folder_uses_train_and_test_subfolders_at_any_depth(tmp_path):
    """With train/ and test/ present each split reads its own folder, class subfolders included."""
    write_png(tmp_path / "train" / "cats" / "a.png", np.full((4, 4, 3), 10))
    write_png(tmp_path / "train" / "dogs" / "b.jpg", np.full((4, 4, 3), 20))
    write_png(tmp_path / "train" / "c.png", np.full((4, 4, 3), 30))
    write_png(tmp_path / "test" / "d.png", np.full((4, 4, 3), 40))
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    train = load_dataset("image-folder", "train", tmp_path, image_size=4)
    test = load_dataset("image-folder", "test", tmp_path, image_size=4)
    assert (len(train), len(test)) == (3, 1)
    assert sorted(round(float(x.mean()) * 255) for x in train) == [10, 20, 30]
    assert round(float(test[0].mean()) * 255) == 40


def test_image_folder_resizes_the_shorter_side_then_centre_crops(tmp_path):
    """An 80 x 20 horizontal ramp becomes 10 x 10: halved (slope doubles), then its middle cut out."""
    ramp = np.zeros((20, 80, 3), np.uint8)
    ramp[:, :, 0] = 3 * np.arange(80)
    write_png(tmp_path / "ramp.png", ramp)
    write_png(tmp_path / "other.png", np.zeros((20, 80, 3)))
    images = [load_dataset("image-folder", split, tmp_path, image_size=10) for split in ("train", "test")]
    x = next(image for dataset in images for image in dataset if image.max() > 0)
    assert x.shape == (3, 10, 10)
    expected = 3 * (2 * torch.arange(10) + 30.5) / 255  # resized column j + 15 <- source column 2j + 30.5
    torch.testing.assert_close(x[0], expected.expand(10, 10), rtol=0, atol=1.5 / 255)
    assert x[1:].abs().max() == 0


def test_image_folder_converts_grayscale_to_rgb(tmp_path):
    """A grayscale (L) image comes back with three equal channels holding its values."""
    write_png(tmp_path / "train" / "gray.png", np.full((8, 8), 77), mode="L")
    write_png(tmp_path / "test" / "rgb.png", np.full((8, 8, 3), 5))
    x = load_dataset("image-folder", "train", tmp_path, image_size=8)[0]
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.full((3, 8, 8), 77 / 255), rtol=0, atol=1e-7)


def test_image_folder_needs_image_size(tmp_path):
    """image-folder without image_size is a ValueError naming image_size."""
    write_png(tmp_path / "a.png", np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("image-folder", "train", tmp_path)


def test_image_folder_missing_or_empty_is_dataset_not_found(tmp_path):
    """A missing or image-less folder raises DatasetNotFoundError naming the path and the offline sets."""
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(DatasetNotFoundError) as info:
            load_dataset("image-folder", "train", folder, image_size=8)
        message = str(info.value)
        assert "'image-folder'" in message and str(folder) in message
        assert "--data-dir" in message and "--dataset digits" in message and "--dataset photo-patches" in message


# --- photo-patches and digits -------------------------------------------------------------------

def test_photo_patches_shapes_split_and_disjoint_tiles():
    """520 tiles of 3 x 32 x 32 split 416/104, no tile in both splits, all tiles distinct."""
    train, test = _all(load_dataset("photo-patches", "train")), _all(load_dataset("photo-patches", "test"))
    assert train.shape == (416, 3, 32, 32) and test.shape == (104, 3, 32, 32)
    assert train.dtype == torch.float32 and 0.0 <= train.min() and train.max() <= 1.0
    assert torch.equal(train * 255, torch.round(train * 255))
    keys = lambda x: {row.tobytes() for row in x.mul(255).round().to(torch.uint8).flatten(1).numpy()}
    train_keys, test_keys = keys(train), keys(test)
    assert len(train_keys) == 416 and len(test_keys) == 104 and not train_keys & test_keys


def test_photo_patches_split_is_fixed_by_the_seed():
    """The same seed gives the same test tiles; another seed different ones."""
    a, b = _all(load_dataset("photo-patches", "test", seed=4)), _all(load_dataset("photo-patches", "test", seed=4))
    c = _all(load_dataset("photo-patches", "test", seed=5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_digits_through_load_dataset():
    """digits items are 1 x 8 x 8 in [0, 1] and the splits add up to 1797."""
    train, test = load_dataset("digits", "train", seed=2), load_dataset("digits", "test", seed=2)
    assert train[0].shape == (1, 8, 8) and len(train) + len(test) == 1797


# --- the table and argument checks --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DATASETS))
def test_one_registry_describes_every_dataset(name):
    """The registry's data fields make a valid config, the smoke scale takes them as they are, and a
    config that contradicts them is refused."""
    from nvae_platform.train.scales import run_config

    spec = DATASETS[name]
    cfg = NVAEConfig().replace(**spec.data_fields())
    assert (cfg.image_channels, cfg.num_x_bits, cfg.likelihood) == (spec.channels, spec.bits, spec.likelihood)
    assert run_config(name, "smoke").to_dict().items() >= spec.data_fields().items()
    assert spec.offline == (name in ("digits", "photo-patches"))
    if spec.size is not None:  # a fixed shape is enforced; image-folder takes any
        with pytest.raises(ConfigError, match="image_channels"):
            cfg.replace(image_channels=4 - spec.channels)


@pytest.mark.parametrize("name", ["digits", "photo-patches"])
def test_offline_items_match_the_table(name):
    """An offline set's items have the table's channels and size."""
    info = DATASETS[name]
    assert load_dataset(name, "test")[0].shape == (info.channels, info.size, info.size)


def test_bad_arguments_are_value_errors(tmp_path):
    """Unknown dataset or split, or an image_size that contradicts a fixed set, raise ValueError."""
    with pytest.raises(ValueError, match="'svhn'"):
        load_dataset("svhn", "train", tmp_path)
    with pytest.raises(ValueError, match="'valid'"):
        load_dataset("digits", "valid")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("cifar10", "train", tmp_path, image_size=64)


# --- missing data -------------------------------------------------------------------------------

EXPECTED = {"mnist": ("MNIST/raw", "train-images-idx3-ubyte"),
            "cifar10": ("cifar-10-batches-py", "data_batch_1"),
            "celeba64": ("celeba", "list_eval_partition.txt")}


def _check_not_found_message(message, name, tmp_path):
    folder, a_file = EXPECTED[name]
    assert f"'{name}'" in message and str(tmp_path / folder) in message and a_file in message
    assert "--data-dir" in message and "--dataset digits" in message and "--dataset photo-patches" in message


@pytest.mark.parametrize("name", DOWNLOADABLE)
def test_missing_files_without_download(tmp_path, name):
    """download=False on an empty folder: DatasetNotFoundError (a FileNotFoundError) with path and ways out."""
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "train", tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    _check_not_found_message(str(info.value), name, tmp_path)
    assert "download=False" in str(info.value)


@pytest.mark.parametrize("name", DOWNLOADABLE)
def test_failed_download_is_the_same_error_with_its_cause(tmp_path, monkeypatch, name):
    """download=True with no network: DatasetNotFoundError that names the cause, never a raw RuntimeError."""
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # MNIST and CIFAR-10 fetch with urllib
    monkeypatch.setattr(torchvision.datasets.celeba, "download_file_from_google_drive", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "test", tmp_path, download=True)
    assert calls, "no download was attempted"
    message = str(info.value)
    _check_not_found_message(message, name, tmp_path)
    assert "download failed" in message and "no network (test)" in message
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("name, write", [("mnist", write_mnist), ("cifar10", write_cifar10),
                                         ("celeba64", write_celeba)])
def test_download_true_uses_files_already_there(tmp_path, monkeypatch, name, write):
    """download=True with the files on disk (other checksums than the originals) fetches nothing."""
    def offline(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(torchvision.datasets.celeba, "download_file_from_google_drive", offline)
    write(tmp_path)
    assert len(load_dataset(name, "test", tmp_path, download=True)) == 2


# --- quantize -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 5, 7])
def test_quantize_bins_8_bit_values(bits):
    """Every 8-bit value k/255 maps to floor(k / 2**(8-bits)) / (2**bits - 1): 2**bits levels in [0, 1]."""
    k = torch.arange(256)
    q = quantize(k / 255, bits)
    torch.testing.assert_close(q, torch.div(k, 2 ** (8 - bits), rounding_mode="floor") / (2 ** bits - 1))
    assert q.min() == 0 and q.max() == 1 and len(q.unique()) == 2 ** bits
    torch.testing.assert_close(quantize(k / 255 - 1e-4, bits), q)  # float error does not change the bin


def test_quantize_8_bits_is_identity_and_bad_bits_fail():
    """8 bits returns the input unchanged; 0 or 9 bits raise ValueError."""
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(quantize(x, 8), x)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="num_bits"):
            quantize(x, bad)


def test_download_data_command_readies_sets_and_names_the_ones_it_cannot_get(tmp_path, monkeypatch, capsys):
    """studies/download_data.py, as `ray up` runs it on each node: CIFAR-10 already there is ready;
    MNIST with no network is named with its cause, and the command exits 1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("download_data", "studies/download_data.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    write_cifar10(tmp_path)
    assert command.main(["cifar10", "--data-dir", str(tmp_path)]) == 0
    assert f"cifar10: ready in {tmp_path} (10 train / 2 test images)" in capsys.readouterr().out
    assert command.main(["cifar10", "mnist", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "cifar10: ready" in captured.out
    assert "mnist: dataset 'mnist' not found" in captured.err and "no network (test)" in captured.err
    monkeypatch.setenv("NVAE_DATA_DIR", str(tmp_path))
    assert command.main(["cifar10"]) == 0  # the node's data folder, from the environment
