"""Training actually learns to detect: a short run per loss must reach a stated
val mAP@0.5, and the default recipe's first epochs must raise mAP.

The thresholds were set from measured runs of exactly these configs (CPU,
jax 0.10.2, float32), on three code paths: the machine the tests were written
on, an Intel Xeon with AVX-512, and the same Xeon with
``XLA_FLAGS=--xla_cpu_max_isa=AVX2``.  XLA's float32 code differs with the
instruction set and the discrete label assignment amplifies that, so a run is
reproducible on one machine only (docs/training.md, *Reproducibility*); each threshold
sits below the lowest of the three values by about the spread between them.
Those values were pycocotools' mAP of the single-label evaluation NMS of the time; since issue 23 the
evaluation is ``yolo val``'s (multi-label NMS, its metric: ``res["map50"]``), re-measured on the Xeon
and its AVX2 code path (second tuple; the thresholds stand, below both).  Each run is pico on the embedded shapes set, 400
steps of batch 16 (~60 s on the 2-core CPU), evaluated once at the end (EMA model, 200 val images),
augmented by horizontal flips only: in a few hundred steps mosaic's harder samples cost
more than they teach (yolov8 reached 0.098 in 600 steps with the default augmentations).
The default recipe, mosaic included, is the second test's subject.
"""

import dataclasses

import pytest

from jaxyolo.train import TrainConfig, train

QUIET = dict(progress=False, log=lambda *_: None)
FLIP_ONLY = dict(mosaic=0.0, translate=0.0, scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.5)

# loss: (image side, measured val mAP@0.5 of this config on the three code paths, threshold)
# Since issue 23 (yolo val's metric), Xeon / Xeon held to AVX2: yolov8 0.314 / 0.388, yolox 0.214 / 0.249,
# yolov5 0.098 / 0.105 (after issue 26's BatchNorm backward, which moved the last bits of every step).
CASES = {
    "yolov8": (96, (0.346, 0.359, 0.370), 0.24),
    # 0.19 held with 0.020 to spare on the Xeon: the spread is 0.064.
    "yolox": (96, (0.274, 0.210, 0.269), 0.15),
    # YOLOv5's anchor rule needs objects of anchor size: at 96 px most shapes
    # are smaller than every yolov5s anchor/4 (0.09 measured at 600 steps), so 128 px.
    # (600 steps reached 0.501, 0.461 and 0.218: 400 keeps each run near a minute.)
    "yolov5": (128, (0.078, 0.081, 0.084), 0.05),
}


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(CASES))
def test_short_run_reaches_map(loss, tmp_path):
    img, measured, threshold = CASES[loss]
    cfg = TrainConfig(loss=loss, img_size=img, batch=16, train_size=800, val_size=200, epochs=8, max_boxes=12, eval_every=8, **FLIP_ONLY)
    res = train(cfg, tmp_path / loss, **QUIET)
    assert res["steps"] == 400
    assert res["map50"] >= threshold, f"{loss}: val mAP@0.5 {res['map50']:.3f} < {threshold} (measured {measured})"


@pytest.mark.slow
def test_default_recipe_first_epochs_raise_map(tmp_path):
    """The README main command's recipe (TrainConfig() defaults: pico, 128 px,
    batch 16, AdamW 3e-3, warmup + cosine over 12 epochs, mosaic), stopped
    after its fifth epoch on a smaller train set: mAP rises epoch over epoch."""
    cfg = dataclasses.replace(TrainConfig(), train_size=800, val_size=200, eval_every=1)
    spe = cfg.train_size // cfg.batch
    train(dataclasses.replace(cfg, max_steps=5 * spe), tmp_path / "run", **QUIET)
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    maps = [float(r["map50"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    assert len(maps) == 5
    # Measured (epochs 1-5): 0.000 0.013 0.067 0.157 0.299 on the Xeon, 0.000
    # 0.002 0.048 0.138 0.284 with its AVX2 code path; by yolo val's metric (issue 23):
    # 0.000 0.004 0.031 0.134 0.263 and 0.000 0.009 0.030 0.137 0.267.  Three epochs were too
    # early to bound: epoch 3 gave 0.094, 0.031, 0.067, 0.048 and 0.009 on
    # different code paths; by epoch 5 the spread is small against the value.
    assert maps[0] <= maps[1] < maps[2] < maps[3] < maps[4] and maps[4] >= 0.15, maps
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


@pytest.mark.slow
def test_yolo26n_short_run_reaches_map(tmp_path):
    """``jaxyolo train --model yolo26n``: the end-to-end architecture with its
    E2ELoss (one-to-many weight 0.8 -> 0.1 over the 8 epochs, MuSGD not
    involved: the default recipe's AdamW), evaluated NMS-free (the one-to-one
    branch's top-k).  The pico runs' config: 400 steps of batch 16 at 96 px,
    flips only, one evaluation at the end.  Measured val mAP@0.5 (yolo val's
    metric): 0.387 on the Xeon (AVX-512; 341 s with the machine shared, the
    same value with an evaluation every epoch: 0.032, 0.061, 0.207, 0.320,
    0.363, 0.381, 0.387 at epochs 2-8) and 0.447 with its AVX2 code path; the
    threshold sits the spread (0.06) below the lower."""
    cfg = TrainConfig(model="yolo26n", img_size=96, batch=16, train_size=800, val_size=200, epochs=8, max_boxes=12, eval_every=8,
                      **FLIP_ONLY)
    res = train(cfg, tmp_path / "yolo26n", **QUIET)
    assert res["steps"] == 400
    import csv

    rows = list(csv.DictReader((tmp_path / "yolo26n" / "metrics.csv").open()))
    assert {"box", "cls", "l1"} <= set(rows[0]) and "dfl" not in rows[0]  # YOLO26 has no DFL: its L1 term is logged
    assert float(rows[-1]["l1"]) < float(rows[0]["l1"])
    assert res["map50"] >= 0.30, f"yolo26n: val mAP@0.5 {res['map50']:.3f} < 0.30 (measured 0.387 / 0.447)"
