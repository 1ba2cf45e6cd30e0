"""Download datasets into a data folder before anything trains (cluster.yaml runs it on every node).

    python studies/download_data.py cifar10 mnist                 # into $NVAE_DATA_DIR, else ./data
    python studies/download_data.py celeba64 --data-dir /mnt/shared/data

Each set is downloaded by torchvision (archives checked by their md5) unless its files are already
there, then opened once. Exits 1, naming the set and the way out, if one cannot be had.
"""
import argparse
import sys

from nvae_core.datasets import DOWNLOADABLE, DatasetNotFoundError, load_dataset
from nvae_core.paths import absolute
from nvae_platform.defaults import default_data_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", choices=DOWNLOADABLE, metavar="DATASET",
                        help=f"one or more of {', '.join(DOWNLOADABLE)}")
    parser.add_argument("--data-dir", default=default_data_dir(), help="default: $NVAE_DATA_DIR, else data")
    args = parser.parse_args(argv)
    root = absolute(args.data_dir)
    failed = 0
    for name in args.datasets:
        try:
            sizes = [len(load_dataset(name, split, root, download=True)) for split in ("train", "test")]
            print(f"{name}: ready in {root} ({sizes[0]} train / {sizes[1]} test images)", flush=True)
        except DatasetNotFoundError as error:
            print(f"{name}: {error}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
