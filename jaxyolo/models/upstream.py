"""The upstream PyTorch models: reading their checkpoints, building them by
registry name, running them to raw per-level outputs in jaxyolo's layout.

Needs torch and the upstream package of the model (``pip install
jaxyolo[torch]``); only :func:`jaxyolo.models.from_torch` on a file or module,
``jaxyolo compare``, the tests and the benchmarks import this module.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import re
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxyolo.models import yolov5 as _v5
from jaxyolo.models.registry import get_spec

__all__ = ["torch", "build_upstream", "read_checkpoint", "load_module", "module_state", "torch_images", "raw_outputs", "to_nhwc"]


def torch():
    """``import torch``, with a working ``torchvision`` import for the upstream packages.

    ultralytics and yolov5 import torchvision at import time but their model
    code never calls it.  A torchvision whose compiled ops cannot load (a
    CUDA wheel next to a CPU torch) is replaced by jaxyolo's stand-in
    (:mod:`jaxyolo.testing.torchvision_shim`, which raises if anything is
    actually called), with a warning.
    """
    import torch as _torch

    if "torchvision" not in sys.modules:  # neither imported nor the stand-in installed yet
        try:
            importlib.import_module("torchvision")
        except Exception as e:  # e.g. "operator torchvision::nms does not exist"
            from jaxyolo.testing import torchvision_shim

            warnings.warn(f"torchvision cannot be imported ({e}); using jaxyolo's stand-in", RuntimeWarning, stacklevel=2)
            torchvision_shim.install()
    return _torch


# ------------------------------------------------------------ checkpoints


class _Unpickler(pickle.Unpickler):
    """Resolves the module paths of original-repo yolov5 checkpoints
    (``models.yolo``, ``utils.*``) to the ``yolov5`` package."""

    def find_class(self, module, name):
        if module == "models" or module.startswith(("models.", "utils.")) or module == "utils":
            module = "yolov5." + module
        return super().find_class(module, name)


_remap_pickle = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="jaxyolo_remap_pickle")


def _load(path):
    """The object in an upstream checkpoint file: an ``nn.Module`` (pickled
    ultralytics / yolov5 models) or a ``state_dict``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    t = torch()
    try:
        obj = t.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = t.load(path, map_location="cpu", weights_only=False, pickle_module=_remap_pickle)
    if isinstance(obj, Mapping):
        m = obj.get("ema") or obj.get("model")
        if isinstance(m, (t.nn.Module, Mapping)):
            return m
        if obj and all(hasattr(v, "shape") for v in obj.values()):
            return obj
    raise ValueError(f"{path}: not an upstream checkpoint (expected a dict with a 'model' module or state_dict, or a state_dict)")


def read_checkpoint(path):
    """``(state_dict, meta)`` of an upstream checkpoint file.

    ``meta`` may hold ``name`` (registry name) and ``names`` (class names).
    A plain ``{"model": state_dict}`` (YOLOX) or bare ``state_dict`` loads with
    ``weights_only=True``; pickled models (ultralytics / yolov5 ``.pt``) need
    ``weights_only=False`` and the upstream package, as upstream loads them.
    """
    obj = _load(path)
    return module_state(obj) if hasattr(obj, "state_dict") else (dict(obj), {})


def load_module(source, *, name: str | None = None, nc: int | None = None):
    """``(module, name)``: the upstream ``nn.Module`` of a checkpoint, float32,
    eval mode -- the pickled module itself, or for a ``state_dict`` (a YOLOX
    ``.pth``, an in-memory dict) :func:`build_upstream` of ``name`` loaded with
    ``load_state_dict(strict=True)``."""
    obj = _load(source) if isinstance(source, (str, Path)) else source
    if hasattr(obj, "state_dict"):
        found = _infer_name(obj)
        if name is not None and found not in (None, name):
            raise ValueError(f"name={name!r} but the checkpoint is a {found}")
        name = name or found
        if name is None:
            raise ValueError("name is required: the checkpoint does not say which model it is")
        return obj.float().eval(), name
    if name is None:
        raise ValueError("name is required for a state_dict checkpoint")
    from jaxyolo.models.convert import infer_nc

    nc = nc or infer_nc(name, obj)
    if nc is None:
        raise ValueError(f"nc is required: no class count found in the {name} state_dict")
    module = build_upstream(name, nc=nc)
    t = torch()
    try:
        module.load_state_dict({k: v if hasattr(v, "detach") else t.as_tensor(np.asarray(v)) for k, v in obj.items()}, strict=True)
    except RuntimeError as e:  # torch's missing / unexpected / size-mismatch report
        raise ValueError(f"the state_dict does not load into upstream {name}: {e}") from None
    return module.eval(), name


_ULTRALYTICS_NAME = re.compile(r"^(yolov8|yolo11|yolo26|yolov10)([nsmblx])?$")


