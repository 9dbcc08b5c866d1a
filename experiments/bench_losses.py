"""Side-by-side loss benchmark: jaxyolo (jitted value_and_grad) vs upstream PyTorch
(forward + backward) on the same inputs, in one run.

    python experiments/bench_losses.py [--family yolov5 yolox yolov8] [--batch 16] [--img 640]

Each family lives in ``experiments/bench_<family>.py`` and exposes
``bench(*, batch, img, nc, max_gt, repeats, seed) -> dict`` with keys
``family, jax_ms, torch_ms, ratio, compile_s, floor_ms`` (+ optional ``notes``).
The floor is the cheapest jitted ``value_and_grad`` that writes a dense gradient
of the same predictions (``_bench_common.gradient_floor_ms``); the last column,
upstream / floor, is the largest speed-up any such function can show here.
Medians over ``repeats`` timed calls after one warm-up; the JAX time blocks on
the result (``block_until_ready``); torch uses its default threads (the loss
benchmark compares CPU throughput, not the one-thread parity setting).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FAMILIES = ("yolov5", "yolox", "yolov8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img", type=int, default=640)
    parser.add_argument("--nc", type=int, default=80)
    parser.add_argument("--max-gt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    print(f"B={args.batch}, {args.img}x{args.img}, nc={args.nc}, 0-{args.max_gt} GTs per image, median of {args.repeats}")
    rows = []
    for family in args.family:
        module = importlib.import_module(f"bench_{family}")
        rows.append(
            module.bench(
                batch=args.batch, img=args.img, nc=args.nc, max_gt=args.max_gt, repeats=args.repeats, seed=args.seed
            )
        )
    print()
    print(f"{'loss':8s} {'jaxyolo ms':>11s} {'upstream ms':>12s} {'speed-up':>9s} {'compile s':>10s} "
          f"{'floor ms':>9s} {'max speed-up':>13s}")
    for r in rows:
        print(f"{r['family']:8s} {r['jax_ms']:11.1f} {r['torch_ms']:12.1f} {r['ratio']:8.1f}x {r['compile_s']:10.2f} "
              f"{r['floor_ms']:9.1f} {r['torch_ms'] / r['floor_ms']:12.1f}x")
        if r.get("notes"):
            print(f"         {r['notes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
