"""One ground-truth format for every loss: padded, masked, static-shape targets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo import _checks

__all__ = ["Targets"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Targets:
    """Ground-truth boxes of a batch, padded to ``max_boxes`` per image.

    Attributes:
      boxes: ``(B, M, 4)`` float32 normalised cxcywh in ``[0, 1]`` (fractions of
        the image width/height).  Padded rows are zeros.
      classes: ``(B, M)`` int32 class ids in ``[0, nc)``; padded rows are 0.
      mask: ``(B, M)`` bool, True for real boxes.  Real boxes come first in
        each image, in their original order (upstream tie-breaks depend on it).

    A pytree, so it passes through ``jax.jit``/``jax.vmap`` unchanged.  Shapes
    depend only on ``(B, M)``: batches with different numbers of boxes reuse
    the same compiled loss.
    """

    boxes: jax.Array
    classes: jax.Array
    mask: jax.Array

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]

    @property
    def max_boxes(self) -> int:
        return self.boxes.shape[1]

    @classmethod
    def from_rows(cls, rows, batch_size: int, max_boxes: int, *, nc: int | None = None, truncate: bool = False):
        """Build padded targets from upstream's flat rows (host-side, numpy).

        Args:
          rows: ``(N, 6)`` ``[image_index, class, cx, cy, w, h]`` with
            normalised cxcywh, the layout yolov5/ultralytics/YOLOX collate into.
          batch_size: B, the number of images (images without rows are empty).
          max_boxes: M, the padded number of boxes per image.
          nc: if given, class ids must lie in ``[0, nc)``.  With or without
            it, class ids must be non-negative integers representable as int32.
          truncate: keep the first ``max_boxes`` rows of an image that has
            more, instead of raising.

        Returns:
          ``Targets`` with ``(B, M, ...)`` jax arrays.  Each image's boxes keep
          their order in ``rows``.
        """
        batch_size = _checks.positive_int(batch_size, "batch_size")
        max_boxes = _checks.positive_int(max_boxes, "max_boxes")
        rows = np.asarray(rows, dtype=np.float64)
        if rows.size == 0:
            rows = rows.reshape(0, 6)
        if rows.ndim != 2 or rows.shape[1] != 6:
            raise ValueError(f"rows must have shape (N, 6) [image_index, class, cx, cy, w, h], got {rows.shape}")
        if not np.all(np.isfinite(rows)):
            raise ValueError("rows contain NaN or inf")
        image, cls_ids, xywh = rows[:, 0], rows[:, 1], rows[:, 2:]
        for name, col in (("image_index", image), ("class", cls_ids)):
            if np.any(col != np.round(col)) or np.any(col < 0):
                raise ValueError(f"rows[:, {0 if name == 'image_index' else 1}] ({name}) must hold non-negative integers")
        int32_max = np.iinfo(np.int32).max
        if np.any(cls_ids > int32_max):
            raise ValueError(
                f"rows[:, 1] (class) holds {int(cls_ids.max())}, which is not representable as int32 "
                f"(class ids must lie in [0, {int32_max}])"
            )
        if np.any(image >= batch_size):
            raise ValueError(f"rows hold image_index {int(image.max())} but batch_size is {batch_size}")
        if nc is not None and np.any(cls_ids >= nc):
            raise ValueError(f"rows hold class id {int(cls_ids.max())}, outside [0, nc={nc})")
        if np.any(xywh < 0) or np.any(xywh > 1):
            raise ValueError("rows[:, 2:6] must be normalised cxcywh in [0, 1]")

        boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
        classes = np.zeros((batch_size, max_boxes), np.int32)
        mask = np.zeros((batch_size, max_boxes), bool)
        image = image.astype(np.int64)
        for b in range(batch_size):
            idx = np.flatnonzero(image == b)
            if idx.size > max_boxes:
                if not truncate:
                    raise ValueError(
                        f"image {b} has {idx.size} boxes but max_boxes is {max_boxes}; "
                        "raise max_boxes or pass truncate=True"
                    )
                idx = idx[:max_boxes]
            n = idx.size
            boxes[b, :n] = xywh[idx]
            classes[b, :n] = cls_ids[idx]
            mask[b, :n] = True
        return cls(jnp.asarray(boxes), jnp.asarray(classes), jnp.asarray(mask))

    def to_rows(self) -> np.ndarray:
        """The inverse of :meth:`from_rows` (host-side): ``(N, 6)`` float32 rows,
        image by image, each image's boxes in slot order."""
        mask = np.asarray(self.mask)
        b, m = np.nonzero(mask)
        return np.concatenate(
            [
                b[:, None].astype(np.float32),
                np.asarray(self.classes)[b, m][:, None].astype(np.float32),
                np.asarray(self.boxes, dtype=np.float32)[b, m],
            ],
            axis=1,
        )

    def checked(self, *, nc: int | None = None, name: str = "targets") -> Targets:
        """Validate shapes and dtypes at trace time and return float32/int32 targets.

        Class ids are data, so they can only be checked when concrete: outside
        ``jit`` an id outside ``[0, nc)`` in a real row is a ``ValueError``.
        Under ``jit`` use :meth:`invalid` to poison the loss instead.  Non-finite
        boxes in real rows are never raised here (jit and eager agree): the
        losses poison themselves through :meth:`invalid`.
        """
        if not isinstance(self, Targets):
            raise TypeError(f"{name} must be a jaxyolo.Targets, got {type(self).__name__}")
        boxes = _checks.float_array(self.boxes, f"{name}.boxes")
        classes = _checks.int_array(self.classes, f"{name}.classes")
        mask = _checks.bool_array(self.mask, f"{name}.mask")
        _checks.ndim(boxes, 3, f"{name}.boxes", "(B, M, 4)")
        _checks.last_dim(boxes, 4, f"{name}.boxes", "normalised cx, cy, w, h")
        if classes.shape != boxes.shape[:2] or mask.shape != boxes.shape[:2]:
            raise ValueError(
                f"{name}.classes {tuple(classes.shape)} and {name}.mask {tuple(mask.shape)} "
                f"must both be (B, M) = {tuple(boxes.shape[:2])}"
            )
        if nc is not None and not isinstance(classes, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer):
            c, m = np.asarray(classes), np.asarray(mask)
            bad = m & ((c < 0) | (c >= nc))
            if bad.any():
                raise ValueError(f"{name}.classes holds id {int(c[bad][0])} in a real row, outside [0, nc={nc})")
        return Targets(boxes.astype(jnp.float32), classes.astype(jnp.int32), mask)

    def invalid_classes(self, nc: int) -> jax.Array:
        """Scalar bool: some real row has a class id outside ``[0, nc)``.

        The losses turn their total into NaN when this is True under ``jit``
        (where it cannot raise), so a bad label is never silently trained on.
        """
        return jnp.any(self.mask & ((self.classes < 0) | (self.classes >= nc)))

    def invalid(self, nc: int) -> jax.Array:
        """Scalar bool: some real row has a class id outside ``[0, nc)`` or a
        non-finite box coordinate.

        ``from_rows`` refuses both; this catches targets built directly (or
        corrupted on device).  The losses pass it to :func:`jaxyolo._math.nan_if`,
        so their value *and* gradients are NaN.
        """
        bad_box = jnp.any(self.mask & ~jnp.all(jnp.isfinite(self.boxes), axis=-1))
        return self.invalid_classes(nc) | bad_box