def _infer_name(module) -> str | None:
    y = getattr(module, "yaml", None)
    if not isinstance(y, dict):
        return None
    if type(module).__module__.startswith("ultralytics"):
        m = _ULTRALYTICS_NAME.match(Path(str(y.get("yaml_file", ""))).stem)
        scale = m and (m.group(2) or y.get("scale"))
        return m.group(1) + scale if scale else None
    if "depth_multiple" in y and "anchors" in y:
        for s, (d, w) in _v5.SCALES.items():
            if np.isclose(y["depth_multiple"], d) and np.isclose(y["width_multiple"], w):
                return "yolov5" + s
    return None


def module_state(module):
    """``(state_dict, meta)`` of an upstream ``nn.Module`` (see :func:`read_checkpoint`)."""
    names = getattr(module, "names", None)
    if isinstance(names, Mapping):
        names = [names[i] for i in sorted(names)]
    return module.state_dict(), {"name": _infer_name(module), "names": None if names is None else [str(n) for n in names]}


# ------------------------------------------------------------- building


def build_upstream(name: str, *, nc: int):
    """The upstream PyTorch model of registry ``name``, built by upstream's own code:
    ultralytics ``DetectionModel(f"{name}.yaml", nc=nc)``, yolov5
    ``models.yolo.Model`` from its packaged yaml, YOLOX
    ``get_exp_by_name(name).get_model()``.  Randomly initialised, train mode."""
    spec = get_spec(name)
    torch()
    if spec.family == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel

        with _quiet("ultralytics"):  # "Overriding model.yaml nc" notes
            return DetectionModel(f"{name}.yaml", nc=nc, verbose=False)
    if spec.family == "yolov5":
        from yolov5.models import yolo

        with _quiet("yolov5"):  # its layer table and summary
            return yolo.Model(str(Path(yolo.__file__).parent / f"{name}.yaml"), nc=nc)
    from yolox.exp import get_exp

    exp = get_exp(exp_name=name)
    exp.num_classes = nc
    return exp.get_model().train()


@contextlib.contextmanager
def _quiet(*loggers):
    """Raise the named loggers to WARNING for the duration."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


# --------------------------------------------------------------- running


def torch_images(images, family: str):
    """jaxyolo images ``(B, H, W, 3)`` float ``[0, 1]`` RGB -> the NCHW float32
    tensor upstream takes (YOLOX: 0-255 BGR, as :class:`~jaxyolo.models.yolox.YOLOX` converts)."""
    x = np.asarray(images, np.float32)
    if family == "yolox":
        x = x[..., ::-1] * np.float32(255.0)
    return torch().from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def raw_outputs(module, family: str, x):
    """Per-level raw predictions of an upstream model on NCHW ``x``, as torch
    tensors in upstream's layout, in the module's current mode (no
    ``no_grad`` here):

    * ultralytics: ``Detect``'s ``boxes``/``scores`` dict split back per level, ``(B, 4 reg_max + nc, H, W)``
      (an end-to-end head: ``{"one2many": [...], "one2one": [...]}``);
    * yolov5: ``Detect``'s training-mode list ``(B, na, H, W, 5 + nc)``;
    * yolox: ``cat(reg_preds, obj_preds, cls_preds)`` per level ``(B, 5 + nc, H, W)``
      (captured from the head's convs; the module must be in eval mode).
    """
    if family == "ultralytics":
        out = module(x)
        preds = out if module.training else out[1]
        if "one2one" in preds:  # an end-to-end head: both branches, on the one-to-many branch's feats
            feats = preds["one2many"]["feats"]
            return {k: _ultralytics_levels(preds[k], feats) for k in ("one2many", "one2one")}
        return _ultralytics_levels(preds, preds["feats"])
    if family == "yolov5":
        out = module(x)
        return list(out if module.training else out[1])
    if module.training:
        raise ValueError("raw_outputs: a YOLOX module in train mode returns its losses; call module.eval() first")
    head, got = module.head, {}
    hooks = [
        conv.register_forward_hook(lambda _m, _i, o, key=(kind, k): got.__setitem__(key, o))
        for kind in ("reg_preds", "obj_preds", "cls_preds")
        for k, conv in enumerate(getattr(head, kind))
    ]
    try:
        module(x)
    finally:
        for h in hooks:
            h.remove()
    return [torch().cat([got[(kind, k)] for kind in ("reg_preds", "obj_preds", "cls_preds")], 1) for k in range(len(head.stems))]


def _ultralytics_levels(preds, feats):
    cat = torch().cat([preds["boxes"], preds["scores"]], 1)
    sizes = [f.shape[2] * f.shape[3] for f in feats]
    return [c.reshape(*c.shape[:2], *f.shape[2:]) for c, f in zip(cat.split(sizes, 2), feats)]


def to_nhwc(t, family: str) -> np.ndarray:
    """An upstream per-level tensor from :func:`raw_outputs` in jaxyolo's layout:
    ``(B, H, W, C)``, yolov5 ``(B, H, W, na, 5 + nc)``."""
    a = t.detach().cpu().float().numpy()
    return a.transpose(0, 2, 3, 1, 4) if family == "yolov5" else a.transpose(0, 2, 3, 1)
