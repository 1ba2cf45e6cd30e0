"""The sample grids of runs and evaluations: PNG files as torchvision writes them, without torchvision."""
import torch
import torchvision.utils

from nvae_platform.train.image_grid import save_grid


def test_the_sample_grid_is_written_byte_for_byte_as_torchvision_writes_it(tmp_path):
    for shape, nrow in (((24, 1, 12, 12), 8), ((10, 3, 8, 8), 4), ((3, 3, 5, 7), 8)):
        images = torch.rand(shape)
        torchvision.utils.save_image(images, tmp_path / "theirs.png", nrow=nrow)
        save_grid(images, tmp_path / "ours.png", nrow=nrow)
        assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "theirs.png").read_bytes()
