"""A data dir in an object store (--data-dir s3://bucket/prefix, or any URI pyarrow opens), copied once
to each node's local disk, where nvae_core's loaders read it.

The copy of a dataset lives in <cache root>/<dataset>-<digest>, the digest taken over the remote
files' names, sizes and versions (an S3 object's ETag, new with every upload; elsewhere, or without
boto3, the modification time): unchanged files are read from the cache, a changed one makes a new
copy. It is made whole or not at
all: files are written into <key>.partial (each as .part, renamed once its size checks) and the
folder is renamed to <key> at the end, so a copy cut short is never read, and the next one keeps the
files already there. Processes of one node take a lock on the key first: one copies, the others
wait and read its copy.
"""
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pyarrow.fs

from nvae_core.datasets import IMAGE_EXTENSIONS, check_available, files_layout
from nvae_platform.defaults import data_cache_root
from nvae_platform.storage import open_storage

MANIFEST = ".nvae-copy.json"  # written last into a whole copy: the URI, its digest and its files
TRIES = 3  # per file, 1 s then 2 s apart, before the store is named as failing
CHUNK = 8 << 20
COPY_THREADS = 8
PROGRESS_SECONDS = 5.0
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".gz")  # torchvision's downloads, beside what it extracts


class DataCopyError(RuntimeError):
    """The store failed during a copy, on every try."""


def is_remote(data_dir):
    """Whether data_dir is a URI (s3://, gs://, file://, ...) rather than a local path."""
    return "://" in str(data_dir)


def _archive(name):
    """Whether a file is a downloaded archive (its extracted files are what the loaders read)."""
    return name.endswith(ARCHIVES)


def _plain(uri):
    return uri.split("?")[0].rstrip("/")  # as the user knows it: no URI options


def remote_files(data_dir, dataset):
    """(filesystem, base path, {relative path: (size, version)}) of dataset's files under data_dir.
    ValueError, one line naming --data-dir and the fix, when the store cannot be listed or holds no
    such dataset."""
    uri, (folder, entries) = _plain(data_dir), files_layout(dataset)
    upload = f"upload it with: python studies/download_data.py {dataset} --data-dir {uri}"
    try:
        filesystem, base = open_storage(data_dir)
        base = base.rstrip("/")
        top = f"{base}/{folder}".rstrip("/")
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(top, recursive=True, allow_not_found=True))
        etags = _etags(data_dir, top)
    except Exception as error:  # noqa: BLE001  pyarrow (OSError, ArrowInvalid, ...) and boto3 for the same causes
        raise ValueError(f"--data-dir {uri} cannot be listed ({' '.join(str(error).split())[:200]}); check the "
                         "URI, the store's credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the "
                         "node's role) and AWS_ENDPOINT_URL for a store other than AWS") from None
    files = {info.path[len(base) + 1:]: (info.size, etags.get(info.path) or info.mtime_ns or 0) for info in found
             if info.type == pyarrow.fs.FileType.File and not _archive(info.base_name)}
    if dataset == "image-folder":
        images = [path for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
        if len(images) < 2:
            raise ValueError(f"--data-dir {uri} holds {len(images)} image file(s) of {', '.join(IMAGE_EXTENSIONS)}, "
                             "at least 2 needed: upload the images (flat, in class subfolders, or under train/ "
                             f"and test/) with any S3 tool, or {upload}")
    else:
        missing = [entry for entry in entries if not any(path == f"{folder}/{entry}" or
                                                         path.startswith(f"{folder}/{entry}/") for path in files)]
        if missing:
            what = "nothing" if not files else f"no {', '.join(missing)}"
            raise ValueError(f"--data-dir {uri} holds {what} of dataset {dataset!r} (looked under {folder}/): {upload}")
    return filesystem, base, files


def _etags(data_dir, top):
    """{bucket/key: ETag} of the objects under top (bucket/prefix) of an s3:// data dir, listed by
    boto3 (a request per 1000 objects; pyarrow's listing has no ETags), endpoint and region as
    pyarrow takes them; {} for other stores, or where boto3 is not installed (nvae[cluster] installs it)."""
    if not data_dir.startswith("s3://"):
        return {}
    try:
        import boto3
    except ImportError:
        return {}
    options = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(data_dir).query))
    endpoint = options.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=options.get("region"))
    bucket, _, prefix = top.partition("/")
    etags = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        etags.update({f"{bucket}/{item['Key']}": item["ETag"].strip('"') for item in page.get("Contents", ())})
    return etags


def files_digest(data_dir, files):
    """16 hex digits of SHA-256 over the URI and each file's name, size and version (its ETag, else
    its modification time)."""
    digest = hashlib.sha256(_plain(data_dir).encode())
    for path, (size, version) in sorted(files.items()):
        digest.update(f"{path}\t{size}\t{version}\n".encode())
    return digest.hexdigest()[:16]


