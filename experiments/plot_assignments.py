"""Which anchors / grid cells each label assigner picks for the same boxes (docs figure).

    python experiments/plot_assignments.py [--out docs/img/assignments.png]

One row of three panels: ``jaxyolo.assign.yolov5_build_targets`` (default
YOLOv5 anchors P3-P5, ``anchor_t`` 4), ``jaxyolo.assign.simota`` (YOLOX 0.3.0
variant: centre radius 2.5, dynamic k from the top-10 IoUs) and
``jaxyolo.assign.task_aligned`` (ultralytics preset: topk 10, alpha 0.5,
beta 6), all on image 6 of ``jaxyolo.data.load_embedded("val", img_size=256)``
with its 4 ground-truth boxes (strides 8/16/32: 32x32 + 16x16 + 8x8 = 1344
anchors).  Each positive is marked in its GT's colour at its cell centre, one
marker style per pyramid level; YOLOv5 positives of anchors 0/1/2 of a level are
shifted left/centre/right inside the cell, so every (anchor, cell) row shows.

SimOTA and TAL need predictions; they are synthetic and deterministic (seed 0):
every anchor predicts the box of the GT whose centre is nearest, its centre
regressed from the anchor point towards the GT centre by at most one stride per
axis, plus Gaussian noise of sigma = half the anchor-to-GT-centre distance, its
size times a log-normal factor of sigma 0.1 + 0.3 |log2(GT size / (4 stride))|
(each level fits objects about 4 strides wide best); class probabilities are
U(0, 1) draws (the same for both), YOLOX's objectness logit is 0.  The script
prints the number of positives per GT returned by each assigner (for SimOTA
that is the GT's dynamic k unless conflicts moved anchors; their number is shown).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from jaxyolo import xywh2xyxy  # noqa: E402
from jaxyolo.assign import simota, task_aligned, yolov5_build_targets  # noqa: E402
from jaxyolo.boxes import make_anchor_points  # noqa: E402
from jaxyolo.data import load_embedded  # noqa: E402
from jaxyolo.models.heads import YOLOV5S_ANCHORS  # noqa: E402
from jaxyolo.targets import Targets  # noqa: E402

SIZE, IMAGE, SEED = 256, 6, 0
STRIDES = (8, 16, 32)
SHAPES = [(SIZE // s, SIZE // s) for s in STRIDES]
GT_COLORS = ("#e6194b", "#1f77ff", "#ff9f1c", "#16a34a")
LEVEL_STYLE = {  # stride -> marker, size (pt^2), filled
    8: ("o", 14, True),
    16: ("s", 46, False),
    32: ("D", 110, False),
}


def ground_truth():
    data = load_embedded("val", img_size=SIZE, size=IMAGE + 1)
    labels = data.labels[IMAGE]  # (n, 5) [class, cx, cy, w, h] normalised
    rows = np.concatenate([np.zeros((len(labels), 1)), labels], axis=1)
    return data.images[IMAGE], Targets.from_rows(rows, batch_size=1, max_boxes=len(labels)), data.nc


def predictions(gt_px, nc):
    """Synthetic predictions (see the module docstring): (A, 4) cxcywh px, (A, nc) probabilities."""
    points, stride = make_anchor_points(SHAPES, STRIDES)  # cell centres, grid units
    centres, stride = np.asarray(points * stride), np.asarray(stride)
    nearest = np.argmin(((centres[:, None] - gt_px[None, :, :2]) ** 2).sum(-1), axis=1)
    g = gt_px[nearest]
    rng = np.random.default_rng(SEED)
    d = g[:, :2] - centres
    xy = centres + np.clip(d, -stride, stride) + rng.normal(0.0, 0.5, d.shape) * np.linalg.norm(d, axis=1, keepdims=True)
    sigma = 0.1 + 0.3 * np.abs(np.log2(np.sqrt(g[:, 2] * g[:, 3]) / (4 * stride[:, 0])))  # level fit
    wh = g[:, 2:] * np.exp(rng.normal(0.0, 1.0, d.shape) * sigma[:, None])
    scores = rng.uniform(size=(len(centres), nc)).astype(np.float32)
    return np.concatenate([xy, wh], axis=1).astype(np.float32), scores, centres, stride[:, 0]


def assign_yolov5(targets):
    """(x, y, stride, gt) per positive row of build_targets (every level, anchor, cell)."""
    anchors = np.asarray(YOLOV5S_ANCHORS, np.float32).reshape(len(STRIDES), -1, 2)
    levels = yolov5_build_targets(targets, anchors=anchors, strides=STRIDES, feature_shapes=SHAPES, anchor_t=4.0)
    out = []
    for s, lv in zip(STRIDES, levels):
        o, a, b, m = np.nonzero(np.asarray(lv.mask))  # (5, na, B, M) slots
        gi, gj = np.asarray(lv.gi)[o, a, b, m], np.asarray(lv.gj)[o, a, b, m]
        out += [((i + 0.5 + (k - 1) * 0.28) * s, (j + 0.5) * s, s, mm) for i, j, k, mm in zip(gi, gj, a, m)]
    return out


def assign_simota(pred, scores, targets, gt_px):
    points, stride = make_anchor_points(SHAPES, STRIDES, offset=0.0)  # top-left cell indices
    logits = np.log(scores) - np.log1p(-scores)
    res = simota(jnp.asarray(pred), jnp.zeros(len(pred)), jnp.asarray(logits), points, stride,
                 jnp.asarray(gt_px), targets.classes[0], targets.mask[0])
    return np.asarray(res.fg_mask), np.asarray(res.matched_gt), int(res.num_fg), int(res.num_conflicts)


def assign_tal(pred, scores, targets, gt_px, centres):
    _, _, _, fg, gt_idx = task_aligned(jnp.asarray(scores)[None], xywh2xyxy(jnp.asarray(pred))[None],
                                       jnp.asarray(centres), targets.classes, xywh2xyxy(jnp.asarray(gt_px))[None],
                                       targets.mask, topk=10, alpha=0.5, beta=6.0, strides=STRIDES)
    return np.asarray(fg[0]), np.asarray(gt_idx[0])


def draw(ax, image, gt_px, marks, title, n_gt, xlabel):
    pooled = image.reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean((1, 3))  # pale, smoothed, posterised (small PNG)
    faded = np.round((0.35 * pooled + 0.65 * 255.0) / 16) * 16
    ax.imshow(np.clip(faded, 0, 255).astype(np.uint8), extent=(0, SIZE, SIZE, 0))
    for m, (cx, cy, w, h) in enumerate(gt_px):
        c = GT_COLORS[m]
        ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, ec=c, lw=1.6))
        ax.text(cx - w / 2 + 1, cy - h / 2 - 2, f"GT{m}", color=c, fontsize=7, fontweight="bold", va="bottom")
    for x, y, s, m in marks:
        marker, size, filled = LEVEL_STYLE[s]
        c = GT_COLORS[m]
        ax.scatter([x], [y], marker=marker, s=size, c=c if filled else "none", edgecolors=c, linewidths=1.3)
    counts = np.bincount([m for *_, m in marks], minlength=n_gt)
    ax.set_title(title, fontsize=9.5)
    ax.set_xlabel(xlabel(counts), fontsize=8.5)
    ax.set(xlim=(0, SIZE), ylim=(SIZE, 0), xticks=[], yticks=[])
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/img/assignments.png")
    args = ap.parse_args()
    image, targets, nc = ground_truth()
    gt_px = np.asarray(targets.boxes[0]) * SIZE  # cxcywh pixels
    pred, scores, centres, strides = predictions(gt_px, nc)
    n_gt = len(gt_px)

    v5 = assign_yolov5(targets)
    fg_ota, gt_ota, num_fg, n_conflicts = assign_simota(pred, scores, targets, gt_px)
    fg_tal, gt_tal = assign_tal(pred, scores, targets, gt_px, centres)
    ota = [(*centres[a], strides[a], gt_ota[a]) for a in np.flatnonzero(fg_ota)]
    tal = [(*centres[a], strides[a], gt_tal[a]) for a in np.flatnonzero(fg_tal)]
    assert len(ota) == num_fg
    print("SimOTA anchors claimed by several GTs:", n_conflicts)

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    per_gt = lambda what: lambda c: f"{what} per GT: " + ", ".join(f"GT{m} {n}" for m, n in enumerate(c))  # noqa: E731
    panels = [
        (v5, "YOLOv5 build_targets\nanchor_t 4, default anchors, own cell + 2 neighbours",
         lambda c: "rows (anchors x 3 cells): " + ", ".join(f"GT{m} {n // 3}x3" for m, n in enumerate(c))),
        (ota, "YOLOX SimOTA (0.3.0)\nradius 2.5, k = trunc(sum of top-10 IoUs)", per_gt(f"positives = k ({n_conflicts} conflicts)")),
        (tal, "YOLOv8 TAL (ultralytics)\ntopk 10, alpha 0.5, beta 6", per_gt("positives")),
    ]
    for ax, (marks, title, xlabel) in zip(axes, panels):
        counts = draw(ax, image, gt_px, marks, title, n_gt, xlabel)
        print(title.split("\n")[0].ljust(22), "positives per GT:", counts.tolist(), "total", int(counts.sum()))
    handles = [Line2D([], [], ls="", marker=LEVEL_STYLE[s][0], ms=np.sqrt(LEVEL_STYLE[s][1]), mec="k",
                      mfc="k" if LEVEL_STYLE[s][2] else "none", label=f"P{i + 3} (stride {s})")
               for i, s in enumerate(STRIDES)]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8.5, frameon=False, bbox_to_anchor=(0.5, 0.09))
    fig.text(0.5, 0.012, f"Image {IMAGE} of load_embedded('val', img_size={SIZE}), its 4 GT boxes. YOLOv5: anchors "
             "0/1/2 of a level drawn left/centre/right in the cell.\nSimOTA/TAL predictions (synthetic, seed "
             f"{SEED}): each anchor predicts the box of the GT with the nearest centre, centre moved towards it by "
             "<= 1 stride per axis + N(0, half the distance),\nsize x lognormal(sigma 0.1 + 0.3 |log2(GT size / 4 "
             "strides)|); class probabilities U(0, 1) (shared); YOLOX objectness logit 0.",
             ha="center", va="bottom", fontsize=7.5, linespacing=1.4)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.215, wspace=0.04)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
