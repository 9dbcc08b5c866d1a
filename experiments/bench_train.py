"""How much of the training loop's time is the train step itself?

    python experiments/bench_train.py --tiny                 # pico, 64 px, batch 8
    python experiments/bench_train.py                        # the default `jaxyolo train` config
    python experiments/bench_train.py --model small --img-size 640 --batch 32
    python experiments/bench_train.py --stream --img-size 640 --batch 16 --steps 40 --warmup 10 --log-every 10
    python experiments/bench_train.py --tiny --json row.json  # also the figures as JSON

Prints, for one config, on JAX's default backend:

(a) the bare jitted train step, called back to back on one device-resident
    batch (ms per step, blocked at the end), half of ``--steps`` before (b)
    and half after, so that a drift of a shared machine's speed cancels;
(b) the real loop, ``jaxyolo.train.train``: the input pipeline with its
    background prefetch, the on-device augmentation (mosaic on throughout,
    ``--no-augment`` for none), the EMA, the logging (every
    ``--log-every`` steps) and the epoch-end checkpoints, timed between its
    log points over ``--steps`` steps after ``--warmup`` steps (ms per step);
(c) the input pipeline alone: gather + transfer of ``--steps`` batches
    through the prefetcher (batches per second);

Run as a program it restarts itself once with glibc's huge-page malloc, as the
``jaxyolo`` program does (``jaxyolo/_host.py``); the header prints ``GLIBC_TUNABLES``.

and last ``efficiency X`` with X = (a) / (b): 1.0 means the loop adds nothing
to the step.  Evaluation (mAP) is not part of the loop timed here.

``--stream [DATA_YAML]``: the images come from JPEG files, decoded by
``--workers`` processes as the batches need them (``cache="none"``, every
epoch from the files); default the 2 000-JPEG folder of
``experiments/bench_data.py`` (made once).  The embedded set otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="pico, 64 px, batch 8 (a step of a few ms: host overhead shows)")
    p.add_argument("--loss", default=None, choices=("yolov8", "yolov5", "yolox"), help="default: the model's family (yolov8 for the own models)")
    p.add_argument("--model", default=None, help="pico | nano | small or an upstream architecture (yolov8n, ...)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=200, help="timed steps (>= 200 for the figure docs/speed.md quotes)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None, help="embedded train images (default: the trainer's 3000; fewer for large image sizes)")
    p.add_argument("--no-augment", action="store_true", help="turn every augmentation off (default: the trainer's defaults, mosaic on)")
    p.add_argument("--stream", nargs="?", const="", default=None, metavar="DATA_YAML", help="stream JPEG files (default: bench_data.py's 2000-image folder)")
    p.add_argument("--workers", type=int, default=2, help="decode processes with --stream")
    p.add_argument("--json", metavar="FILE", help="also write the config and the figures as JSON to FILE")
    args = p.parse_args(argv)

    import jax

    from jaxyolo.data import Prefetcher, TrainBatches, load_embedded
    from jaxyolo.train import Session, TrainConfig, train

    base = TrainConfig()
    if args.tiny:
        base = dataclasses.replace(base, model="pico", img_size=64, batch=8)
    over = {k: v for k, v in (("model", args.model), ("img_size", args.img_size), ("batch", args.batch), ("train_size", args.train_size)) if v is not None}
    total = args.warmup + args.steps
    if args.steps % args.log_every or args.warmup % args.log_every:
        raise SystemExit("error: --steps and --warmup must be multiples of --log-every (the loop is timed between log points)")
    # Enough images that the timed steps stay inside training (no run end); eval only at the end.
    cfg = dataclasses.replace(base, loss=None, precision=args.precision, eval_every=10**6, **over)
    cfg = dataclasses.replace(cfg, loss=cfg.loss if args.loss is None else args.loss)
    # Mosaic stays on through the timed steps (no closing epochs): the
    # augmentation is part of the step, with its K = 4 frames per sample.
    cfg = dataclasses.replace(cfg, epochs=max(1, -(-total // max(cfg.train_size // cfg.batch, 1))) + 1, max_steps=total, close_mosaic=0)
    if args.no_augment:
        cfg = dataclasses.replace(cfg, **{k: 0.0 for k in ("mosaic", "translate", "scale", "hsv_h", "hsv_s", "hsv_v", "fliplr")})
    print(f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} devices), {os.cpu_count()} CPU cores; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"config: loss={cfg.loss} model={cfg.model} img={cfg.img_size} batch={cfg.batch} precision={cfg.precision} "
          f"train_size={cfg.train_size} log_every={args.log_every}; augmentation: {'off' if args.no_augment else 'mosaic ' + str(cfg.mosaic) + ' + affine + HSV + flip'}; "
          f"{args.warmup} warm-up + {args.steps} timed steps")

    if args.stream is None:
        train_data = load_embedded("train", img_size=cfg.img_size, size=cfg.train_size)
        val_data = load_embedded("val", img_size=cfg.img_size, size=cfg.batch)
    else:
        from pathlib import Path

        from bench_data import make_folder

        from jaxyolo.data.formats import discover
        from jaxyolo.data.stream import DecodePool, open_split

        yaml = args.stream or make_folder(Path(__file__).parent / ".bench-data", 2000)
        pool = DecodePool(args.workers)
        train_data = val_data = open_split(discover(yaml, "train"), img_size=cfg.img_size, pool=pool, cache="none", ring=4 * cfg.batch * 4)
        cfg = dataclasses.replace(cfg, epochs=max(2, -(-total // (len(train_data) // cfg.batch)) + 1))
        print(f"streamed: {len(train_data)} JPEGs of {yaml}, {args.workers} decode workers, cache none")
    from jaxyolo.train.loop import default_max_boxes

    cfg = dataclasses.replace(cfg, max_boxes=cfg.max_boxes or default_max_boxes(train_data))  # as train() resolves it
    batches = TrainBatches(train_data, batch_size=cfg.batch, max_boxes=cfg.max_boxes, seed=cfg.seed)

    # (a) the bare step: the loop's compiled function (one compile, shared by
    # the loop's Session) on one device-resident batch, timed in two halves,
    # before and after (b), so that a drift of the machine's speed (a shared
    # CPU) falls on both sides of the ratio alike.
    from jaxyolo import parallel

    session = Session(cfg, nc=train_data.nc, steps_per_epoch=batches.steps_per_epoch, mesh=parallel.make_mesh(args.devices), log_every=args.log_every)
    batch = jax.device_put(batches.batch(0, 0, mosaic=cfg.mosaic_in_epoch(0)), session.batch_sharding)
    carry = [session.state, session.ema, session.new_acc()]

    def bare(n):
        state, ema, acc = carry
        jax.block_until_ready(acc)
        t0 = time.perf_counter()
        for _ in range(n):
            state, ema, acc = session.train_step(state, ema, acc, batch)
        jax.block_until_ready(acc)
        carry[:] = state, ema, acc
        return (time.perf_counter() - t0) / n * 1e3

    bare(2)  # compile + warm-up
    before = bare(args.steps // 2)

    # (b) the real loop, timed between its log points.
    with tempfile.TemporaryDirectory() as out:
        res = train(cfg, out, progress=False, log=lambda *_: None, data=(train_data, val_data), log_every=args.log_every, devices=args.devices)
    times = dict(res["log_times"])
    loop_ms = (times[total] - times[args.warmup]) / args.steps * 1e3

    after = bare(args.steps - args.steps // 2)
    step_ms = (before * (args.steps // 2) + after * (args.steps - args.steps // 2)) / args.steps

    # (c) the pipeline alone: gather + prefetched transfer.
    positions = batches.positions(0, 0, epochs=10**6, max_steps=args.steps)
    t0 = time.perf_counter()
    with Prefetcher(((pos, batches.batch(*pos, mosaic=cfg.mosaic_in_epoch(pos[0]))) for pos in positions), sharding=session.batch_sharding) as pf:
        for _, b in pf:
            jax.block_until_ready(b)
    pipe_bps = args.steps / (time.perf_counter() - t0)

    print(f"(a) bare jitted train step:  {step_ms:8.2f} ms/step   ({before:.2f} before the loop, {after:.2f} after)")
    print(f"(b) real loop:               {loop_ms:8.2f} ms/step   (mean loss over the run {np.mean(res['losses']):.4g})")
    print(f"(c) input pipeline alone:    {pipe_bps:8.1f} batches/s ({1e3 / pipe_bps:.2f} ms/batch)")
    print(f"efficiency {step_ms / loop_ms:.3f}")
    if args.json:
        row = dict(jax=jax.__version__, jax_backend=jax.default_backend(), devices=len(jax.devices()), cpu_cores=os.cpu_count(),
                   loss=cfg.loss, model=cfg.model, img_size=cfg.img_size, batch=cfg.batch, precision=cfg.precision,
                   train_size=len(train_data), augment=not args.no_augment, stream=args.stream is not None,
                   workers=args.workers if args.stream is not None else None, steps=args.steps, warmup=args.warmup,
                   log_every=args.log_every, step_ms=step_ms, step_ms_before=before, step_ms_after=after,
                   loop_ms=loop_ms, pipeline_batches_per_s=pipe_bps, efficiency=step_ms / loop_ms,
                   mean_loss=float(np.mean(res["losses"])))
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    from jaxyolo._host import reexec_with_hugepages

    reexec_with_hugepages()  # malloc as the `jaxyolo` program has it (jaxyolo/_host.py)
    sys.exit(main())
