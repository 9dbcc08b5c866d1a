"""Train yolov8n with jaxyolo (each recipe) and with ultralytics on the same data.yaml;
evaluate every model with ``jaxyolo eval`` and with ``yolo val``.

    python experiments/compare_trainers.py [--out runs/compare_trainers] [--epochs 6]
        [--trainers ultralytics,jaxyolo,jaxyolo-ultralytics] [--img 128] [--batch 16]

1. The embedded shapes set (3000 train, 400 val images, 128 px, 3 classes) is
   written to ``<out>/data`` as PNG files + YOLO txt labels + ``data.yaml``
   (lossless: both tools read the same pixels).
2. One randomly initialised yolov8n (upstream's own init, seed 0) is saved as
   ``<out>/init.pt``; every trainer starts from it.
3. Each trainer runs in its own process, one after the other, timed from the
   process start to its end (compilation, data loading and its own periodic
   validation included, as a user would wait for it):
   ``ultralytics``: ``YOLO(init.pt).train(...)`` with its defaults (SGD/AdamW
   by ``optimizer=auto``, warmup, EMA, mosaic with ``close_mosaic``, val every
   epoch); ``jaxyolo``: ``jaxyolo train --weights init.pt`` with its default
   recipe; ``jaxyolo-ultralytics``: the same with ``--recipe ultralytics``.
4. Every model is scored by both tools on the val split at the training size:
   ``yolo val`` (``YOLO(pt).val``, its defaults) and ``jaxyolo eval`` (``yolo
   val``'s metric and pycocotools').  A jaxyolo run is exported to an
   ultralytics ``.pt`` (float32 EMA weights) for ``yolo val``; ultralytics'
   ``best.pt`` (float16, as it saves) is read as is by ``jaxyolo eval``.

The ultralytics trainer needs ``polars`` (it reads its results CSV with it at
every save): ``pip install polars`` into the venv; the test venv, which
installs ultralytics ``--no-deps``, does not have it.

Writes ``<out>/compare_trainers.json`` and ``.md`` (the table docs/training.md
shows).  Results of trainers already in the json are kept (``--trainers``
picks the ones to (re)run; ``--eval-only`` re-scores the existing models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRAINERS = ("ultralytics", "jaxyolo", "jaxyolo-ultralytics")


def write_dataset(root: Path, *, img_size: int, train_size: int, val_size: int) -> Path:
    """The embedded set as an ultralytics data.yaml folder (made once)."""
    from PIL import Image

    from jaxyolo.data.dataset import load_embedded

    yaml = root / "data.yaml"
    if yaml.exists():
        return yaml
    for split, n in (("train", train_size), ("val", val_size)):
        data = load_embedded(split, img_size=img_size, size=n)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, (im, lab) in enumerate(zip(data.images, data.labels)):
            Image.fromarray(im).save(root / "images" / split / f"{i:05d}.png")
            (root / "labels" / split / f"{i:05d}.txt").write_text("".join(f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}\n" for r in lab))
        names = data.names
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n" + "".join(f"  {i}: {c}\n" for i, c in enumerate(names)))
    return yaml


def _torch():
    from jaxyolo.testing import oracles

    t = oracles.torch()  # the torchvision stand-in, ultralytics importable
    tv_ops = sys.modules["torchvision.ops"]
    from ultralytics.utils.nms import TorchNMS

    tv_ops.nms = TorchNMS.nms  # ultralytics' trainer and val call torchvision.ops.nms
    return t


def _ultralytics_ckpt(module, names, path: Path):
    t = _torch()
    module.names = dict(enumerate(names))
    t.save({"model": module.float(), "ema": None, "train_args": {}, "epoch": -1}, path)


def write_init(path: Path, names):
    """A randomly initialised upstream yolov8n (its own init, seed 0)."""
    if path.exists():
        return
    t = _torch()
    from jaxyolo.models import upstream

    t.manual_seed(0)
    _ultralytics_ckpt(upstream.build_upstream("yolov8n", nc=len(names)), names, path)


def export_run(run: Path, names, path: Path):
    """A jaxyolo run's EMA model as an ultralytics .pt (float32)."""
    from flax import nnx

    from jaxyolo.models import to_torch_state_dict, upstream
    from jaxyolo.train import load_session

    session, _ = load_session(run)
    model = nnx.merge(session.graph_eval, session.ema["params"], session.ema["stats"])
    t = _torch()
    module = upstream.build_upstream("yolov8n", nc=len(names))
    module.load_state_dict({k: t.from_numpy(v) for k, v in to_torch_state_dict(model).items()}, strict=True)
    _ultralytics_ckpt(module, names, path)


# ------------------------------------------------------------ children


def child_ultralytics(args):
    _torch()
    from ultralytics import YOLO

    YOLO(args.init).train(data=args.data, epochs=args.epochs, imgsz=args.img, batch=args.batch, device="cpu", project=str(Path(args.run).parent),
                          name=Path(args.run).name, exist_ok=True, plots=False, amp=False, seed=0, verbose=False)


