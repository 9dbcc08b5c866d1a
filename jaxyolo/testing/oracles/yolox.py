"""yolox==0.3.0 ``YOLOXHead.get_losses`` / ``get_assignments`` as numerical oracles.

The head's own methods are called (never copied): the inputs are built the way
``YOLOXHead.forward`` builds them in training mode -- ``get_output_and_grid``
per level for the decoded outputs, ``x_shifts``/``y_shifts`` from its grid,
``expanded_strides`` filled with the stride, ``origin_preds`` from the raw
regression channels -- starting from channels-last ``(B, H, W, 5 + nc)`` raw
head outputs, so no convolution weights are involved.

Labels are upstream's padded ``(B, M, 5)`` ``[class, cx, cy, w, h]`` in pixels,
made from :class:`jaxyolo.Targets` with the same float32 multiplication the JAX
loss uses (so both sides see bit-identical GT boxes).  Real rows are moved to
the front of each image (upstream takes the first ``num_gt`` rows) and the
matched GT indices are mapped back to ``Targets`` slots.
"""

from __future__ import annotations

import numpy as np

from jaxyolo.testing.oracles._torch import grad_nhwc, nhwc_to_torch, numpy, tensor, torch, yolox_modules

__all__ = ["yolox_head", "yolox_labels", "yolox_get_losses", "yolox_get_assignments", "yolox_assign_decoded"]


def yolox_head(nc: int, *, strides=(8, 16, 32), use_l1: bool = False):
    """A small-width ``YOLOXHead`` (its convolutions are never run)."""
    yolo_head, _, _ = yolox_modules()
    head = yolo_head.YOLOXHead(nc, width=0.0625, strides=list(strides), in_channels=[256] * len(strides))
    head.use_l1 = use_l1
    head.train()
    return head


def _image_size(preds_nhwc, strides, image_size):
    if image_size is not None:
        return float(image_size[0]), float(image_size[1])
    h, w = preds_nhwc[0].shape[1] * strides[0], preds_nhwc[0].shape[2] * strides[0]
    return float(h), float(w)


def yolox_labels(targets, image_size):
    """``(labels (B, M, 5) float32 pixels, slots)``: upstream labels and, per image,
    the ``Targets`` slot index of each compacted row."""
    img_h, img_w = image_size
    boxes = np.asarray(targets.boxes, np.float32) * np.asarray([img_w, img_h, img_w, img_h], np.float32)
    classes = np.asarray(targets.classes)
    mask = np.asarray(targets.mask)
    b, m = mask.shape
    labels = np.zeros((b, m, 5), np.float32)
    slots = []
    for i in range(b):
        idx = np.flatnonzero(mask[i])
        labels[i, : idx.size, 0] = classes[i, idx]
        labels[i, : idx.size, 1:] = boxes[i, idx]
        slots.append(idx)
    return labels, slots


def _forward_inputs(head, preds_nhwc, strides):
    """Leaves and the ``get_losses`` inputs, as ``YOLOXHead.forward`` builds them."""
    t = torch()
    leaves = [nhwc_to_torch(p, grad=True) for p in preds_nhwc]
    outputs, origin_preds, x_shifts, y_shifts, expanded_strides = [], [], [], [], []
    for k, (leaf, stride) in enumerate(zip(leaves, strides)):
        reg_output, obj_output, cls_output = leaf[:, :4], leaf[:, 4:5], leaf[:, 5:]
        output = t.cat([reg_output, obj_output, cls_output], 1)
        output, grid = head.get_output_and_grid(output, k, stride, leaf.type())
        x_shifts.append(grid[:, :, 0])
        y_shifts.append(grid[:, :, 1])
        expanded_strides.append(t.zeros(1, grid.shape[1]).fill_(stride).type_as(leaf))
        if head.use_l1:
            batch, _, hsize, wsize = reg_output.shape
            reg = reg_output.view(batch, 1, 4, hsize, wsize).permute(0, 1, 3, 4, 2).reshape(batch, -1, 4)
            origin_preds.append(reg.clone())
        outputs.append(output)
    return leaves, t.cat(outputs, 1), origin_preds, x_shifts, y_shifts, expanded_strides


def yolox_get_losses(preds_nhwc, targets, *, strides=(8, 16, 32), use_l1=False, image_size=None):
    """Upstream loss, components and gradients.

    Args:
      preds_nhwc: ``L`` arrays ``(B, H_l, W_l, 5 + nc)`` raw outputs.
      targets: :class:`jaxyolo.Targets` (normalised cxcywh).
      strides, use_l1, image_size: as :func:`jaxyolo.yolox_loss`.

    Returns:
      dict with numpy float ``total, iou, obj, cls, l1, num_fg_per_gt`` and
      ``grads``: a list of ``(B, H_l, W_l, 5 + nc)`` gradients of ``total``.
    """
    strides = tuple(strides)
    preds_nhwc = [np.asarray(p, np.float32) for p in preds_nhwc]
    nc = preds_nhwc[0].shape[-1] - 5
    head = yolox_head(nc, strides=strides, use_l1=use_l1)
    labels, _ = yolox_labels(targets, _image_size(preds_nhwc, strides, image_size))
    leaves, outputs, origin_preds, xs, ys, es = _forward_inputs(head, preds_nhwc, strides)
    loss, iou, obj, cls, l1, per_gt = head.get_losses(
        None, xs, ys, es, tensor(labels), outputs, origin_preds, dtype=leaves[0].dtype
    )
    loss.backward()

    def f(x):
        return float(numpy(x)) if hasattr(x, "detach") else float(x)

    return dict(
        total=f(loss),
        iou=f(iou),
        obj=f(obj),
        cls=f(cls),
        l1=f(l1),
        num_fg_per_gt=f(per_gt),
        grads=[grad_nhwc(leaf) for leaf in leaves],
    )


