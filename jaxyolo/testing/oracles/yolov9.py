"""Our own small PyTorch reference of YOLOv9's ``utils/loss_tal.py`` loss and its
``utils/tal/assigner.py`` TaskAlignedAssigner (YOLOv9 ships no package).

Written from the published YOLOv9 code's semantics (seed 001 walks through
``loss_tal.py``), in plain torch, dense and eager like upstream:

* assigner: class score of each GT's class at every anchor; CIoU (YOLOv5 /
  YOLOv9 ``utils/metrics.bbox_iou`` convention -- the installed
  ``yolov5.utils.metrics.bbox_iou`` is that function and is called here)
  between every GT and every prediction, clamped at 0; ``align = s**a *
  ciou**b`` dense; in-GT test without enlargement (``min(ltrb) > 1e-9``);
  ``torch.topk`` of ``align * in_gt`` per GT with padded GTs pointed at
  anchor 0 and multiply-counted anchors dropped; ``mask_pos = topk * in_gt *
  mask_gt``; anchors with several positives go to ``argmax`` over *all* GTs of
  the dense overlaps; targets normalised by ``max_pos(ov) / (max_pos(align) +
  eps)``.
* loss: DFL decode ``softmax . arange``, assigner in pixels, target boxes
  divided by the stride, ``BCEWithLogits(pos_weight=cls_pw)`` (optionally
  wrapped in YOLOv5's focal loss, ``fl_gamma > 0``) summed over
  ``max(tss, 1)``, CIoU box loss and DFL (``bbox2dist(..., reg_max - 1)``
  clamped to ``reg_max - 1 - 0.01``) on the foreground weighted by the target
  score sums, gains 7.5 / 0.5 / 1.5, ``loss.sum() * B``.  The "VFL way" line
  YOLOv9 leaves commented out is available as ``cls_loss="varifocal"``.
"""

from __future__ import annotations

import numpy as np

from jaxyolo.testing.oracles._torch import _import, grad_nhwc, nhwc_to_torch, numpy, tensor, torch

__all__ = ["Yolov9Assigner", "yolov9_loss"]


def _bbox_iou():
    return _import("yolov5.utils.metrics").bbox_iou


class Yolov9Assigner:
    """YOLOv9's TaskAlignedAssigner semantics (see the module docstring)."""

    def __init__(self, topk=10, num_classes=80, alpha=0.5, beta=6.0, eps=1e-9):
        self.topk, self.nc, self.alpha, self.beta, self.eps = topk, num_classes, alpha, beta, eps
        self.captured = {}

    def __call__(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt):
        """Shapes as upstream: ``(b, A, nc)``, ``(b, A, 4)`` px, ``(A, 2)`` px,
        ``(b, n, 1)``, ``(b, n, 4)`` px xyxy, ``(b, n, 1)``."""
        t = torch()
        with t.no_grad():
            return self._assign(t, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt)

    def _assign(self, t, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt):
        F = t.nn.functional
        b, n = gt_bboxes.shape[:2]
        na = pd_scores.shape[1]
        if n == 0:
            return (
                t.full_like(pd_scores[..., 0], self.nc),
                t.zeros_like(pd_bboxes),
                t.zeros_like(pd_scores),
                t.zeros_like(pd_scores[..., 0], dtype=t.bool),
                t.zeros_like(pd_scores[..., 0], dtype=t.long),
            )
        cls = gt_labels.long().squeeze(-1)  # (b, n)
        # dense metrics over every (GT, anchor) pair, padded GTs included
        scores = pd_scores.gather(2, cls[:, None, :].expand(-1, na, -1)).permute(0, 2, 1)  # (b, n, A)
        ciou = _bbox_iou()(gt_bboxes.unsqueeze(2), pd_bboxes.unsqueeze(1), xywh=False, CIoU=True)
        overlaps = ciou.squeeze(3).clamp(0)
        align = scores.pow(self.alpha) * overlaps.pow(self.beta)
        # anchor centre strictly inside the raw GT box
        lt, rb = gt_bboxes[:, :, None, :2], gt_bboxes[:, :, None, 2:]
        deltas = t.cat((anc_points[None, None] - lt, rb - anc_points[None, None]), -1)
        in_gts = (deltas.amin(-1) > self.eps).to(align.dtype)
        # top-k per GT of the in-GT metric
        idx = t.topk(align * in_gts, self.topk, dim=-1, largest=True).indices  # (b, n, k)
        idx = t.where(mask_gt.bool().expand(-1, -1, self.topk), idx, 0)
        counts = t.zeros_like(align).scatter_add_(-1, idx, t.ones_like(idx, dtype=align.dtype))
        is_topk = t.where(counts > 1, t.zeros_like(counts), counts)
        mask_pos = is_topk * in_gts * mask_gt
        self.captured["align_metric"] = numpy(align.clone())
        self.captured["overlaps"] = numpy(overlaps.clone())
        # several positives: the GT of highest dense overlap wins
        fg = mask_pos.sum(-2)
        if fg.max() > 1:
            multi = (fg.unsqueeze(1) > 1).expand(-1, n, -1)
            best = F.one_hot(overlaps.argmax(1), n).permute(0, 2, 1).to(overlaps.dtype)
            mask_pos = t.where(multi, best, mask_pos)
            fg = mask_pos.sum(-2)
        gt_idx = mask_pos.argmax(-2)  # (b, A)
        self.captured["mask_pos"] = numpy(mask_pos.clone()).astype(bool)
        labels = cls.gather(1, gt_idx)
        boxes = gt_bboxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))
        target_scores = F.one_hot(labels, self.nc) * (fg[..., None] > 0)
        align = align * mask_pos
        pos_align = align.amax(-1, keepdim=True)
        pos_ov = (overlaps * mask_pos).amax(-1, keepdim=True)
        norm = (align * pos_ov / (pos_align + self.eps)).amax(-2).unsqueeze(-1)
        return labels, boxes, target_scores * norm, fg.bool(), gt_idx


