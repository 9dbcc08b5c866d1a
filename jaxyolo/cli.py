"""``jaxyolo train | eval | predict``: the command line.

    jaxyolo train [--recipe jaxyolo|ultralytics] [--loss yolov8|yolov5|yolox] [--data embedded|data.yaml|COCO|DIR] [--epochs N]
                  [--img-size S] [--batch B] [--out DIR] [--resume] [--save-every N] [--cache auto|ram|disk|none]
                  [--workers N] [augmentation flags] ...
    jaxyolo eval --checkpoint RUN|WEIGHTS [--data ...] [--img-size S]
    jaxyolo predict SOURCE --checkpoint RUN|WEIGHTS [--out DIR] [--conf 0.25] [--iou 0.7] [--save-txt]
    jaxyolo convert FILE [--name N] --out DIR                 (PyTorch checkpoint -> jaxyolo weights)
    jaxyolo compare --weights FILE [--name N] [--images DIR]  (upstream vs converted, the parity report)

Defaults train the embedded shapes dataset with the YOLOv8 loss and print
the val mAP@0.5 and mAP@0.5:0.95 of the EMA model at the end.  Every user
error is one line starting ``error:``.  ``jaxyolo train`` exits with 0 when
the run is done, 1 on an error, and 75
(:data:`jaxyolo.train.preempt.PREEMPTED_EXIT_CODE`) when SIGTERM or SIGINT
stopped it with a checkpoint (``--resume`` continues).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


class _Help(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` once, and only where the default is a value
    (options whose default is "none"/"off" say what that means in their help)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is None or action.default is False or action.default is argparse.SUPPRESS or not action.option_strings:
            return h
        return f"{h} (default: %(default)s)" if h else "default: %(default)s"


def _defaults():
    from jaxyolo.train.config import TrainConfig

    return TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    from jaxyolo.data.stream import CACHES
    from jaxyolo.train.config import LOSSES, OPTIMIZERS, RECIPES

    d = _defaults()
    p = argparse.ArgumentParser(prog="jaxyolo", description="Train, evaluate and run YOLO detectors in JAX/Flax NNX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a detector", formatter_class=_Help)
    t.add_argument("--model", default=None, help="pico | nano | small (jaxyolo's own, head of --loss), or an upstream architecture: yolov8n..x, yolo11n..x, yolo26n..x, yolov10n|s|m|b|l|x, yolov5n..x, yolox-nano|tiny|s|m|l|x (default: pico, or the --weights' architecture)")
    t.add_argument("--weights", default=None, help="initial weights of an upstream --model: a `jaxyolo convert` folder or an upstream .pt/.pth (tensors of matching shape are loaded)")
    t.add_argument("--loss", choices=LOSSES, default=None, help="loss (and head of the own models; default: the model's family, yolov8 for the own models; e2e: ultralytics' E2ELoss of the end-to-end models)")
    t.add_argument("--data", default=d.data, help="'embedded', an Ultralytics data.yaml, a COCO folder (annotations/instances_<split>*.json) or .json file, or a folder with images/ + labels/")
    t.add_argument("--images", default=None, help="the images folder of a COCO .json --data")
    t.add_argument("--nc", type=int, default=None, help="number of classes, checked against the dataset (default: the dataset's)")
    t.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    t.add_argument("--img-size", type=int, default=d.img_size, help="square training size, multiple of 32; images are letterboxed to it")
    t.add_argument("--batch", type=int, default=d.batch, help="global batch size (split over the devices)")
    t.add_argument("--out", default=None, help="run folder (default: runs/<loss>, then runs/<loss>-2, ...; with --resume the latest runs/<loss>*)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out with its saved config")
    t.add_argument("--recipe", choices=RECIPES, default=d.recipe, help="jaxyolo: this trainer's short-run recipe (AdamW 3e-3, cosine, EMA tau = steps / 5); ultralytics: ultralytics' trainer step for step (optimizer auto, parameter groups, warmup per iteration, accumulation to nbs 64, LambdaLR per epoch, EMA tau 2000, close-mosaic 10; see docs/training.md)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="AdamW, SGD with Nesterov momentum 0.937, or ultralytics' MuSGD (Muon on conv kernels + Nesterov SGD); auto (--recipe ultralytics): upstream's rule, AdamW or MuSGD beyond 10k iterations (default: the recipe's, adamw | auto)")
    t.add_argument("--lr0", type=float, default=None, help="peak learning rate (default: the recipe's, 0.003 | 0.01; optimizer auto picks its own)")
    t.add_argument("--train-size", type=int, default=d.train_size, help="embedded training images")
    t.add_argument("--val-size", type=int, default=d.val_size, help="embedded validation images")
    t.add_argument("--max-boxes", type=int, default=d.max_boxes, help="boxes per image the loss sees (static shape); more are cut and counted (boxes_cut). Default: the most objects in one training image, rounded up to a multiple of 8, at least 32")
    t.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate mAP (yolo val's) every N epochs, and at the end, then with pycocotools' COCO mAP too")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps, with a checkpoint (default: run every epoch)")
    t.add_argument("--save-every", type=int, default=None, help="also checkpoint every N steps (long epochs on preemptible machines; default: each epoch's end). SIGTERM or Ctrl-C stops at the next step with a checkpoint and exit status 75; --resume continues exactly")
    t.add_argument("--seed", type=int, default=d.seed, help="model init, data order and augmentation draws")
    t.add_argument("--nms", action="store_true", help="end-to-end models (yolo26*, yolov10*): detect with the one-to-many branch and NMS, as upstream's nms=True (default: the one-to-one branch's top max_det scores, no NMS)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision, help="bf16: convolutions and activations in bfloat16; parameters, optimiser, EMA, BatchNorm statistics and losses stay float32")
    t.add_argument("--log-every", type=int, default=50, help="fetch the logged values from the device every N steps (one steps.csv row per N steps)")
    t.add_argument("--devices", type=int, default=None, help="data-parallel over the first N local devices (default: all devices)")
    t.add_argument("--cache", choices=CACHES, default="auto", help="images of a dataset on disk: 'ram' keeps each decoded frame in RAM from its first use, 'none' streams them from the files every epoch (memory independent of the dataset), 'disk' decodes them up front into a memory-mapped file in --cache-dir; 'auto': ram when the decoded frames fit in half the available memory, else none")
    t.add_argument("--cache-dir", default=None, help="folder of --cache disk (default: ~/.cache/jaxyolo/<dataset>-<hash>)")
    t.add_argument("--workers", type=int, default=None, help="image decode processes of --cache ram|none (default: the CPUs minus one, 1 to 8; 0 decodes in the training process)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (on a terminal), nor its one line per --log-every steps (in a file or a pipe)")
    a = t.add_argument_group("augmentation (ultralytics' default strengths; 0 turns one off)")
    a.add_argument("--mosaic", type=float, default=d.mosaic, help="probability of a 4-image mosaic")
    a.add_argument("--close-mosaic", type=int, default=None, help="no mosaic in the last N epochs (default: the recipe's, 4 | 10)")
    a.add_argument("--mosaic-buffer", type=int, default=d.mosaic_buffer, help="0: a mosaic's 3 other images come from the whole dataset; N: from the last N batches' samples (as ultralytics' buffer; ~1 decode per sample when streaming, e.g. 8)")
    for name, help_ in (("degrees", "rotation +- degrees"), ("translate", "translation +- fraction of the side"), ("scale", "scale gain 1 +- scale"),
                        ("shear", "shear +- degrees"), ("perspective", "perspective +- this"), ("hsv-h", "hue gain"), ("hsv-s", "saturation gain"),
                        ("hsv-v", "value gain"), ("flipud", "up-down flip probability"), ("fliplr", "left-right flip probability")):
        a.add_argument(f"--{name}", type=float, default=getattr(d, name.replace("-", "_")), help=help_)

    e = sub.add_parser("eval", help="evaluate a checkpoint's EMA model (mAP) on its val split or another dataset's", formatter_class=_Help)
    e.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoints/ folder), or converted weights: a `jaxyolo convert` folder or an upstream .pt/.pth (with --data)")
    e.add_argument("--data", default=None, help="evaluate on this dataset's val split instead (same formats as train --data)")
    e.add_argument("--images", default=None, help="the images folder of a COCO .json --data")
    e.add_argument("--img-size", type=int, default=None, help="evaluation size, multiple of 32: the val images are letterboxed to it and the model runs at it (default: the run's training size; 640 for converted weights, as upstream's `yolo val`)")
    e.add_argument("--batch", type=int, default=None, help="evaluation batch (default: the run's batch)")
    e.add_argument("--rect", action=argparse.BooleanOptionalAction, default=True, help="rectangular batches as `yolo val`: images sorted by aspect ratio, each batch letterboxed to ceil(shape * S / 32 + 0.5) * 32 (a square image at S = 128 gets a 160 x 160 frame); --no-rect: every image in its S x S frame, as the trainer's evaluation")
    e.add_argument("--devices", type=int, default=None, help="use the first N local devices (default: all)")
    e.add_argument("--nms", action=argparse.BooleanOptionalAction, default=None, help="end-to-end models (yolo26*, yolov10*): detect with the one-to-many branch and NMS, as upstream's nms=True; --no-nms: the one-to-one branch's top scores, no NMS (default: the run's choice; no NMS for converted weights)")

    r = sub.add_parser("predict", help="run a checkpoint on images and draw the detections", formatter_class=_Help)
    r.add_argument("source", help="an image file or a folder of images")
    r.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint's EMA model), or converted weights: a `jaxyolo convert` folder or an upstream .pt/.pth")
    r.add_argument("--out", default=None, help="output folder (default: runs/predict, then runs/predict-2, ...)")
    r.add_argument("--conf", type=float, default=0.25, help="score threshold")
    r.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    r.add_argument("--max-det", type=int, default=300, help="detections per image")
    r.add_argument("--img-size", type=int, default=None, help="inference size, multiple of 32 (default: the run's training size; 640 for converted weights)")
    r.add_argument("--batch", type=int, default=8, help="images per forward pass")
    r.add_argument("--nms", action=argparse.BooleanOptionalAction, default=None, help="end-to-end models (yolo26*, yolov10*): detect with the one-to-many branch and NMS, as upstream's nms=True; --no-nms: the one-to-one branch's top --max-det scores, no NMS (default: the run's choice; no NMS for converted weights)")
    r.add_argument("--save-txt", action="store_true", help="also write labels/<image>.txt: 'cls cx cy w h conf' normalised to the original image")

    c = sub.add_parser("convert", help="convert an upstream PyTorch checkpoint to a jaxyolo weights folder", formatter_class=_Help)
    c.add_argument("file", help="ultralytics / yolov5 .pt, or YOLOX .pth")
    c.add_argument("--name", default=None, help="model name (yolov8n, yolo11s, yolov5m, yolox-nano, ...); inferred from .pt files when not given")
    c.add_argument("--nc", type=int, default=None, help="number of classes (default: from the checkpoint)")
    c.add_argument("--out", required=True, help="output folder (orbax arrays + model.json)")

    k = sub.add_parser("compare", help="run an upstream PyTorch checkpoint and its conversion on the same images", formatter_class=_Help)
    k.add_argument("--weights", required=True, help="ultralytics / yolov5 .pt, or YOLOX .pth")
    k.add_argument("--name", default=None, help="model name; inferred from .pt files when not given")
    k.add_argument("--nc", type=int, default=None, help="number of classes (default: from the checkpoint)")
    k.add_argument("--images", default=None, help="folder of images (default: random images)")
    k.add_argument("--labels", default=None, help="YOLO label folder, adds the loss and its components (default: labels/ next to images/)")
    k.add_argument("--img-size", type=int, default=640, help="square image side, multiple of 32")
    k.add_argument("--batch", type=int, default=2, help="number of random images")
    k.add_argument("--max-images", type=int, default=16, help="images read from --images")
    k.add_argument("--seed", type=int, default=0, help="random images")
    k.add_argument("--tol", type=float, default=None, help="exit 1 if a relative difference exceeds this (default: report only)")
    return p


def _next_free(base: Path) -> Path:
    out, k = base, 2
    while out.exists():
        out, k = base.with_name(f"{base.name}-{k}"), k + 1
    return out


def _run_dirs(loss: str):
    base = Path("runs")
    return sorted((p for p in base.glob(f"{loss}*") if p.is_dir() and (p.name == loss or p.name.startswith(f"{loss}-"))), key=lambda p: p.stat().st_mtime)


def _pick_out(args, loss: str) -> Path:
    if args.out is not None:
        out = Path(args.out)
        if not args.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
        return out
    if args.resume:
        runs = _run_dirs(loss)
        if not runs:
            raise SystemExit(f"error: --resume: no runs/{loss}* folder; pass --out")
        return runs[-1]
    return _next_free(Path("runs") / loss)


_USER_ERRORS = (FileNotFoundError, ValueError, FloatingPointError)


def _train(args) -> int:
    from jaxyolo.train import TrainConfig, train
    from jaxyolo.train.checkpoint import RunLockedError
    from jaxyolo.train.preempt import PREEMPTED_EXIT_CODE

    model = args.model
    if model is None and args.weights is not None:
        from jaxyolo.models import load_weights

        try:
            model = load_weights(args.weights).name
        except (*_USER_ERRORS, OSError) as e:
            raise SystemExit(f"error: --weights: {e}") from None
    aug = {k: getattr(args, k) for k in ("mosaic", "mosaic_buffer", "degrees", "translate", "scale", "shear", "perspective", "hsv_h", "hsv_s", "hsv_v", "flipud", "fliplr")}
    # given on the command line, else the recipe's
    recipe_fields = {k: getattr(args, k) for k in ("optimizer", "lr0", "close_mosaic") if getattr(args, k) is not None}
    try:
        cfg = TrainConfig.from_recipe(
            args.recipe, model=model or "pico", loss=args.loss, weights=args.weights, data=args.data, images=args.images, nc=args.nc, epochs=args.epochs,
            img_size=args.img_size, batch=args.batch, train_size=args.train_size,
            val_size=args.val_size, max_boxes=args.max_boxes, eval_every=args.eval_every, max_steps=args.max_steps, seed=args.seed,
            precision=args.precision, nms=args.nms, **recipe_fields, **aug,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = _pick_out(args, cfg.loss)
    if args.resume:
        header = f"jaxyolo train --resume: {out.absolute()} (its saved config; other options except --max-steps, --cache and --workers are ignored)"
    else:
        shown = ("model", "recipe", "loss", "weights", "data", "epochs", "img_size", "batch", "optimizer", "lr0", "precision")
        header = f"jaxyolo train: {out.absolute()}  ({', '.join(f'{k}={v}' for k, v in dataclasses.asdict(cfg).items() if k in shown)})"
    try:
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        res = train(cfg, out, resume=args.resume, progress=not args.no_progress, log_every=args.log_every, devices=args.devices,
                    cache=args.cache, cache_dir=args.cache_dir, workers=args.workers, header=header, save_every=args.save_every)
    except (*_USER_ERRORS, RunLockedError) as e:
        raise SystemExit(f"error: {e}") from None
    return PREEMPTED_EXIT_CODE if res["preempted"] else 0


def _eval(args) -> int:
    from jaxyolo.train import evaluate_checkpoint

    try:
        evaluate_checkpoint(args.checkpoint, batch_size=args.batch, devices=args.devices, data=args.data, images=args.images, img_size=args.img_size,
                            rect=args.rect, nms=args.nms)
    except _USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def _predict(args) -> int:
    import jax

    from jaxyolo._xla import compiler_options
    from jaxyolo.predict import iter_predictions, list_images, save_prediction
    from jaxyolo.train import load_session

    try:
        paths = list_images(args.source)
        for name, v, lo, hi in (("conf", args.conf, 0.0, 1.0), ("iou", args.iou, 0.0, 1.0)):
            if not lo <= v <= hi:
                raise ValueError(f"--{name} must be in [{lo}, {hi}], got {v}")
        if args.batch < 1 or args.max_det < 1:
            raise ValueError("--batch and --max-det must be >= 1")
        session, meta = load_session(args.checkpoint, devices=1, img_size=args.img_size, nms=args.nms)  # checks --img-size first
    except _USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out) if args.out is not None else _next_free(Path("runs") / "predict")
    size = session.config.img_size
    conf, iou, max_det = args.conf, args.iou, args.max_det
    detect = jax.jit(lambda p, s, im: session.detect(p, s, im, conf_thres=conf, iou_thres=iou, max_det=max_det),
                  compiler_options=compiler_options())
    params, stats = session.ema["params"], session.ema["stats"]
    names = meta["names"]
    n = boxes = 0
    try:
        for det, image in iter_predictions(paths, lambda im: detect(params, stats, im), img_size=size, conf=conf, batch_size=args.batch):
            save_prediction(det, image, out, names, save_txt=args.save_txt)
            n, boxes = n + 1, boxes + len(det)
    except _USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{n} images, {boxes} detections -> {out}{' (labels in ' + str(out / 'labels') + ')' if args.save_txt else ''}")
    return 0


def _convert(args) -> int:
    from jaxyolo.compare import convert_command

    return convert_command(args)


def _compare(args) -> int:
    from jaxyolo.compare import compare_command

    return compare_command(args)


def main(argv=None) -> int:
    if argv is None:  # the ``jaxyolo`` program itself: malloc with huge pages (jaxyolo/_host.py)
        from jaxyolo._host import reexec_with_hugepages

        reexec_with_hugepages()
    args = build_parser().parse_args(argv)
    return {"train": _train, "eval": _eval, "predict": _predict, "convert": _convert, "compare": _compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
