"""Memory measurements kept on disk between commands. Measuring a config on the meta device costs
about 2 s on a CPU, most of it PyTorch loading its Python meta kernels (and SymPy) on first use, so
every command would pay it again for the same config. A measurement is filed under a digest of the
config, PyTorch's version and the source of nvae_core and of the measuring module: a change to any of
them measures again. A missing, damaged or unwritable cache only means measuring."""
import contextlib
import functools
import hashlib
import json
import os
import pathlib
import tempfile

import torch

import nvae_core

CACHE_ENV = "NVAE_MEMORY_CACHE"


def cache_folder():
    """$NVAE_MEMORY_CACHE, else ~/.cache/nvae/memory."""
    return pathlib.Path(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/nvae/memory"))


@functools.cache
def _code_digest(measuring_file):
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(pathlib.Path(nvae_core.__file__).parent.glob("*.py")) + [pathlib.Path(measuring_file)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _path(config_json, measuring_file):
    key = hashlib.sha256((_code_digest(measuring_file) + config_json).encode()).hexdigest()[:32]
    return cache_folder() / f"{key}.json"


def remembered(config_json, measuring_file, measure):
    """measure() (a JSON-able value) for config_json, from the cache when it holds it, else measured and
    filed there."""
    path = _path(config_json, measuring_file)
    try:
        found = json.loads(path.read_text())
        if found["config"] == config_json:
            return found["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = measure()
    _file(path, {"config": config_json, "value": value})
    return value


def _file(path, record):
    """Write record to path whole or not at all (commands measuring at once each write a temp file of
    their own); an unwritable cache is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(record, f)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
