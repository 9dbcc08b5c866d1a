"""Side-by-side loss benchmark: jaxyolo (jitted value_and_grad) vs upstream PyTorch
(forward + backward) on the same inputs, in one run, on any backend.

    python experiments/bench_losses.py [--family yolov5 yolox yolov8 yolov9] [--batch 16 64] [--img 640]
                                       [--json FILE|-]

JAX runs on its default backend (``jax_default_matmul_precision`` float32);
upstream runs on CUDA when ``torch.cuda.is_available()``, else on the CPU with
all cores.  Each family lives in ``experiments/bench_<family>.py`` (YOLOv9 is
``bench_yolov8.bench(preset="yolov9")``) and exposes ``bench(*, batch, img, nc,
max_gt, repeats, seed) -> dict`` with keys ``family, batch, jax_ms, torch_ms,
ratio, compile_s, floor_ms, paths, torch_device, notes``.

``jax_ms`` is the assignment path that ``batched=None`` picks on this backend
(the accelerator path on gpu/tpu, the CPU path on cpu); for a loss with two
paths the other one is timed too and both are printed (``paths``).  The floor
is the cheapest jitted ``value_and_grad`` that writes a dense gradient of the
same predictions (``_bench_common.gradient_floor_ms``): no ``value_and_grad``
of a loss can be faster on this machine.  Medians over ``repeats`` timed calls
after one warm-up; the JAX time blocks on the result, the CUDA time
synchronises after each call.  ``--json FILE`` also writes the rows as JSON
(``-``: to stdout, with the table on stderr); a FILE is rewritten after every
row, so a run stopped half way keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: family -> (module, extra bench kwargs)
FAMILIES = {
    "yolov5": ("bench_yolov5", {}),
    "yolox": ("bench_yolox", {}),
    "yolov8": ("bench_yolov8", {}),
    "yolov9": ("bench_yolov8", {"preset": "yolov9"}),
}
NAMES = {"yolov5": "YOLOv5", "yolox": "YOLOX", "yolov8": "YOLOv8", "yolov9": "YOLOv9"}


def table(rows):
    """The markdown table: loss | B | jaxyolo ms | upstream ms | speed-up | dense-gradient floor ms,
    and one line per loss whose two assignment paths were both timed."""
    lines = ["| loss | B | jaxyolo ms | upstream ms | speed-up | dense-gradient floor ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {NAMES[r['family']]} | {r['batch']} | {r['jax_ms']:.2f} | {r['torch_ms']:.2f} | "
                     f"{r['ratio']:.1f}× | {r['floor_ms']:.2f} |")
    paths = [r for r in rows if len(r["paths"]) > 1]
    if paths:
        lines.append("")
        for r in paths:
            both = ", ".join(f"{name} {ms:.2f} ms" for name, ms in r["paths"].items())
            lines.append(f"- {NAMES[r['family']]} B={r['batch']}: {both} (the first is the auto path)")
    return "\n".join(lines)


def write_json(path, header, rows):
    """Write ``header`` with ``rows`` to ``path`` (replaced whole, never half written)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(dict(header, rows=rows), indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--img", type=int, default=640)
    parser.add_argument("--nc", type=int, default=80)
    parser.add_argument("--max-gt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    out = sys.stderr if args.json == "-" else sys.stdout

    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    from _bench_common import torch_device

    from jaxyolo.assign.tal import resolve_batched
    from jaxyolo.testing import oracles

    torch = oracles.torch()
    device = jax.devices()[0]
    header = dict(
        jax=jax.__version__,
        jax_backend=jax.default_backend(),
        jax_device=getattr(device, "device_kind", device.platform),
        auto_path="accelerator path" if resolve_batched(None) else "cpu path",
        torch=torch.__version__,
        torch_device=torch_device(),
        cpu_cores=os.cpu_count(),
        img=args.img,
        nc=args.nc,
        max_gt=args.max_gt,
        repeats=args.repeats,
    )
    print(f"jax {header['jax']} on {header['jax_backend']} ({header['jax_device']}, auto = {header['auto_path']}); "
          f"torch {header['torch']} on {header['torch_device']}; {header['cpu_cores']} CPU cores", file=out)
    print(f"{args.img}x{args.img}, nc={args.nc}, 0-{args.max_gt} GTs per image, median of {args.repeats}", file=out)
    rows = []
    for batch in args.batch:
        for family in args.family:
            module, extra = FAMILIES[family]
            r = importlib.import_module(module).bench(batch=batch, img=args.img, nc=args.nc, max_gt=args.max_gt,
                                                      repeats=args.repeats, seed=args.seed, **extra)
            rows.append(r)
            print(f"{NAMES[family]} B={batch}: {r['notes']}; compile {r['compile_s']:.1f} s", file=out, flush=True)
            if args.json and args.json != "-":  # after every row: a run stopped half way keeps its rows
                write_json(args.json, header, rows)
    print(file=out)
    print(table(rows), file=out)
    if args.json == "-":
        print(json.dumps(dict(header, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
