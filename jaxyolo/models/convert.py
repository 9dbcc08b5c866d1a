"""PyTorch weights in and out, and jaxyolo's own weight directories.

A parameter's NNX path is its upstream ``state_dict`` key with flax leaf
names; one rule per leaf maps them::

    ("model", 22, "cv2", 0, 2, "kernel")  <->  "model.22.cv2.0.2.weight"   (kh, kw, I, O) <-> (O, I, kh, kw)
    (..., "bn", "scale" | "bias")          <->  "...bn.weight" | "...bn.bias"
    (..., "bn", "mean" | "var")            <->  "...bn.running_mean" | "...bn.running_var"

plus, per family, upstream buffers that are constants rather than state:

* every BatchNorm's ``num_batches_tracked`` (unused with a set momentum):
  written as 0, ignored when read;
* ultralytics ``model.<Detect>.dfl.conv.weight``, the fixed
  ``arange(reg_max)`` of ``DFL`` (the expectation in ``decode_yolov8``):
  written, and checked when read (none with ``reg_max = 1``, YOLO26);
* yolov5 ``model.24.anchors``, the anchors in grid units: read into the
  model's static anchors (pixels = anchors x stride), written back from them.

``from_torch`` / ``to_torch_state_dict`` need no torch for in-memory
``state_dict``s of numpy arrays; reading pickled ``.pt`` / ``.pth`` files
goes through :mod:`jaxyolo.models.upstream` (torch and the upstream package:
``pip install jaxyolo[torch]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxyolo.models import ultralytics as _ul
from jaxyolo.models import yolov5 as _v5
from jaxyolo.models.graph import STRIDES
from jaxyolo.models.registry import MODELS, build_model, get_spec

__all__ = ["from_torch", "to_torch_state_dict", "to_torch_arrays", "save_weights", "transfer_weights", "load_weights", "infer_nc", "torch_key", "WEIGHTS_FORMAT"]

WEIGHTS_FORMAT = "jaxyolo-weights/1"
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_SHOW = 8  # keys listed per kind in a mismatch error


def torch_key(path) -> str:
    """The upstream ``state_dict`` key of an NNX variable path."""
    *mods, leaf = path
    if leaf not in _LEAF:
        raise ValueError(f"no state_dict name for the variable {'/'.join(map(str, path))}")
    return ".".join([*map(str, mods), _LEAF[leaf]])


def _to_torch_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(3, 2, 0, 1)) if leaf == "kernel" else arr


def _torch_shape(leaf: str, shape) -> tuple:
    return (shape[3], shape[2], shape[0], shape[1]) if leaf == "kernel" else tuple(shape)


def _from_torch_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(2, 3, 1, 0)) if leaf == "kernel" else arr


def _detect_index(spec) -> int:
    if spec.family == "ultralytics":
        arch = spec.name[: -len(spec.scale)]
        return len(_ul.SCALES[arch][0]) - 1
    return len(_v5.YOLOV5) - 1


def _constants(model) -> dict[str, np.ndarray]:
    """The family's constant buffers (see the module docstring), torch layout."""
    spec = get_spec(model.name)
    if spec.family == "ultralytics":
        r = model.head.reg_max
        if r == 1:  # upstream's dfl is nn.Identity() when reg_max == 1 (YOLO26): no buffer
            return {}
        return {f"model.{_detect_index(spec)}.dfl.conv.weight": np.arange(r, dtype=np.float32).reshape(1, r, 1, 1)}
    if spec.family == "yolov5":
        grid = model.head.anchor_array / np.asarray(model.strides, np.float32)[:, None, None]
        return {f"model.{_detect_index(spec)}.anchors": grid.astype(np.float32)}
    return {}


def to_torch_arrays(state) -> dict[str, np.ndarray]:
    """An NNX state (a model's, or gradients from ``nnx.grad``) as ``{state_dict key:
    np.ndarray}`` in torch layout, float32 (no constants, no ``num_batches_tracked``)."""
    return {torch_key(p): _to_torch_layout(p[-1], np.array(v[...], np.float32)) for p, v in nnx.to_flat_state(state)}