def local_data_dir(data_dir, dataset, say=print, cache_root=None):
    """(local folder to read dataset from, {"uri", "digest"} of the remote files or None): data_dir
    itself when it is local, else this node's whole copy of it, made first if there is none."""
    if not is_remote(data_dir) or files_layout(dataset) is None:
        return data_dir, None
    filesystem, base, files = remote_files(data_dir, dataset)
    digest = files_digest(data_dir, files)
    root = Path(cache_root or data_cache_root())
    whole = root / f"{dataset}-{digest}"
    remote = {"uri": _plain(data_dir), "digest": digest}
    if (whole / MANIFEST).exists():
        return str(whole), remote
    root.mkdir(parents=True, exist_ok=True)
    with _node_lock(root / f"{whole.name}.lock", lambda: say(f"[nvae] waiting for another process of this node "
                                                             f"copying {remote['uri']} to {whole}")):
        if not (whole / MANIFEST).exists():  # else: copied by the process this one waited for
            partial = root / f"{whole.name}.partial"
            _copy(filesystem, base, files, partial, remote["uri"], say)
            (partial / MANIFEST).write_text(json.dumps({**remote, "files": files}))
            os.rename(partial, whole)
    return str(whole), remote


@contextlib.contextmanager
def _node_lock(path, on_wait):
    """An exclusive lock of this node's processes (the kernel releases it if its holder dies)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


class _Progress:
    """Files and bytes copied so far, told in one line every PROGRESS_SECONDS."""

    def __init__(self, uri, files, say):
        self.uri, self.say = uri, say
        self.total_files, self.total_bytes = len(files), sum(size for size, _ in files.values())
        self.files = self.bytes = 0
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def add(self, nbytes=0, files=0):
        with self.lock:
            self.bytes += nbytes
            self.files += files

    def line(self, verb="copying"):
        self.say(f"[nvae] {socket.gethostname()}: {verb} {self.uri}: {self.files}/{self.total_files} files, "
                 f"{self.bytes / 1e6:.0f}/{self.total_bytes / 1e6:.0f} MB, {time.monotonic() - self.started:.0f} s")


def _copy(filesystem, base, files, partial, uri, say):
    """Copy files into partial, keeping those a cut-short copy left whole there; DataCopyError if a
    file cannot be read after TRIES."""
    progress = _Progress(uri, files, say)
    todo = []
    for path, (size, _) in files.items():
        local = partial / path
        if local.is_file() and local.stat().st_size == size:
            progress.add(size, 1)
        else:
            todo.append(path)
    progress.line("copying to this node's disk" if not progress.files else "resuming the copy of")
    with concurrent.futures.ThreadPoolExecutor(COPY_THREADS) as pool:
        pending = {pool.submit(_copy_file, filesystem, f"{base}/{path}", partial / path, files[path][0], progress)
                   for path in todo}
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=PROGRESS_SECONDS,
                                                        return_when=concurrent.futures.FIRST_EXCEPTION)
                for future in done:
                    future.result()
                if pending:
                    progress.line()
        except OSError as error:  # pyarrow's store errors, and a short read
            pool.shutdown(cancel_futures=True)
            raise DataCopyError(f"the data dir {uri} failed during the copy to {partial} after {TRIES} tries "
                                f"({' '.join(str(error).split())[:200]}); {progress.files}/{progress.total_files} "
                                "files are kept: once the store answers, run the same command and the copy resumes") \
                from None
    progress.line("copied")


def _copy_file(filesystem, source, target, size, progress):
    """One file, written as target.part and renamed once whole, tried TRIES times."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    for attempt in range(TRIES):
        written = 0
        try:
            with filesystem.open_input_stream(source) as src, open(part, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    written += len(chunk)
                    progress.add(len(chunk))
            if written != size:
                raise OSError(f"{source}: {written} bytes read, the listing says {size}")
            os.replace(part, target)
            progress.add(files=1)
            return
        except OSError:
            progress.add(-written)
            if attempt == TRIES - 1:
                raise
            time.sleep(2 ** attempt)


def upload(dataset, local_root, data_dir):
    """Copy dataset's files from the local folder local_root to the remote data_dir, in the layout
    local_data_dir reads (the same relative paths), then list them there. Returns (files, bytes)."""
    folder, _ = files_layout(dataset)
    source = os.path.join(local_root, folder).rstrip("/")
    filesystem, base = open_storage(data_dir)
    target = f"{base.rstrip('/')}/{folder}".rstrip("/")
    targets = {str(path): f"{target}/{path.relative_to(source).as_posix()}" for path in Path(source).rglob("*")
               if path.is_file() and not _archive(path.name)}

    def put(item):
        pyarrow.fs.copy_files(*item, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem)

    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):  # a file:// target needs its folders (S3 has none)
        for parent in {posixpath.dirname(path) for path in targets.values()}:
            filesystem.create_dir(parent, recursive=True)
    with concurrent.futures.ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(put, targets.items()))
    _, _, files = remote_files(data_dir, dataset)
    return len(files), sum(size for size, _ in files.values())


def check_data_dir(dataset, data_dir, seed=0, image_size=None):
    """Raise now what reading the dataset would raise for missing files: a remote data dir is listed
    (ValueError naming --data-dir), a local one checked by nvae_core (DatasetNotFoundError)."""
    if is_remote(data_dir):
        if files_layout(dataset) is not None:
            remote_files(data_dir, dataset)
        return
    check_available(dataset, data_dir, seed=seed, image_size=image_size)
