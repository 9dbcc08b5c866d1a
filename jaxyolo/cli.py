"""``jaxyolo train`` / ``jaxyolo eval``: the command line.

    jaxyolo train [--loss yolov8|yolov5|yolox] [--data embedded|PATH] [--epochs N]
                  [--img-size S] [--batch B] [--out DIR] [--resume] ...
    jaxyolo eval --checkpoint DIR
    jaxyolo convert FILE [--name N] --out DIR       (PyTorch checkpoint -> jaxyolo weights)
    jaxyolo compare --weights FILE [--name N] [--images DIR]   (upstream vs converted)

Defaults train the embedded shapes dataset with the YOLOv8 loss and print
the val mAP@0.5 and mAP@0.5:0.95 of the EMA model at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _defaults():
    from jaxyolo.train.config import TrainConfig

    return TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    d = _defaults()
    p = argparse.ArgumentParser(prog="jaxyolo", description="Train and evaluate YOLO detectors in JAX/Flax NNX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a detector", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--loss", choices=("yolov8", "yolov5", "yolox"), default=d.loss, help="loss (and matching head)")
    t.add_argument("--data", default=d.data, help="'embedded' or a YOLO dataset directory (images/ + labels/)")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--img-size", type=int, default=d.img_size, help="square image side, multiple of 32")
    t.add_argument("--batch", type=int, default=d.batch)
    t.add_argument("--out", default=None, help="run directory (default: runs/<loss>, runs/<loss>-2, ...)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (default: the latest runs/<loss>*) with its saved config")
    t.add_argument("--model-size", choices=("pico", "nano", "small"), default=d.model_size)
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer)
    t.add_argument("--lr0", type=float, default=d.lr0)
    t.add_argument("--nc", type=int, default=None, help="number of classes of a YOLO directory")
    t.add_argument("--train-size", type=int, default=d.train_size, help="embedded training images")
    t.add_argument("--val-size", type=int, default=d.val_size, help="embedded validation images")
    t.add_argument("--max-boxes", type=int, default=d.max_boxes)
    t.add_argument("--eval-every", type=int, default=d.eval_every)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (with a checkpoint)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="evaluate a checkpoint's EMA model on its val split")
    e.add_argument("--checkpoint", required=True, help="a run directory (or its checkpoints/ folder)")
    e.add_argument("--batch", type=int, default=None)

    c = sub.add_parser("convert", help="convert an upstream PyTorch checkpoint to a jaxyolo weights directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("file", help="ultralytics / yolov5 .pt, or YOLOX .pth")
    c.add_argument("--name", default=None, help="model name (yolov8n, yolo11s, yolov5m, yolox-nano, ...); inferred from .pt files")
    c.add_argument("--nc", type=int, default=None, help="number of classes (default: from the checkpoint)")
    c.add_argument("--out", required=True, help="output directory (orbax arrays + model.json)")

    k = sub.add_parser("compare", help="run an upstream PyTorch checkpoint and its conversion on the same images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("--weights", required=True, help="ultralytics / yolov5 .pt, or YOLOX .pth")
    k.add_argument("--name", default=None, help="model name; inferred from .pt files")
    k.add_argument("--nc", type=int, default=None, help="number of classes (default: from the checkpoint)")
    k.add_argument("--images", default=None, help="directory of images (default: random images)")
    k.add_argument("--labels", default=None, help="YOLO label directory (default: labels/ next to images/); adds the loss")
    k.add_argument("--img-size", type=int, default=640, help="square image side, multiple of 32")
    k.add_argument("--batch", type=int, default=2, help="random images")
    k.add_argument("--max-images", type=int, default=16, help="images read from --images")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--tol", type=float, default=None, help="exit 1 if a relative difference exceeds this")
    return p


def _run_dirs(loss: str):
    base = Path("runs")
    return sorted((p for p in base.glob(f"{loss}*") if p.is_dir() and (p.name == loss or p.name.startswith(f"{loss}-"))), key=lambda p: p.stat().st_mtime)


def _pick_out(args) -> Path:
    if args.out is not None:
        out = Path(args.out)
        if not args.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
        return out
    if args.resume:
        runs = _run_dirs(args.loss)
        if not runs:
            raise SystemExit(f"error: --resume: no runs/{args.loss}* directory; pass --out")
        return runs[-1]
    out, k = Path("runs") / args.loss, 2
    while out.exists():
        out, k = Path("runs") / f"{args.loss}-{k}", k + 1
    return out


def _train(args) -> int:
    from jaxyolo.data import DataError
    from jaxyolo.train import TrainConfig, train

    try:
        cfg = TrainConfig(
            loss=args.loss, data=args.data, nc=args.nc, epochs=args.epochs, img_size=args.img_size, batch=args.batch,
            model_size=args.model_size, optimizer=args.optimizer, lr0=args.lr0, train_size=args.train_size,
            val_size=args.val_size, max_boxes=args.max_boxes, eval_every=args.eval_every, max_steps=args.max_steps, seed=args.seed,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = _pick_out(args)
    if args.resume:
        print(f"jaxyolo train --resume: {out} (its saved config; other options except --max-steps are ignored)", flush=True)
    else:
        print(f"jaxyolo train: {out}  ({', '.join(f'{k}={v}' for k, v in dataclasses.asdict(cfg).items() if k in ('loss', 'data', 'epochs', 'img_size', 'batch', 'model_size', 'optimizer', 'lr0'))})", flush=True)
    try:
        train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def _eval(args) -> int:
    from jaxyolo.data import DataError
    from jaxyolo.train import evaluate_checkpoint

    try:
        evaluate_checkpoint(args.checkpoint, batch_size=args.batch)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from jaxyolo.compare import convert_command

        return convert_command(args)
    if args.command == "compare":
        from jaxyolo.compare import compare_command

        return compare_command(args)
    return _train(args) if args.command == "train" else _eval(args)


if __name__ == "__main__":
    sys.exit(main())
