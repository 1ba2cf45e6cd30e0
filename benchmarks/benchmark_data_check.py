"""What the driver's data check costs on a large image folder: every file's header read and verified.

    python benchmarks/benchmark_data_check.py                  # 50,000 JPEGs of 178 x 218 (CelebA's size)
    python benchmarks/benchmark_data_check.py --format png --files 10000

It writes the folder (crops of scikit-learn's sample photographs) once, then times check_data with
1 process and with every core, and prints the figures beside the CPU.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from nvae_core.data_check import check_data, unreadable_images
from nvae_platform.machine import cpu_model


def write_folder(folder, files, suffix, seed=0):
    """files crops of 178 x 218 from the sample photographs, one of them corrupt."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(files):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 218), rng.integers(0, photo.shape[1] - 178)
        Image.fromarray(photo[top:top + 218, left:left + 178]).save(os.path.join(folder, f"{i:06d}{suffix}"))
    with open(os.path.join(folder, f"corrupt{suffix}"), "wb") as f:
        f.write(os.urandom(2000))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, capability {torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_folder(folder, args.files, f".{args.format}")
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        print(f"wrote {args.files + 1} {args.format} files ({size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
        paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
        for processes in (1, os.cpu_count()):
            start = time.perf_counter()
            bad = unreadable_images(paths, processes=processes)
            seconds = time.perf_counter() - start
            print(f"check of {len(paths)} files, {processes} process(es): {seconds:.1f} s "
                  f"({seconds / len(paths) * 1e6:.0f} us per file); unreadable: {len(bad)}")
        start = time.perf_counter()
        skipped = check_data("image-folder", folder, image_size=64, skip_unreadable=True)
        print(f"check_data (listing included, every core): {time.perf_counter() - start:.1f} s; "
              f"left out: {[os.path.basename(p) for p in skipped]}")


if __name__ == "__main__":
    main()
