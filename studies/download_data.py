"""Download datasets into a data folder before anything trains (cluster.yaml runs it on every node), or
upload them once to an object store that every node copies from.

    python studies/download_data.py cifar10 mnist                 # into $NVAE_DATA_DIR, else ./data
    python studies/download_data.py celeba64 --data-dir /mnt/shared/data
    python studies/download_data.py celeba64 --data-dir s3://bucket/data          # download here, upload
    python studies/download_data.py image-folder --from ~/photos --data-dir s3://bucket/photos

Each set is downloaded by torchvision (archives checked by their md5) unless its files are already
there, then opened once. With an s3:// (or any pyarrow URI) --data-dir, it is downloaded into
--local-dir first, opened, and its files uploaded under the URI in the same layout (the archives
left out); an image-folder is read from --from and uploaded as it is. Exits 1, naming the set and
the way out, if one cannot be had.
"""
import argparse
import sys
import time

from nvae_core.data_check import check_data
from nvae_core.datasets import DOWNLOADABLE, DatasetNotFoundError, check_available, load_dataset
from nvae_core.paths import absolute
from nvae_platform.defaults import default_data_dir
from nvae_platform.preflight import CommandLine
from nvae_platform.train.data_cache import is_remote, upload


def main(argv=None):
    parser = CommandLine(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = (*DOWNLOADABLE, "image-folder")
    parser.add_argument("datasets", nargs="+", choices=choices, metavar="DATASET",
                        help=f"one or more of {', '.join(choices)}")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="a folder, or an s3:// URI to upload to (default: $NVAE_DATA_DIR, else data)")
    parser.add_argument("--local-dir", default="data",
                        help="where the sets are downloaded before an upload (default: data)")
    parser.add_argument("--from", dest="source", help="the image folder to upload (image-folder only)")
    args = parser.parse_args(argv)
    remote = is_remote(args.data_dir)
    if "image-folder" in args.datasets and not (remote and args.source):
        parser.error("image-folder: give the folder with --from and an s3:// --data-dir to upload it to")
    if remote and len(args.datasets) > 1 and "image-folder" in args.datasets:
        parser.error("image-folder is uploaded alone: its files go right under --data-dir")
    root = absolute(args.local_dir if remote else args.data_dir)
    failed = 0
    for name in args.datasets:
        try:
            if name == "image-folder":  # every file's header: an unreadable image is named before the upload
                root = absolute(args.source)
                check_available(name, root, image_size=32)
                check_data(name, root, image_size=32)
            else:
                sizes = [len(load_dataset(name, split, root, download=True)) for split in ("train", "test")]
                print(f"{name}: ready in {root} ({sizes[0]} train / {sizes[1]} test images)", flush=True)
            if remote:
                started = time.monotonic()
                files, size = upload(name, root, args.data_dir)
                print(f"{name}: uploaded to {args.data_dir} ({files} files, {size / 1e6:.0f} MB, "
                      f"{time.monotonic() - started:.0f} s)", flush=True)
        except (DatasetNotFoundError, ValueError, OSError) as error:
            print(f"{name}: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
