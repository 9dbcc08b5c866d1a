"""Shared inputs and comparisons for the test_tal_* files (no tests here).

Inputs are drawn so that no two anchors tie on a *positive* alignment metric
(continuous random logits); ties can only occur at zero metric, where the
top-k order is implementation-defined, so the assigner foreground is compared
where the anchor's alignment with some GT is > 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxyolo
from jaxyolo.assign.tal import task_aligned_details
from jaxyolo.objectives.tal import TalLossConfig, decode_predictions, gt_pixels, yolov8_loss


def make_preds(rng, batch, hw, *, nc, reg_max=16, strides=(8, 16, 32), box_scale=None):
    """Per-level ``(B, H, W, 4*reg_max + nc)`` float32 logits.

    DFL logits peak around a random bin per side so decoded ltrb distances
    spread over ``[0.5, box_scale]`` grid units (predicted boxes of all sizes).
    """
    h_img, w_img = hw
    box_scale = box_scale or min(6.0, reg_max - 1.5)
    out = []
    bins = np.arange(reg_max, dtype=np.float32)
    for s in strides:
        h, w = -(-h_img // s), -(-w_img // s)
        centre = rng.uniform(0.5, box_scale, size=(batch, h, w, 4, 1)).astype(np.float32)
        dist = -0.5 * (bins - centre) ** 2 + rng.normal(0, 0.5, size=(batch, h, w, 4, reg_max))
        cls = rng.normal(-1.0, 1.5, size=(batch, h, w, nc))
        out.append(np.concatenate([dist.reshape(batch, h, w, 4 * reg_max), cls], -1).astype(np.float32))
    return out


def make_rows(rng, batch, counts, *, nc, size=(0.04, 0.6), kind="random"):
    """``(N, 6)`` rows ``[img, cls, cx, cy, w, h]`` (normalised).

    kind: "random" | "tiny" (sides < 16 px on a 128 px image) | "border"
    (boxes touching the image edges) | "overlap" (clusters of heavily
    overlapping / nested boxes, so anchors lie in several GTs).
    """
    rows = []
    for b in range(batch):
        n = counts[b] if hasattr(counts, "__len__") else counts
        centre = rng.uniform(0.3, 0.7, 2)
        for i in range(n):
            if kind == "tiny":
                w, h = rng.uniform(0.02, 0.11, 2)
            else:
                w, h = rng.uniform(*size, 2)
            cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
            if kind == "border":
                side = i % 4
                if side == 0:
                    cx = w / 2
                elif side == 1:
                    cy = h / 2
                elif side == 2:
                    cx = 1 - w / 2
                else:
                    cx, cy = 1 - w / 2, 1 - h / 2
            elif kind == "overlap":
                cx, cy = np.clip(centre + rng.normal(0, 0.05, 2), [w / 2, h / 2], [1 - w / 2, 1 - h / 2])
            rows.append([b, rng.integers(0, nc), cx, cy, w, h])
    return np.asarray(rows, np.float32).reshape(-1, 6)


@functools.cache
def jitted_loss(strides, config):
    def f(preds, targets):
        return yolov8_loss(preds, targets, strides=strides, config=config)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


@functools.cache
def jitted_assign(strides, config):
    def f(preds, targets):
        d = decode_predictions(preds, strides=strides, reg_max=config.reg_max)
        gt, mask = gt_pixels(targets, d["imgsz"])
        return task_aligned_details(
            jax.nn.sigmoid(jnp.concatenate(d["pred_scores"], axis=1)),
            d["pred_bboxes"] * d["stride"],
            d["anchor_points"] * d["stride"],
            targets.classes,
            gt,
            mask,
            topk=config.topk,
            alpha=config.alpha,
            beta=config.beta,
            preset=config.preset,
            topk2=config.topk2,
            strides=strides,
        )

    return jax.jit(f)


def run_jax(preds, targets, *, strides=(8, 16, 32), config=TalLossConfig()):
    (total, comp), grads = jitted_loss(tuple(strides), config)([jnp.asarray(p) for p in preds], targets)
    det = jitted_assign(tuple(strides), config)([jnp.asarray(p) for p in preds], targets)
    return dict(
        total=float(total),
        components=np.array([float(comp[k]) for k in ("box", "cls", "dfl")]),
        grads=[np.asarray(g) for g in grads],
        assign=jax.tree.map(np.asarray, det._asdict()),
    )


def _rel(a, b):
    """Max relative error over entries with ``|b| > 1e-5`` (smaller ones are judged by atol)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    big = np.abs(b) > 1e-5
    return float(np.max(np.abs(a - b)[big] / np.abs(b)[big])) if big.any() else 0.0


ERRORS: dict[str, float] = {}


def record(name, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    ERRORS[name + "_abs"] = max(ERRORS.get(name + "_abs", 0.0), err)
    ERRORS[name + "_rel"] = max(ERRORS.get(name + "_rel", 0.0), _rel(a, b))


def compare(ours, ref, value_tol, grad_tol, *, check_assign=True):
    """Assert parity of loss, components, per-level grads and assigner outputs."""
    np.testing.assert_allclose(ours["total"], ref["total"], **value_tol)
    np.testing.assert_allclose(ours["components"], ref["components"], **value_tol)
    record("value", ours["components"], ref["components"])
    record("value", [ours["total"]], [ref["total"]])
    assert len(ours["grads"]) == len(ref["grads"])
    for g, r in zip(ours["grads"], ref["grads"]):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, **grad_tol)
        record("grad", g, r)
    if not check_assign:
        return
    ra, oa = ref["assign"], ours["assign"]
    if "align_metric" not in ra:  # upstream short-circuits when no image has a GT
        assert not oa["fg_mask"].any() and not oa["target_scores"].any()
        return
    np.testing.assert_allclose(oa["target_scores"], ra["target_scores"], **value_tol)
    record("scores", oa["target_scores"], ra["target_scores"])
    m_up = ra["align_metric"].shape[1]
    # The suite's value tolerance, with the least margin of any value: the metric is CIoU**6, which
    # multiplies CIoU's float32 rounding by six (measured up to 6.7e-6 relative against YOLOv9).
    np.testing.assert_allclose(oa["align_metric"][:, :m_up], ra["align_metric"], rtol=1e-5, atol=1e-7)
    record("align", oa["align_metric"][:, :m_up], ra["align_metric"])
    # Positive (GT, anchor) pairs: zero-metric top-k picks are tie-order dependent and carry zero weight.
    pos_pair = ra["align_metric"] > 0  # (B, M_up, A)
    mp_ours, mp_ref = oa["mask_pos"][:, :m_up] & pos_pair, ra["mask_pos"] & pos_pair
    np.testing.assert_array_equal(mp_ours, mp_ref)
    fg = mp_ref.any(1)
    np.testing.assert_array_equal(oa["fg_mask"][fg], True)
    np.testing.assert_array_equal(ra["fg_mask"][fg], True)
    np.testing.assert_array_equal(oa["target_gt_idx"][fg], ra["target_gt_idx"][fg])
    np.testing.assert_allclose(oa["target_bboxes"][fg], ra["target_bboxes"][fg], **value_tol)
    record("boxes", oa["target_bboxes"][fg], ra["target_bboxes"][fg])
    return fg


def targets_from_rows(rows, batch, max_boxes=32):
    return jaxyolo.Targets.from_rows(rows, batch, max_boxes)
