"""The input pipeline at dataset scale: jaxyolo's streamed source against
ultralytics' own loader, side by side on the same folder of JPEGs.

    python experiments/bench_data.py                         # N = 2000 and 20000, 640 px, batch 16, 2 workers
    python experiments/bench_data.py --n 2000 --workers 4 --batches 60

For each N a folder of N JPEGs of mixed sizes around 640 px with YOLO labels
(ultralytics layout, ``data.yaml``) is made once under ``--root`` (outside
every timing; ultralytics' ``labels/train.cache`` is built then too).  Then,
each in a fresh process so that memory is its own:

* **jaxyolo**: :func:`jaxyolo.data.stream.open_split` (``cache="none"``,
  ``--workers`` decode processes) + :class:`jaxyolo.data.TrainBatches`
  ``stream()``: host batches of uint8 frames, ``(B, K, S, S, 3)`` with K = 4
  (mosaic) or 1.  Its augmentation runs on the device inside the train step,
  so "default augmentation" here is the 4 frames a mosaic sample needs;
  one more row with ``--mosaic-buffer 8`` (the others drawn from the last 8
  batches' samples, as ultralytics' buffer: ~1 decode per sample).
* **ultralytics 8.4.190**: ``build_yolo_dataset`` + ``build_dataloader``
  (``cache=False``, the same ``--workers``, ``pin_memory`` off): "default
  augmentation" is its train pipeline (mosaic, random perspective, HSV,
  flips, on the CPU), "off" its val pipeline (LetterBox) with ``rect=False``.

Printed per row: **images/s** (training samples delivered per second over
``--batches`` batches after the first), **first batch** (seconds from
building the dataset/loader to holding batch 1, imports excluded), and
**peak memory** (MB, the proportional set size of the process and all its
workers summed, sampled every 0.5 s: shared pages are counted once; reading a process's page map costs up to ~15 ms, so not more often).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

NAMES = ("cat", "dog", "bird")


_NOISE = None


def _write_one(args):
    global _NOISE
    path, seed = args
    import cv2

    if _NOISE is None:  # per process: one noise field, sliced at random offsets (drawing noise per image is slower than encoding it)
        _NOISE = np.random.default_rng(os.getpid()).normal(0, 10, (1000, 1000, 3)).astype(np.float32)
    rng = np.random.default_rng(seed)
    w = int(rng.integers(480, 800))
    h = int(rng.integers(360, 640)) if rng.uniform() < 0.7 else int(rng.integers(700, 900))  # some portrait
    base = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
    y0, x0 = rng.integers(0, 1000 - h), rng.integers(0, 1000 - w)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC) + _NOISE[y0 : y0 + h, x0 : x0 + w]
    cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    rows = []
    for _ in range(int(rng.integers(1, 9))):
        bw, bh = rng.uniform(0.05, 0.4, 2)
        rows.append(f"{int(rng.integers(3))} {rng.uniform(bw / 2, 1 - bw / 2):.5f} {rng.uniform(bh / 2, 1 - bh / 2):.5f} {bw:.5f} {bh:.5f}\n")
    label = Path(str(path).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}")).with_suffix(".txt")
    label.write_text("".join(rows))


def make_folder(root: Path, n: int) -> Path:
    """``root/<n>/data.yaml`` with n JPEGs in images/train (made once)."""
    from concurrent.futures import ProcessPoolExecutor

    folder = root / str(n)
    yaml = folder / "data.yaml"
    if (folder / ".complete").exists():
        return yaml
    (folder / "images" / "train").mkdir(parents=True, exist_ok=True)
    (folder / "labels" / "train").mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    jobs = [(folder / "images" / "train" / f"{i:06d}.jpg", i) for i in range(n)]
    with ProcessPoolExecutor() as ex:
        list(ex.map(_write_one, jobs, chunksize=64))
    yaml.write_text(f"path: {folder}\ntrain: images/train\nval: images/train\nnames:\n" + "".join(f"  {i}: {c}\n" for i, c in enumerate(NAMES)))
    (folder / ".complete").write_text("")
    print(f"made {n} JPEGs in {folder} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    return yaml


class PeakMemory:
    """Peak of the summed proportional set size (PSS) of this process and its children."""

    def __init__(self, every: float = 0.5):
        import psutil

        self._me, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def sample(self) -> int:
        total = 0
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:  # a worker that just ended
                pass
        return total

    def _run(self, every):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.sample())
        return self.peak


def _child_jaxyolo(yaml, *, img_size, batch, workers, batches, augment, mosaic_buffer=0):
    from jaxyolo.data.formats import discover
    from jaxyolo.data.pipeline import TrainBatches
    from jaxyolo.data.stream import DecodePool, open_split
    from jaxyolo.train.loop import default_max_boxes

    mem = PeakMemory()
    t0 = time.perf_counter()
    spec = discover(yaml, "train")
    with DecodePool(workers) as pool:
        data = open_split(spec, img_size=img_size, pool=pool, cache="none", ring=4 * batch * 4 + mosaic_buffer * batch)  # as train() sizes it
        tb = TrainBatches(data, batch_size=batch, max_boxes=default_max_boxes(data), seed=0, mosaic_buffer=mosaic_buffer)
        it = tb.stream(((0, k) for k in range(batches + 1)), mosaic_of=lambda e: augment, ahead=2)
        next(it)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in it:
            pass
        rate = batches * batch / (time.perf_counter() - t1)
        data.close()
    return {"images_s": rate, "first_s": first, "peak_mb": mem.stop() / 2**20}


def _child_ultralytics(yaml, *, img_size, batch, workers, batches, augment, mosaic_buffer=0):
    from jaxyolo.testing import oracles

    oracles.torch()
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_dataloader, build_yolo_dataset

    folder = Path(yaml).parent
    data = {"names": dict(enumerate(NAMES)), "nc": len(NAMES), "channels": 3, "path": str(folder)}
    cfg = get_cfg(overrides={"imgsz": img_size, "cache": False, "task": "detect", "plots": False})
    mem = PeakMemory()
    t0 = time.perf_counter()
    ds = build_yolo_dataset(cfg, str(folder / "images" / "train"), batch, data, mode="train" if augment else "val", rect=False)
    loader = build_dataloader(ds, batch, workers, shuffle=True, rank=-1, pin_memory=False)
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t1)
    return {"images_s": rate, "first_s": first, "peak_mb": mem.stop() / 2**20}


def _prepare_ultralytics(yaml):
    """Build ultralytics' labels/train.cache once, outside the timing (as a second run of theirs finds it)."""
    from jaxyolo.testing import oracles

    oracles.torch()
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset

    folder = Path(yaml).parent
    data = {"names": dict(enumerate(NAMES)), "nc": len(NAMES), "channels": 3, "path": str(folder)}
    build_yolo_dataset(get_cfg(overrides={"imgsz": 64, "cache": False}), str(folder / "images" / "train"), 16, data, mode="val", rect=False)


