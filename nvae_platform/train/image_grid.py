"""A PNG grid of images, as torchvision.utils.save_image writes it (2-pixel black borders, values in
[0, 1] rounded to 8 bits, one channel shown as grey), without importing torchvision (1.5 s) in every
trial process."""
import math

import torch
from PIL import Image

PADDING = 2


def save_grid(images, path, nrow=8):
    """Write images (N x C x H x W, values in [0, 1]; C is 1 or 3) to path as a grid nrow wide."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    step_y, step_x = height + PADDING, width + PADDING
    grid = torch.zeros(channels, rows * step_y + PADDING, columns * step_x + PADDING)
    for i, image in enumerate(images):
        y, x = divmod(i, columns)
        grid[:, y * step_y + PADDING: y * step_y + step_y, x * step_x + PADDING: x * step_x + step_x] = image
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