def to_torch_state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters and BatchNorm statistics as upstream's ``state_dict``.

    Args:
      model: a model from :func:`build_model` / :func:`from_torch`.

    Returns:
      ``{key: np.ndarray}`` (float32; ``num_batches_tracked`` int64 zeros) that
      ``upstream_model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)`` accepts.
    """
    out = to_torch_arrays(nnx.state(model))
    for k in [k for k in out if k.endswith(".running_mean")]:
        out[k[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    out.update(_constants(model))
    return out


def _numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor (no torch import needed to read it)
        v = v.detach().cpu()
        return (v.float() if v.is_floating_point() else v).numpy()
    return np.asarray(v)


def infer_nc(name: str, state_dict) -> int | None:
    """The class count a ``name`` state_dict's prediction convs say, or None."""
    spec = get_spec(name)
    sd = state_dict
    if spec.family == "yolox":
        key, div, sub = "head.cls_preds.0.bias", 1, 0
    elif spec.family == "ultralytics":
        key, div, sub = f"model.{_detect_index(spec)}.cv3.0.2.bias", 1, 0
    else:
        d = _detect_index(spec)
        key, sub = f"model.{d}.m.0.bias", 5
        anchors = sd.get(f"model.{d}.anchors")
        div = np.shape(anchors)[1] if anchors is not None and np.ndim(anchors) == 3 else 3
    if key not in sd or np.ndim(sd[key]) != 1:
        return None
    return int(np.shape(sd[key])[0] // div - sub)


def _abstract_model(name, **kwargs):
    """``build_model(name, **kwargs)`` with abstract arrays (no random init: the weights come next)."""
    return nnx.eval_shape(lambda: build_model(name, **kwargs))


def _fill(model, state, values) -> None:
    """Give every variable of ``state`` (``model``'s flat state) its value from ``values[path]``."""
    nnx.update(model, nnx.from_flat_state([(p, type(v)(jnp.asarray(values[p], jnp.float32))) for p, v in state]))


def _mismatch_error(missing, unexpected, misshaped, name) -> ValueError:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            shown = ", ".join(items[:_SHOW]) + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")
            parts.append(f"{label}: {shown}")
    return ValueError(f"state_dict does not match {name}: " + "; ".join(parts))


def from_torch(source, *, name: str | None = None, nc: int | None = None, dtype=None):
    """A jaxyolo model with the weights and BatchNorm statistics of an upstream model.

    Args:
      source: an upstream checkpoint path (ultralytics ``.pt``, yolov5 ``.pt``
        -- pickled dicts holding the model, read with ``torch.load(...,
        weights_only=False)``: only load files you trust, as upstream -- or a
        YOLOX ``.pth`` ``{"model": state_dict}``), an in-memory ``state_dict``
        (``{key: tensor | np.ndarray}``), or an upstream ``nn.Module``.
      name: registry name (``"yolov8n"`` ...).  Inferred from an ultralytics
        or yolov5 model's yaml; required for a ``state_dict`` or YOLOX file.
      nc: number of classes; inferred from the prediction convs (an explicit
        value must agree).
      dtype: computation dtype, as in :func:`build_model`.

    Returns:
      the model (train mode, like a fresh torch module; call ``.eval()`` for
      inference), with ``class_names`` set when the checkpoint has them.

    Raises:
      ValueError: unknown name, disagreeing ``nc``, or keys missing /
        unexpected / of the wrong shape (one message listing the first few).
    """
    meta = {}
    if isinstance(source, (str, Path)):
        from jaxyolo.models import upstream

        sd, meta = upstream.read_checkpoint(source)
    elif isinstance(source, Mapping):
        sd = source
    elif hasattr(source, "state_dict"):
        from jaxyolo.models import upstream

        sd, meta = upstream.module_state(source)
    else:
        raise TypeError(f"source must be a checkpoint path, a state_dict or an upstream module, got {type(source).__name__}")
    if name is None:
        name = meta.get("name")
        if name is None:
            raise ValueError(f"name is required: the source does not say which model it is (one of {', '.join(MODELS)})")
    elif meta.get("name") not in (None, name):
        raise ValueError(f"name={name!r} but the checkpoint is a {meta['name']}")
    spec = get_spec(name)
    sd = {k: _numpy(v) for k, v in sd.items()}
    found = infer_nc(name, sd)
    if nc is None:
        if found is None:
            raise ValueError(f"nc is required: no class count found in the {name} state_dict")
        nc = found
    elif found is not None and found != nc:
        raise ValueError(f"nc={nc} but the checkpoint's {name} predicts {found} classes")

    kwargs = {}
    if spec.family == "yolov5":
        key = f"model.{_detect_index(spec)}.anchors"
        if key in sd and sd[key].ndim == 3:
            kwargs["anchors"] = sd[key].astype(np.float32) * np.asarray(STRIDES, np.float32)[: len(sd[key]), None, None]
    model = _abstract_model(name, nc=nc, dtype=dtype, **kwargs)

    state = nnx.to_flat_state(nnx.state(model))
    expected = {torch_key(p): p for p, _ in state}
    constants = _constants(model)
    bn_counters = {".".join(map(str, p[:-1])) + ".num_batches_tracked" for p, _ in state if p[-1] == "mean"}
    known = expected.keys() | constants.keys() | bn_counters
    missing = [k for k in list(expected) + list(constants) if k not in sd]
    unexpected = [k for k in sd if k not in known]
    misshaped = []
    values = {}
    for path, var in state:
        k = torch_key(path)
        if k in sd:
            arr = _from_torch_layout(path[-1], sd[k]) if sd[k].ndim == 4 else sd[k]
            if arr.shape != var.shape:
                misshaped.append(f"{k} {tuple(sd[k].shape)} (expected {_torch_shape(path[-1], var.shape)})")
            values[path] = arr.astype(np.float32)
    for k, want in constants.items():
        if k in sd and (sd[k].shape != want.shape or not np.allclose(sd[k], want)):
            misshaped.append(f"{k} (expected the constant {want.reshape(-1)[:4].tolist()}...)")
    if missing or unexpected or misshaped:
        raise _mismatch_error(missing, unexpected, misshaped, name)
    _fill(model, state, values)
    if meta.get("names") is not None:
        model.class_names = tuple(meta["names"])
    return model


# ------------------------------------------------------------- weight dirs


def transfer_weights(dst, src) -> tuple[int, int, list]:
    """Copy into ``dst`` every parameter and BatchNorm statistic of ``src``
    whose path and shape match (ultralytics' ``intersect_dicts`` rule for
    pretrained weights): same architecture with another ``nc`` keeps ``dst``'s
    freshly initialised class predictions.

    Returns:
      ``(copied, total, skipped)``: tensors copied, ``dst``'s tensor count,
      and the paths of ``dst`` left as they were.
    """
    src_flat = {p: v for p, v in nnx.to_flat_state(nnx.state(src))}
    dst_flat = list(nnx.to_flat_state(nnx.state(dst)))
    take = {p: np.asarray(src_flat[p][...]) for p, v in dst_flat if p in src_flat and tuple(src_flat[p].shape) == tuple(v.shape)}
    nnx.update(dst, nnx.from_flat_state([(p, type(v)(jnp.asarray(take[p], v[...].dtype))) for p, v in dst_flat if p in take]))
    skipped = [".".join(map(str, p)) for p, _ in dst_flat if p not in take]
    return len(take), len(dst_flat), skipped


def save_weights(model, directory, *, names=None) -> Path:
    """Write ``model`` to ``directory``: ``params/`` (orbax, flat ``{path: array}``
    of parameters and BatchNorm statistics) and ``model.json`` (format,
    ``name``, ``nc``, ``family``, ``head_type``, ``names``).

    Args:
      names: class names (default: ``model.class_names``); ``len == nc``.
    """
    import orbax.checkpoint as ocp

    names = model.class_names if names is None else tuple(names)
    if names is not None and len(names) != model.nc:
        raise ValueError(f"names has {len(names)} entries but the model has nc={model.nc}")
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", flat, force=True)
    spec = get_spec(model.name)
    meta = dict(format=WEIGHTS_FORMAT, name=model.name, nc=model.nc, family=spec.family, head_type=spec.head_type,
                names=None if names is None else list(names))
    if spec.family == "yolov5":
        meta["anchors"] = model.head.anchor_array.tolist()
    (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_weights(path, *, name: str | None = None, nc: int | None = None, dtype=None):
    """A model from a :func:`save_weights` directory, or from an upstream
    checkpoint file (``.pt`` / ``.pth``, through :func:`from_torch` with
    ``name`` / ``nc``).

    Returns the model in train mode with ``class_names`` from the weights.
    """
    path = Path(path)
    if path.is_file():
        return from_torch(path, name=name, nc=nc, dtype=dtype)
    meta_file = path / "model.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is neither a checkpoint file nor a jaxyolo weights directory (no model.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
    for arg, value in (("name", name), ("nc", nc)):
        if value is not None and value != meta[arg]:
            raise ValueError(f"{arg}={value!r} but {path} holds {arg}={meta[arg]!r}")
    kwargs = {"anchors": np.asarray(meta["anchors"], np.float32)} if "anchors" in meta else {}
    model = _abstract_model(meta["name"], nc=meta["nc"], dtype=dtype, **kwargs)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        flat = ckpt.restore(path.absolute() / "params")
    state = nnx.to_flat_state(nnx.state(model))
    keys = {".".join(map(str, p)) for p, _ in state}
    if keys != set(flat):
        raise _mismatch_error(sorted(keys - set(flat)), sorted(set(flat) - keys), [], meta["name"])
    bad = [k for p, v in state if np.shape(flat[k := ".".join(map(str, p))]) != v.shape]
    if bad:
        raise _mismatch_error([], [], bad, meta["name"])
    _fill(model, state, {p: flat[".".join(map(str, p))] for p, _ in state})
    if meta.get("names") is not None:
        model.class_names = tuple(meta["names"])
    return model