def _run_child(which: str, yaml: Path, args, augment: bool, mosaic_buffer: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--yaml", str(yaml), "--img-size", str(args.img_size), "--batch", str(args.batch),
           "--workers", str(args.workers), "--batches", str(args.batches), "--mosaic-buffer", str(mosaic_buffer)] + (["--augment"] if augment else [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, YOLO_VERBOSE="False", YOLO_OFFLINE="1"))
    if p.returncode:
        raise RuntimeError(f"{which} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[2000, 20000], help="dataset sizes")
    p.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".bench-data"), help="where the JPEG folders are made (once)")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=30, help="batches timed after the first")
    p.add_argument("--child", choices=("jaxyolo", "ultralytics", "prepare"), help=argparse.SUPPRESS)
    p.add_argument("--yaml", help=argparse.SUPPRESS)
    p.add_argument("--augment", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mosaic-buffer", type=int, default=8, help="jaxyolo's extra mosaic row: others from the last N batches (ultralytics' buffer is 8 batches)")
    args = p.parse_args(argv)
    kw = dict(img_size=args.img_size, batch=args.batch, workers=args.workers, batches=args.batches, augment=args.augment, mosaic_buffer=args.mosaic_buffer if args.child else 0)
    if args.child == "prepare":
        _prepare_ultralytics(args.yaml)
        return 0
    if args.child:
        print(json.dumps((_child_jaxyolo if args.child == "jaxyolo" else _child_ultralytics)(args.yaml, **kw)))
        return 0

    print(f"command: python experiments/bench_data.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {os.cpu_count()} CPUs; {args.img_size} px, batch {args.batch}, {args.workers} workers, {args.batches} batches timed after the first\n")
    rows = []
    for n in args.n:
        yaml = make_folder(Path(args.root), n)
        subprocess.run([sys.executable, __file__, "--child", "prepare", "--yaml", str(yaml)], check=True, capture_output=True,
                       env=dict(os.environ, YOLO_VERBOSE="False", YOLO_OFFLINE="1"))
        for augment in (False, True):
            # alternate the order so that a drift of a shared machine's speed does not favour one side
            order = ("jaxyolo", "ultralytics") if augment else ("ultralytics", "jaxyolo")
            res = {which: _run_child(which, yaml, args, augment) for which in order}
            rows.append((n, "default" if augment else "off", res["jaxyolo"], res["ultralytics"]))
            if augment and args.mosaic_buffer:
                rows.append((n, f"default, `--mosaic-buffer {args.mosaic_buffer}`", _run_child("jaxyolo", yaml, args, augment, args.mosaic_buffer), res["ultralytics"]))
            for _, what, j, u in rows[-2 if augment and args.mosaic_buffer else -1 :]:
                print(f"N={n} augment={what}: jaxyolo {j['images_s']:.1f} img/s, ultralytics {u['images_s']:.1f} img/s", file=sys.stderr, flush=True)
    print("| N | augmentation | jaxyolo images/s | ultralytics images/s | ratio | jaxyolo first batch s | ultralytics first batch s | jaxyolo peak MB | ultralytics peak MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, what, j, u in rows:
        print(f"| {n} | {what} | {j['images_s']:.1f} | {u['images_s']:.1f} | {j['images_s'] / u['images_s']:.2f}x "
              f"| {j['first_s']:.1f} | {u['first_s']:.1f} | {j['peak_mb']:.0f} | {u['peak_mb']:.0f} |")
    for what in dict.fromkeys(w for _, w, _, _ in rows):
        by_n = {n: (j, u) for n, w, j, u in rows if w == what}
        if len(by_n) > 1:
            lo, hi = min(by_n), max(by_n)
            print(f"memory growth N={lo} -> {hi}, augmentation {what}: jaxyolo "
                  f"{by_n[hi][0]['peak_mb'] - by_n[lo][0]['peak_mb']:+.0f} MB, ultralytics {by_n[hi][1]['peak_mb'] - by_n[lo][1]['peak_mb']:+.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