def yolox_get_assignments(preds_nhwc, targets, *, strides=(8, 16, 32), image_size=None):
    """Upstream SimOTA per image, expanded to all anchors.

    Returns:
      dict of numpy arrays: ``fg_mask`` ``(B, A)`` bool, ``matched_gt`` ``(B, A)``
      int (``Targets`` slot, ``-1`` for background), ``matched_iou`` ``(B, A)``
      float32 (0 for background), ``num_fg`` ``(B,)`` int.  Images without GTs
      are all background (``get_losses`` skips them).
    """
    t = torch()
    strides = tuple(strides)
    preds_nhwc = [np.asarray(p, np.float32) for p in preds_nhwc]
    nc = preds_nhwc[0].shape[-1] - 5
    head = yolox_head(nc, strides=strides)
    labels_np, slots = yolox_labels(targets, _image_size(preds_nhwc, strides, image_size))
    labels = tensor(labels_np)
    _, outputs, _, xs, ys, es = _forward_inputs(head, preds_nhwc, strides)
    outputs = outputs.detach()
    xs, ys, es = t.cat(xs, 1), t.cat(ys, 1), t.cat(es, 1)
    bbox_preds, obj_preds, cls_preds = outputs[:, :, :4], outputs[:, :, 4].unsqueeze(-1), outputs[:, :, 5:]
    batch, num_anchors = outputs.shape[:2]
    fg = np.zeros((batch, num_anchors), bool)
    matched = np.full((batch, num_anchors), -1, np.int64)
    ious = np.zeros((batch, num_anchors), np.float32)
    num_fg = np.zeros((batch,), np.int64)
    with t.no_grad():
        for b in range(batch):
            num_gt = len(slots[b])
            if num_gt == 0:
                continue
            _, fg_mask, pred_ious, matched_inds, n = head.get_assignments(
                b,
                num_gt,
                num_anchors,
                labels[b, :num_gt, 1:5],
                labels[b, :num_gt, 0],
                bbox_preds[b],
                es,
                xs,
                ys,
                cls_preds,
                bbox_preds,
                obj_preds,
                labels,
                None,
            )
            fg_mask = numpy(fg_mask).astype(bool)
            fg[b] = fg_mask
            matched[b, fg_mask] = slots[b][numpy(matched_inds)]
            ious[b, fg_mask] = numpy(pred_ious)
            num_fg[b] = int(n)
    return dict(fg_mask=fg, matched_gt=matched, matched_iou=ious, num_fg=num_fg)


def yolox_assign_decoded(pred_boxes, obj_logits, cls_logits, grid, strides, gt_boxes, gt_classes):
    """Upstream ``get_assignments`` of one image from already-decoded inputs.

    For constructed cases (exact boxes, chosen IoUs) where going through
    ``exp`` would blur the numbers.

    Args:
      pred_boxes: ``(A, 4)`` decoded cxcywh pixels.
      obj_logits: ``(A,)``; cls_logits: ``(A, nc)``.
      grid: ``(A, 2)`` cell ``(x, y)``; strides: ``(A,)`` pixels.
      gt_boxes: ``(n, 4)`` cxcywh pixels (``n >= 1``, real GTs only);
      gt_classes: ``(n,)`` ints.

    Returns:
      dict: ``fg_mask`` ``(A,)``, ``matched_gt`` ``(A,)`` (``-1`` background),
      ``matched_iou`` ``(A,)``, ``num_fg``.
    """
    t = torch()
    cls_logits = np.asarray(cls_logits, np.float32)
    nc = cls_logits.shape[-1]
    head = yolox_head(nc, strides=(8,))
    num_anchors, num_gt = len(pred_boxes), len(gt_boxes)
    bbox = tensor(pred_boxes)[None]
    obj = tensor(obj_logits).reshape(1, num_anchors, 1)
    cls = tensor(cls_logits)[None]
    grid = np.asarray(grid, np.float32)
    xs, ys, es = tensor(grid[None, :, 0]), tensor(grid[None, :, 1]), tensor(np.asarray(strides, np.float32)[None])
    gt = tensor(gt_boxes)
    labels = t.cat([tensor(np.asarray(gt_classes, np.float32))[:, None], gt], 1)[None]
    with t.no_grad():
        _, fg_mask, pred_ious, matched_inds, n = head.get_assignments(
            0, num_gt, num_anchors, gt, labels[0, :, 0], bbox[0], es, xs, ys, cls, bbox, obj, labels, None
        )
    fg_mask = numpy(fg_mask).astype(bool)
    matched = np.full((num_anchors,), -1, np.int64)
    matched[fg_mask] = numpy(matched_inds)
    ious = np.zeros((num_anchors,), np.float32)
    ious[fg_mask] = numpy(pred_ious)
    return dict(fg_mask=fg_mask, matched_gt=matched, matched_iou=ious, num_fg=int(n))
