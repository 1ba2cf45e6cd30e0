"""Which data a run used: digests of the arrays and files a run reads, and the report's warning when
trials that should share data did not."""
import pandas as pd
from PIL import Image

from nvae_core.datasets import load_dataset
from nvae_core.lineage import dataset_lineage
from reports.tables import data_warnings


def _digits(seed):
    return dataset_lineage("digits", {s: load_dataset("digits", s, seed=seed) for s in ("train", "test")}, "sklearn")


def test_the_digest_follows_the_pixels_and_the_split_and_the_sizes_are_recorded():
    first, again, other_split = _digits(0), _digits(0), _digits(1)
    assert first == again and len(first["digest"]) == 16
    assert first["digest"] != other_split["digest"]  # another seed splits the digits differently
    assert first["splits"] == {"train": 1438, "test": 359} and first["name"] == "digits"


def test_an_image_folder_digest_changes_when_a_file_changes(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / split / f"{i}.png")

    def lineage():
        splits = {s: load_dataset("image-folder", s, tmp_path, image_size=8) for s in ("train", "test")}
        return dataset_lineage("image-folder", splits, str(tmp_path))

    before = lineage()
    assert before["splits"] == {"train": 3, "test": 3} and before == lineage()
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "test" / "2.png")
    assert lineage()["digest"] != before["digest"]


def test_the_report_warns_when_trials_of_one_seed_read_different_data():
    same = pd.DataFrame({"seed": ["0", "0", "1"], "data_digest": ["a", "a", "b"]})
    assert data_warnings(same) == []  # seeds may differ: a set split here is split by its seed
    mixed = pd.DataFrame({"seed": ["0", "0"], "data_digest": ["a", "c"]})
    (line,) = data_warnings(mixed)
    assert "seed 0 read different data" in line and "a, c" in line
    assert data_warnings(pd.DataFrame({"seed": ["0"]})) == []
