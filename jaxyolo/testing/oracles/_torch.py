"""Importing the upstream packages and moving arrays between JAX and torch."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import tempfile
import warnings

import numpy as np

from jaxyolo.testing import torchvision_shim

#: Pinned oracle versions (also in requirements/oracles.txt and scripts/_env.sh).
ORACLE_VERSIONS = {"torch": "2.13.0", "ultralytics": "8.4.190", "yolov5": "7.0.14", "yolox": "0.3.0", "yolo9": "1.0.18"}


@functools.cache
def torch():
    """Import torch for oracle use: torchvision shim installed, one thread.

    yolov5's objectness scatter (``tobj[b, a, gj, gi] = iou``) with duplicate
    cells is racy with more than one intra-op thread, so every reference is
    built with ``torch.set_num_threads(1)``.
    """
    torchvision_shim.install()
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "jaxyolo-ultralytics-config"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    # ultralytics logs at INFO on import (the "Creating new Ultralytics Settings"
    # banner of a fresh config dir) and when models are built; an oracle only
    # computes, so its log is kept to errors.
    os.environ.setdefault("YOLO_VERBOSE", "False")
    import torch as _torch

    _torch.set_num_threads(1)
    return _torch


def _import(name: str):
    torch()  # shim first
    with warnings.catch_warnings():
        # yolov5 7.0.14 imports pkg_resources (deprecated by setuptools, pinned <81 for it)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        return importlib.import_module(name)


def yolov5_modules():
    """``(yolov5.utils.loss, yolov5.utils.metrics)`` from yolov5==7.0.14."""
    return _import("yolov5.utils.loss"), _import("yolov5.utils.metrics")


def ultralytics_modules():
    """``(ultralytics.utils.loss, ultralytics.utils.tal, ultralytics.utils.metrics)``."""
    return _import("ultralytics.utils.loss"), _import("ultralytics.utils.tal"), _import("ultralytics.utils.metrics")


def yolox_modules():
    """``(yolox.models.yolo_head, yolox.models.losses, yolox.utils.boxes)`` from yolox==0.3.0."""
    return _import("yolox.models.yolo_head"), _import("yolox.models.losses"), _import("yolox.utils.boxes")


@functools.cache
def yolov9_modules():
    """``(loss_tal, assigner, metrics)``: YOLOv9's ``utils/loss_tal.py``, ``utils/tal/assigner.py`` and
    ``utils/metrics.py`` from yolo9==1.0.18.

    yolo9 (WongKinYiu/yolov9 packaged) imports its own modules as top-level
    ``utils.*`` / ``models.*`` and appends its folder to ``sys.path``; yolov5
    does the same with *its* folder, so after yolov5 a plain import would bind
    ``utils.metrics.bbox_iou`` to yolov5's function (a different CIoU
    convention) or fail.  The yolo9 modules are therefore imported with
    yolo9's folder first on the path and any ``utils``/``models`` modules of
    other packages set aside, then the previous state is restored; the loaded
    modules keep the references they bound at import.  Checked: the loss and
    the assigner call yolo9's own ``bbox_iou``.
    """
    torch()  # shim first
    spec = importlib.util.find_spec("yolo9")
    if spec is None:
        raise ImportError("yolo9 is not installed: scripts/test.sh installs yolo9==1.0.18 (requirements/oracles.txt)")
    root = os.path.dirname(spec.origin)
    owned = lambda name: name.split(".")[0] in ("utils", "models")  # noqa: E731
    saved_modules = {k: sys.modules.pop(k) for k in list(sys.modules) if owned(k)}
    saved_path = list(sys.path)
    sys.path.insert(0, root)
    try:
        loss_tal = importlib.import_module("yolo9.utils.loss_tal")
        assigner, metrics = sys.modules["utils.tal.assigner"], sys.modules["utils.metrics"]
    finally:
        for k in [k for k in sys.modules if owned(k)]:
            del sys.modules[k]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
    want = os.path.realpath(os.path.join(root, "utils", "metrics.py"))
    for fn in (loss_tal.bbox_iou, assigner.bbox_iou, metrics.bbox_iou):
        if os.path.realpath(fn.__code__.co_filename) != want:
            raise ImportError(f"yolo9's loss imported bbox_iou from {fn.__code__.co_filename}, not {want}")
    return loss_tal, assigner, metrics


def tensor(x, *, grad=False, dtype=None):
    """A float32 (or ``dtype``) torch tensor copy of a numpy/JAX array."""
    t = torch()
    arr = np.array(x, dtype=np.float32 if dtype is None else dtype, copy=True)
    out = t.from_numpy(arr)
    return out.requires_grad_(True) if grad else out


def numpy(t):
    """A torch tensor (or None) as a numpy array, detached."""
    return None if t is None else t.detach().cpu().numpy()


def nhwc_to_torch(x, *, grad=False):
    """``(B, H, W, C)`` channels-last array to a ``(B, C, H, W)`` torch leaf tensor.

    The tensor is made contiguous *after* the transpose and is itself the leaf,
    so ``.grad`` is NCHW; :func:`grad_nhwc` brings it back.
    """
    arr = np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2)))
    return tensor(arr, grad=grad)


def grad_nhwc(t):
    """The NCHW ``.grad`` of a leaf from :func:`nhwc_to_torch`, as NHWC numpy."""
    return np.transpose(numpy(t.grad), (0, 2, 3, 1))


def versions() -> dict[str, str]:
    """Installed versions of the oracle packages."""
    import importlib.metadata as md

    return {name: md.version(name) for name in ORACLE_VERSIONS}