def _focal(bce, pred, true, gamma, alpha=0.25):
    t = torch()
    p = t.sigmoid(pred)
    p_t = true * p + (1 - true) * (1 - p)
    return bce * (true * alpha + (1 - true) * (1 - alpha)) * (1.0 - p_t) ** gamma


def yolov9_loss(preds_nhwc, targets, *, strides=(8, 16, 32), nc=80, reg_max=16, topk=10, alpha=0.5, beta=6.0,
                box=7.5, cls=0.5, dfl=1.5, cls_pw=1.0, fl_gamma=0.0, cls_loss="bce"):
    """YOLOv9 ``ComputeLoss`` forward + backward on channels-last inputs.

    Args:
      preds_nhwc: per level ``(B, H, W, 4*reg_max + nc)``.
      targets: :class:`jaxyolo.Targets` (fed as ``to_rows`` rows) or ``(N, 6)``
        rows ``[img, cls, cx, cy, w, h]`` normalised.

    Returns:
      dict like :func:`jaxyolo.testing.oracles.ultralytics.v8_detection_loss`:
      ``total``, ``components`` (box, cls, dfl), per-level NHWC ``grads`` and
      ``assign`` (assigner outputs, ``align_metric``/``overlaps``/``mask_pos``).
    """
    t = torch()
    F = t.nn.functional
    tal = _import("ultralytics.utils.tal")  # make_anchors / dist2bbox are YOLOv9's, unchanged
    rows = targets.to_rows() if hasattr(targets, "to_rows") else np.asarray(targets, np.float32).reshape(-1, 6)
    leaves = [nhwc_to_torch(p, grad=True) for p in preds_nhwc]
    b, no = leaves[0].shape[:2]
    pred_distri, pred_scores = t.cat([x.view(b, no, -1) for x in leaves], 2).split((reg_max * 4, nc), 1)
    pred_scores = pred_scores.permute(0, 2, 1).contiguous()
    pred_distri = pred_distri.permute(0, 2, 1).contiguous()
    stride_t = t.tensor(strides, dtype=t.float32)
    imgsz = t.tensor(leaves[0].shape[2:], dtype=t.float32) * stride_t[0]  # (h, w)
    anchor_points, stride_tensor = tal.make_anchors(leaves, stride_t, 0.5)

    # targets -> (b, n_max, 5) [cls, x1, y1, x2, y2] pixels
    tg = tensor(rows)
    if tg.shape[0] == 0:
        out = t.zeros(b, 0, 5)
    else:
        i = tg[:, 0]
        _, counts = i.unique(return_counts=True)
        out = t.zeros(b, int(counts.max()), 5)
        for j in range(b):
            sel = i == j
            k = int(sel.sum())
            if k:
                out[j, :k] = tg[sel, 1:]
        xywh = out[..., 1:5] * imgsz[[1, 0, 1, 0]]
        out[..., 1:5] = t.cat((xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2), -1)
    gt_labels, gt_bboxes = out.split((1, 4), 2)
    mask_gt = gt_bboxes.sum(2, keepdim=True).gt_(0)

    proj = t.arange(reg_max, dtype=t.float32)
    pred_ltrb = pred_distri.view(b, -1, 4, reg_max).softmax(3).matmul(proj)
    pred_bboxes = tal.dist2bbox(pred_ltrb, anchor_points, xywh=False)

    assigner = Yolov9Assigner(topk=topk, num_classes=nc, alpha=alpha, beta=beta)
    target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx = assigner(
        pred_scores.detach().sigmoid(),
        (pred_bboxes.detach() * stride_tensor).type(gt_bboxes.dtype),
        anchor_points * stride_tensor,
        gt_labels,
        gt_bboxes,
        mask_gt,
    )
    assign = dict(
        target_labels=numpy(target_labels),
        target_bboxes=numpy(target_bboxes.clone()),
        target_scores=numpy(target_scores.float()),
        fg_mask=numpy(fg_mask),
        target_gt_idx=numpy(target_gt_idx),
        **assigner.captured,
    )
    target_bboxes = target_bboxes / stride_tensor
    target_scores = target_scores.float()
    tss = max(target_scores.sum(), 1)

    loss = t.zeros(3)
    if cls_loss == "varifocal":
        onehot = F.one_hot(target_labels, nc).float() * fg_mask[..., None]
        weight = 0.75 * pred_scores.sigmoid().pow(2.0) * (1 - onehot) + target_scores * onehot
        vfl = F.binary_cross_entropy_with_logits(pred_scores, target_scores, reduction="none") * weight
        loss[1] = vfl.sum() / tss
    else:
        bce = F.binary_cross_entropy_with_logits(
            pred_scores, target_scores, pos_weight=t.tensor([cls_pw]), reduction="none"
        )
        if fl_gamma > 0:
            bce = _focal(bce, pred_scores, target_scores, fl_gamma)
        loss[1] = bce.sum() / tss

    if fg_mask.sum():
        w = target_scores.sum(-1)[fg_mask].unsqueeze(-1)
        iou = _bbox_iou()(pred_bboxes[fg_mask], target_bboxes[fg_mask], xywh=False, CIoU=True)
        loss[0] = ((1.0 - iou) * w).sum() / tss
        ltrb = t.cat((anchor_points - target_bboxes[..., :2], target_bboxes[..., 2:] - anchor_points), -1)
        ltrb = ltrb.clamp(0, reg_max - 1 - 0.01)[fg_mask]
        pd = pred_distri[fg_mask].view(-1, reg_max)
        tl = ltrb.long()
        tr = tl + 1
        wl = tr.float() - ltrb
        wr = 1 - wl
        ce_l = F.cross_entropy(pd, tl.view(-1), reduction="none").view(tl.shape)
        ce_r = F.cross_entropy(pd, tr.view(-1), reduction="none").view(tl.shape)
        loss[2] = ((ce_l * wl + ce_r * wr).mean(-1, keepdim=True) * w).sum() / tss
    loss[0] *= box
    loss[1] *= cls
    loss[2] *= dfl
    total = loss.sum() * b
    total.backward()
    return {
        "total": float(total.detach()),
        "components": numpy(loss).astype(np.float64),
        "grads": [grad_nhwc(x) for x in leaves],
        "assign": assign,
    }