def child_yolo_val(args):
    _torch()
    from ultralytics import YOLO

    m = YOLO(args.pt).val(data=args.data, imgsz=args.img, batch=args.batch, device="cpu", plots=False, project=args.run, name="val", exist_ok=True)
    print("RESULT " + json.dumps({"precision": float(m.box.mp), "recall": float(m.box.mr), "map50": float(m.box.map50), "map50_95": float(m.box.map)}))


def child_jaxyolo_eval(args):
    from jaxyolo.train import evaluate_checkpoint

    r = evaluate_checkpoint(args.pt, data=args.data, img_size=args.img, batch_size=args.batch)
    print("RESULT " + json.dumps({k: r[k] for k in ("precision", "recall", "map50", "map50_95", "coco_map50", "coco_map50_95")}))


# ------------------------------------------------------------ driver


def _run(cmd, log: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "YOLO_OFFLINE": "1"})
        f.write(p.stdout)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({p.returncode}); see {log}")
    return time.perf_counter() - t0, p.stdout


def _result(out: str) -> dict:
    return json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compare_trainers")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--img", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--val-size", type=int, default=400)
    p.add_argument("--trainers", default=",".join(TRAINERS))
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--child", choices=("ultralytics", "yolo_val", "jaxyolo_eval"), help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--pt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return {"ultralytics": child_ultralytics, "yolo_val": child_yolo_val, "jaxyolo_eval": child_jaxyolo_eval}[args.child](args)

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    trainers = [t for t in args.trainers.split(",") if t]
    for t in trainers:
        if t not in TRAINERS:
            raise SystemExit(f"--trainers: {t!r} is not one of {', '.join(TRAINERS)}")
    yaml = write_dataset(out / "data", img_size=args.img, train_size=args.train_size, val_size=args.val_size)
    from jaxyolo.data.shapes import SHAPE_CLASSES

    init = out / "init.pt"
    write_init(init, SHAPE_CLASSES)
    res_file = out / "compare_trainers.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    me = [sys.executable, os.path.abspath(__file__)]
    common = ["--data", str(yaml), "--img", str(args.img), "--batch", str(args.batch)]
    n_train = args.train_size
    for t in trainers:
        run = out / t
        if not args.eval_only:
            print(f"training: {t} ...", flush=True)
            if t == "ultralytics":
                secs, _ = _run([*me, "--child", "ultralytics", "--init", str(init), "--run", str(run), "--epochs", str(args.epochs), *common], out / f"{t}.log")
            else:
                recipe = ["--recipe", "ultralytics"] if t == "jaxyolo-ultralytics" else []
                secs, _ = _run([sys.executable, "-m", "jaxyolo", "train", "--model", "yolov8n", "--weights", str(init), "--data", str(yaml), "--epochs", str(args.epochs),
                                "--img-size", str(args.img), "--batch", str(args.batch), "--out", str(run), "--no-progress", *recipe], out / f"{t}.log")
            results[t] = {"train_s": round(secs, 1), "images_per_s": round(args.epochs * n_train / secs, 1), "epochs": args.epochs}
        pt = run / "weights" / "best.pt" if t == "ultralytics" else out / f"{t}.pt"
        if t != "ultralytics":
            export_run(run, SHAPE_CLASSES, pt)
        _, o = _run([*me, "--child", "yolo_val", "--pt", str(pt), "--run", str(out / "val" / t), *common], out / f"{t}.yolo_val.log")
        results[t]["yolo_val"] = _result(o)
        _, o = _run([*me, "--child", "jaxyolo_eval", "--pt", str(run if t != "ultralytics" else pt), *common], out / f"{t}.jaxyolo_eval.log")
        results[t]["jaxyolo_eval"] = _result(o)
        res_file.write_text(json.dumps(results, indent=1))
        print(t, json.dumps(results[t]), flush=True)
    lines = [
        f"yolov8n, embedded set on disk ({args.train_size} train / {args.val_size} val PNGs, {args.img} px), batch {args.batch}, {args.epochs} epochs, same initial weights",
        "",
        "| trainer | train s | images/s | yolo val mAP50 | yolo val mAP50-95 | jaxyolo eval mAP50 (yolo val's metric) | mAP50-95 | difference mAP50-95 | jaxyolo eval COCO mAP@0.5 | COCO mAP@0.5:0.95 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t, r in results.items():
        y, j = r["yolo_val"], r["jaxyolo_eval"]
        lines.append(f"| {t} | {r['train_s']:.0f} | {r['images_per_s']:.1f} | {y['map50']:.4f} | {y['map50_95']:.4f} | {j['map50']:.4f} | {j['map50_95']:.4f} | "
                     f"{j['map50_95'] - y['map50_95']:+.4f} | {j['coco_map50']:.4f} | {j['coco_map50_95']:.4f} |")
    (out / "compare_trainers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
