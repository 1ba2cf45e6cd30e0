"""What a node's first copy of a remote data dir costs: a CIFAR-10-sized set in torchvision's on-disk
layout (50,000 + 10,000 images of 32 x 32 x 3, pickled, 184 MB), uploaded to moto's S3 server on
loopback, then copied to a local cache as a training run does, then found in the cache again.

    python benchmarks/benchmark_data_copy.py
    python benchmarks/benchmark_data_copy.py --images-per-batch 1000     # a tenth of the size

Needs moto (`pip install -e ".[dev]"`). moto serves from memory in one Python process, so the
figure is a floor for the local disk and a ceiling for the store; a real store is read in parallel
by COPY_THREADS requests.
"""
import argparse
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.fs

from nvae_platform.train.data_cache import local_data_dir, upload


def write_cifar10(root, per_batch, seed=0):
    """cifar-10-batches-py as torchvision reads it: five training batches and a test batch of random pixels."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                         "labels": [0] * per_batch}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def _moto():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                         allow_bucket_creation=True)
    for _ in range(100):
        try:
            filesystem.create_dir("nvae")
            return server
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto's server did not answer")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-batch", type=int, default=10_000)
    args = parser.parse_args()
    server = _moto()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            write_cifar10(os.path.join(scratch, "local"), args.images_per_batch)
            started = time.monotonic()
            files, size = upload("cifar10", os.path.join(scratch, "local"), "s3://nvae/data")
            print(f"upload: {files} files, {size / 1e6:.1f} MB in {time.monotonic() - started:.2f} s")
            for what in ("first copy", "from the cache"):
                started = time.monotonic()
                path, remote = local_data_dir("s3://nvae/data", "cifar10", cache_root=os.path.join(scratch, "cache"))
                print(f"{what}: {time.monotonic() - started:.2f} s -> {path} (digest {remote['digest']})", flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
