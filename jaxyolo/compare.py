"""``jaxyolo convert`` and ``jaxyolo compare``: PyTorch checkpoints to jaxyolo
weights, and the user-facing parity check between the two.

    jaxyolo convert FILE [--name N] [--nc C] --out DIR
    jaxyolo compare --weights FILE [--name N] [--images DIR] [--labels DIR] [--img-size S]

``compare`` runs the upstream PyTorch model (the checkpoint's own pickled
module, or the upstream class loaded with the ``state_dict``) and the
converted jaxyolo model in eval mode on the same images (random ones without
``--images``) and prints, per level, the largest absolute difference of the
raw predictions and that difference relative to the largest upstream value.
With YOLO labels (``--labels``, or ``labels/`` next to ``images/``) it also
prints the loss and its components on both sides: the upstream model's own
loss (ultralytics ``DetectionModel.loss``, yolov5 ``ComputeLoss``, YOLOX's
head in training mode) with default hyperparameters, BatchNorm on its running
statistics, against ``yolov8_loss`` / ``e2e_loss`` / ``yolov5_loss`` /
``yolox_loss``.  End-to-end models (YOLO26, YOLOv10) are compared on both
branches (``one2many``, ``one2one``), their loss as ``E2ELoss`` in its first
epoch (one-to-many weight 0.8).
Needs torch and the upstream package (``pip install jaxyolo[torch]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["convert", "compare", "read_images", "yolox_label_array"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def convert(source, out, *, name: str | None = None, nc: int | None = None, log=print) -> Path:
    """``from_torch(source)`` written with ``save_weights`` to ``out``."""
    from jaxyolo.models import from_torch, save_weights

    model = from_torch(source, name=name, nc=nc)
    path = save_weights(model, out)
    names = "" if model.class_names is None else f", classes {', '.join(model.class_names[:5])}{' ...' if model.nc > 5 else ''}"
    log(f"jaxyolo convert: {source} -> {path} ({model.name}, nc={model.nc}{names})")
    return path


def read_images(directory, *, img_size: int, labels=None, max_images: int | None = None):
    """Images of ``directory`` resized to ``img_size`` squares and their YOLO labels.

    Returns:
      ``(images (N, S, S, 3) float32 [0, 1] RGB, rows (K, 6) [image, class,
      cx, cy, w, h] normalised or None, paths)``.  Labels come from
      ``labels`` or from ``labels/`` next to an ``images/`` directory, one
      ``<stem>.txt`` per image (missing file: no boxes).
    """
    from PIL import Image

    directory = Path(directory)
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:max_images]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {directory}")
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(np.asarray(im.convert("RGB").resize((img_size, img_size), Image.BILINEAR), np.float32) / 255.0)
    if labels is None and directory.name == "images" and (directory.parent / "labels").is_dir():
        labels = directory.parent / "labels"
    rows = None
    if labels is not None:
        rows = []
        for i, p in enumerate(paths):
            f = Path(labels) / f"{p.stem}.txt"
            if f.is_file():
                rows += [[i, *r] for r in _label_file(f)]
        rows = np.asarray(rows, np.float32).reshape(-1, 6)
    return np.stack(images), rows, paths


def _label_file(path: Path) -> list[list[float]]:
    """The ``[class, cx, cy, w, h]`` rows of one YOLO label file."""
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        vals = line.split()
        if not vals:
            continue
        try:
            row = [float(v) for v in vals[:5]]
        except ValueError:
            row = []
        if len(row) != 5:
            raise ValueError(f"{path}:{lineno}: expected 'class cx cy w h', got {line!r}")
        out.append(row)
    return out


def _upstream_loss(module, family, x, raw, rows, targets, image_size):
    """The upstream model's own loss on its eval-mode outputs: ``(total, {component: value})``."""
    from jaxyolo.models import upstream

    t = upstream.torch()
    with t.no_grad():
        if family == "ultralytics":
            from ultralytics.cfg import get_cfg

            module.args = get_cfg()  # upstream's default hyperparameters (box 7.5, cls 0.5, dfl 1.5)
            module.criterion = None
            reg = 4 * module.model[-1].reg_max

            def branch(levels):
                cat = t.cat([r.reshape(*r.shape[:2], -1) for r in levels], 2)
                return {"boxes": cat[:, :reg], "scores": cat[:, reg:], "feats": levels}

            # an end-to-end model: E2ELoss at its first epoch's weights (o2m 0.8), the one-to-one items
            preds = {k: branch(v) for k, v in raw.items()} if isinstance(raw, dict) else branch(raw)
            batch = {"batch_idx": t.from_numpy(rows[:, 0]), "cls": t.from_numpy(rows[:, 1:2]), "bboxes": t.from_numpy(rows[:, 2:])}
            loss, items = module.loss(batch, preds)
            items = items.values() if isinstance(items, dict) else items
            names = ("box", "cls", "dfl" if reg > 4 else "l1")  # upstream calls YOLO26's L1 term dfl_loss
            return float(loss.sum()), dict(zip(names, (float(v) for v in items)))
        if family == "yolov5":
            from yolov5.utils.loss import ComputeLoss

            from jaxyolo import Yolov5LossConfig

            module.hyp = Yolov5LossConfig().hyp()
            loss, items = ComputeLoss(module)(list(raw), t.from_numpy(rows))
            return float(loss.sum()), dict(zip(("box", "obj", "cls"), map(float, items)))
        # YOLOX: the head computes its loss only in training mode; BatchNorm stays on running statistics.
        labels = yolox_label_array(targets, image_size)
        module.train()
        for m in module.modules():
            if isinstance(m, t.nn.BatchNorm2d):
                m.eval()
        try:
            out = module(x, t.from_numpy(labels))
        finally:
            module.eval()
        return float(out["total_loss"]), {k: float(out[f"{k}_loss"]) for k in ("iou", "conf", "cls", "l1")}


