"""torch.compile as an opt-in runtime switch: which setting means compiling, and the compiler it needs."""
import os
import shutil

import torch

from .config import ConfigError


def compiler_found():
    """The C++ compiler torch.compile's inductor would call ($CXX, else c++, g++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_compile(setting):
    """Raise a ConfigError before any work when compile='on' cannot run: no C++ compiler."""
    if setting == "on" and compiler_found() is None:
        raise ConfigError("compile='on' needs a C++ compiler and none was found ($CXX, c++, g++, clang++): "
                          "install one (apt-get install g++) or set compile='off'")


def resolve_compile(setting, device, auto=True):
    """Whether a config's `compile` means compiling on a device: 'auto' is on for CUDA when a
    compiler is found and the caller allows it (auto=False: the platform's smoke scale, whose tiny
    model gains nothing for minutes of compiling), eager on CPU (compiling there costs minutes)."""
    if setting == "auto":
        return auto and torch.device(device).type == "cuda" and compiler_found() is not None
    return setting == "on"


def maybe_compile(model, setting, device, auto=True):
    """The model wrapped in torch.compile when the setting means compiling on the device, else itself."""
    check_compile(setting)
    return torch.compile(model) if resolve_compile(setting, device, auto) else model
