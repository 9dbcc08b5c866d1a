"""Make the upstream PyTorch losses importable without torchvision's compiled ops.

The PyPI torchvision wheels are CUDA builds: importing them on a CPU-only torch
fails while registering ``torchvision::nms``.  None of the oracle *losses* use
torchvision (only NMS, data loading and augmentation code, which the harness
never calls), so :func:`install` registers a small stand-in package under the
name ``torchvision`` before any oracle is imported.  Any attribute that upstream
code actually touches at call time raises a clear ``RuntimeError`` instead of
silently doing something else.

This module is for the test harness and the benchmarks only; jaxyolo itself
never imports torch or torchvision.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types

_SUBMODULES = ("ops", "transforms", "transforms.functional", "datasets", "models", "utils", "io")


class _MissingMeta(type):
    def __getattr__(cls, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _missing(f"{cls.__qualname__}.{item}")


def _missing(name: str) -> type:
    """A placeholder class for a torchvision attribute.

    It is a class (upstream subclasses ``torchvision.datasets.ImageFolder`` at
    import time); calling or instantiating it raises.
    """

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"torchvision.{name} is not available in the jaxyolo oracle harness "
            "(torchvision's compiled ops are CUDA-only on PyPI); the losses never need it."
        )

    return _MissingMeta(name.rpartition(".")[2], (), {"__init__": __init__, "__qualname__": name})


def _make_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    short = name.partition(".")[2] or name

    def __getattr__(item: str):  # PEP 562 module attribute hook
        if item.startswith("__"):
            raise AttributeError(item)
        return _missing(f"{short}.{item}")

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    module.__path__ = []  # behave like a package so submodule imports resolve
    return module


def install() -> None:
    """Register the stand-in ``torchvision`` package (idempotent)."""
    existing = sys.modules.get("torchvision")
    if existing is not None and getattr(existing, "__jaxyolo_shim__", False):
        return
    root = _make_module("torchvision")
    root.__jaxyolo_shim__ = True
    try:
        root.__version__ = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:  # metadata only matters for version checks
        root.__version__ = "0.0.0"
    sys.modules["torchvision"] = root
    for sub in _SUBMODULES:
        full = f"torchvision.{sub}"
        module = _make_module(full)
        sys.modules[full] = module
        parent_name, _, leaf = full.rpartition(".")
        setattr(sys.modules[parent_name], leaf, module)