def yolox_label_array(targets, image_size):
    """``Targets`` -> YOLOX's padded ``(B, M, 5)`` ``[class, cx, cy, w, h]`` pixels
    (upstream reads the first rows with a non-zero sum: the real rows must come
    first, as ``Targets.from_rows`` puts them; the same float32 product as ``yolox_loss``)."""
    h, w = image_size
    boxes = np.asarray(targets.boxes, np.float32) * np.asarray([w, h, w, h], np.float32)
    mask = np.asarray(targets.mask)
    labels = np.concatenate([np.asarray(targets.classes, np.float32)[..., None], boxes], -1)
    return np.where(mask[..., None], labels, 0.0).astype(np.float32)


def _jax_loss(model, preds, targets):
    """jaxyolo's loss of the model's family (jitted), components named as upstream's."""
    import jax

    from jaxyolo.models.registry import model_loss

    total, parts = jax.jit(lambda p, tg: model_loss(model, p, tg))(preds, targets)
    if model.head_type == "yolox":
        parts = {"iou": parts["iou"], "conf": parts["obj"], "cls": parts["cls"], "l1": parts["l1"]}
    return total, parts


def compare(weights, *, name: str | None = None, nc: int | None = None, images=None, labels=None, img_size: int = 640,
            batch: int = 2, max_images: int = 16, seed: int = 0, log=print) -> dict:
    """Run the upstream and the converted model on the same images (see the module docstring).

    Returns:
      ``{"name", "levels": [{"branch", "stride", "shape", "max_abs", "max_ref", "rel"}], "loss": None |
      {"jaxyolo": (total, parts), "upstream": (total, parts), "rel"}}``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxyolo.models import from_torch, upstream
    from jaxyolo.targets import Targets

    module, name = upstream.load_module(weights, name=name, nc=nc)
    model = from_torch(module, name=name)
    model.eval()
    family = model.family
    rows = None
    if images is None:
        if labels is not None:
            raise ValueError("--labels needs --images")
        x = np.random.default_rng(seed).random((batch, img_size, img_size, 3), dtype=np.float32)
        source = f"{batch} random images"
    else:
        x, rows, paths = read_images(images, img_size=img_size, labels=labels, max_images=max_images)
        source = f"{len(paths)} images from {images}"
    log(f"jaxyolo compare: {name} ({family}, nc={model.nc}), {source}, {img_size}x{img_size}, eval mode")

    t = upstream.torch()
    xt = upstream.torch_images(x, family)
    with t.no_grad():
        raw = upstream.raw_outputs(module, family, xt)
    jax_preds = nnx.jit(lambda m, im: m(im))(model, jnp.asarray(x))
    # an end-to-end model's two branches, one2many then one2one; else one unnamed branch
    branches = list(raw) if isinstance(raw, dict) else [None]
    levels = []
    col = (lambda b: f"{b:>8} ") if isinstance(raw, dict) else (lambda b: "")
    log(f"{col('branch')}{'level':>5} {'stride':>6} {'shape':>18} {'max|diff|':>10} {'max|ref|':>10} {'rel':>9}")
    for b in branches:
        ref = [upstream.to_nhwc(r, family) for r in (raw if b is None else raw[b])]
        ours = [np.asarray(p, np.float32) for p in (jax_preds if b is None else jax_preds[b])]
        for i, (a, r, s) in enumerate(zip(ours, ref, model.strides)):
            max_abs, max_ref = float(np.abs(a - r).max()), float(np.abs(r).max())
            levels.append(dict(branch=b, stride=s, shape=r.shape[1:], max_abs=max_abs, max_ref=max_ref, rel=max_abs / max(max_ref, 1e-30)))
            log(f"{col(b)}{i:>5} {s:>6} {'x'.join(map(str, r.shape[1:])):>18} {max_abs:>10.2e} {max_ref:>10.3g} {levels[-1]['rel']:>9.2e}")

    loss = None
    if rows is not None:
        counts = np.bincount(rows[:, 0].astype(int), minlength=len(x))
        targets = Targets.from_rows(rows, batch_size=len(x), max_boxes=max(int(counts.max()), 1), nc=model.nc)
        up_total, up_parts = _upstream_loss(module, family, xt, raw, rows, targets, x.shape[1:3])
        jx_total, jx_parts = jax.device_get(_jax_loss(model, jax_preds, targets))
        jx_total, jx_parts = float(jx_total), {k: float(v) for k, v in jx_parts.items()}
        rel = abs(jx_total - up_total) / max(abs(up_total), 1e-30)
        loss = {"jaxyolo": (jx_total, jx_parts), "upstream": (up_total, up_parts), "rel": rel}
        log(f"loss ({len(rows)} boxes): jaxyolo {jx_total:.6g}  upstream {up_total:.6g}  rel {rel:.2e}")
        for k in up_parts:
            log(f"  {k:>5}: jaxyolo {jx_parts[k]:.6g}  upstream {up_parts[k]:.6g}")
    elif images is not None:
        log("no labels found: the loss is not compared (pass --labels DIR)")
    return {"name": name, "levels": levels, "loss": loss}


# ------------------------------------------------------------------ CLI


def convert_command(args) -> int:
    """``jaxyolo convert`` (parser in :mod:`jaxyolo.cli`)."""
    try:
        convert(args.file, args.out, name=args.name, nc=args.nc)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def compare_command(args) -> int:
    """``jaxyolo compare`` (parser in :mod:`jaxyolo.cli`); exit status 1 when a
    level's relative difference exceeds ``--tol``."""
    try:
        res = compare(args.weights, name=args.name, nc=args.nc, images=args.images, labels=args.labels,
                      img_size=args.img_size, batch=args.batch, max_images=args.max_images, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.tol is not None:
        worst = max(lv["rel"] for lv in res["levels"])
        if worst > args.tol or (res["loss"] is not None and res["loss"]["rel"] > args.tol):
            print(f"FAIL: relative difference above --tol {args.tol:g}")
            return 1
    return 0
