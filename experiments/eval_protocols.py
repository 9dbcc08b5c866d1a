"""Where mAP figures differ: one model's val detections under each evaluation NMS, scored by
``yolo val``'s metric and by pycocotools.

    python experiments/eval_protocols.py --checkpoint RUN|WEIGHTS [--data data.yaml] [--img-size S]

Rows: single-label NMS with 100 detections per image (jaxyolo's evaluation before
issue 23, YOLOX's and pycocotools' habit), single-label with 300, multi-label with
300 raised to the most labels in one image (``yolo val``'s, jaxyolo's now).
Columns: mAP50 and mAP50-95 by :func:`jaxyolo.evaluate.yolo_val_metrics` and by
:func:`jaxyolo.evaluate.coco_map`.  Conf 0.001, IoU 0.7 throughout.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="a data.yaml (default: the run's dataset)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)

    from jaxyolo._xla import compiler_options
    from jaxyolo.data import load_data
    from jaxyolo.evaluate import EVAL_PRE_NMS_TOPK, batched_nms, coco_map, eval_max_det, yolo_val_metrics
    from jaxyolo.train import load_session

    session, meta = load_session(args.checkpoint, img_size=args.img_size)
    c = session.config
    spec = args.data or c.data
    data = load_data(spec, "val", img_size=c.img_size, embedded_size=c.val_size if spec == "embedded" else None)
    raw = jax.jit(session.decode_images, compiler_options=compiler_options())
    outs = []
    for start in range(0, len(data), args.batch):
        x = np.zeros((args.batch, c.img_size, c.img_size, 3), np.uint8)
        n = min(args.batch, len(data) - start)
        x[:n] = data.images[start : start + n]
        b, s = raw(session.ema["params"], session.ema["stats"], x)
        outs.append((b[:n], s[:n]))
    rows = [("single-label, 100 per image", False, 100), ("single-label, 300", False, 300),
            ("multi-label, 300 (yolo val)", True, eval_max_det(300, data))]
    print(f"{args.checkpoint}: {len(data)} val images, {c.img_size} px, conf {c.conf_thres}, IoU {c.iou_thres}\n")
    print("| evaluation NMS | yolo val mAP50 | yolo val mAP50-95 | pycocotools mAP@0.5 | pycocotools mAP@0.5:0.95 |")
    print("| --- | --- | --- | --- | --- |")
    for name, multi, d in rows:
        dets = []
        for b, s in outs:
            bb, ss, cc, vv = (np.asarray(v) for v in batched_nms(b, s, conf_thres=c.conf_thres, iou_thres=c.iou_thres, max_det=d,
                                                              multi_label=multi, pre_nms_topk=EVAL_PRE_NMS_TOPK))
            dets += [(bb[i][vv[i]], ss[i][vv[i]], cc[i][vv[i]]) for i in range(len(bb))]
        y = yolo_val_metrics(list(data.labels), dets, img_size=c.img_size, nc=data.nc)
        k = coco_map(list(data.labels), dets, img_size=c.img_size, nc=data.nc)
        print(f"| {name} | {y['map50']:.4f} | {y['map50_95']:.4f} | {k['map50']:.4f} | {k['map50_95']:.4f} |")


if __name__ == "__main__":
    main()
