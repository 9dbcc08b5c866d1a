"""Where the time of one model training step goes, per kind of operation, jaxyolo and upstream side by side.

    python experiments/profile_model_step.py                                # yolov8n, B=16, 128x128
    python experiments/profile_model_step.py --model yolo11n --batch 8 --img 320

The step is ``bench_models.py``'s (forward + matching loss + backward,
train-mode BatchNorm, same weights, images and targets on both sides).  Each
side is profiled by its own profiler over ``--steps`` warm steps:

* jaxyolo: ``jax.profiler`` with XLA:CPU's per-thunk trace events
  (``--xla_cpu_enable_xprof_traceme``, set here before JAX starts); every
  thunk of the compiled step is classified from the optimised HLO (the
  convolution's direction from its metadata and operands, fusions by what
  they contain).  The times are the thunks' own durations summed over the
  executor threads: with 2 threads running independent thunks side by side
  the sum can exceed the wall time, and time between thunks (the executor's
  scheduling) is in neither column.
* upstream: ``torch.profiler`` self CPU time per ``aten::`` operator, which
  counts an operator once however many threads it used.

So the two columns answer "how long do operations of this kind run", not
"what fraction of the wall time"; the wall time of each step is printed
above the table.  CPU only (on an accelerator use each framework's own
device profiler).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import cpu_description, load_check, random_targets  # noqa: E402

#: Row order of the table; both profilers' operations map onto these.
KINDS = (
    "conv forward", "conv input gradient", "conv weight gradient", "layout transposes for conv gradients",
    "BatchNorm + SiLU (elementwise)", "BatchNorm statistics / gradient sums", "concat, slice, upsample, pad",
    "max-pool (SPPF)", "matmul (loss)", "other",
)


def _hlo_kinds(hlo: str) -> dict[str, str]:
    """Instruction name -> KINDS entry for the entry computation's thunks."""
    bodies, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            bodies[cur] = []
        elif cur:
            bodies[cur].append(line)
    kinds = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)", line)
        if not m:
            continue
        name, _, op, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = "\n".join(bodies.get(called.group(1), [])) if called else ""
        ops = set(re.findall(r"= \S+ ([\w\-]+)\(", body)) | {op}
        if "convolution" in ops:
            conv = re.search(r"= f32\[(\d+),(\d+),\d+,\d+\]\S* convolution\(.*?window=\{size=(\d+)", body + "\n" + line)
            if conv and int(conv.group(2)) < int(conv.group(3)):  # output (C_in, kh, kw, C_out), window = the feature map
                kinds[name] = "conv weight gradient"
            elif op_name and "transpose(" in op_name.group(1):  # the VJP of a forward convolution
                kinds[name] = "conv input gradient"
            else:
                kinds[name] = "conv forward"
        elif name.startswith("transpose_copy") or op == "transpose":
            kinds[name] = "layout transposes for conv gradients"
        elif "reduce-window" in ops or "select-and-scatter" in ops:
            kinds[name] = "max-pool (SPPF)"
        elif "dot" in ops:
            kinds[name] = "matmul (loss)"
        elif "reduce" in ops:
            kinds[name] = "BatchNorm statistics / gradient sums"
        elif ops & {"concatenate", "slice", "pad", "dynamic-slice", "dynamic-update-slice"}:
            kinds[name] = "concat, slice, upsample, pad"
        elif op == "fusion" and ops & {"multiply", "add", "subtract", "divide", "exponential", "logistic", "rsqrt"}:
            kinds[name] = "BatchNorm + SiLU (elementwise)"
        else:
            kinds[name] = "other"
    return kinds


def profile_jax(step, args, steps):
    """``(per-kind ms per step, wall ms per step)`` of the jitted ``step``."""
    import jax
    from jax.profiler import ProfileData

    for _ in range(2):
        jax.block_until_ready(step(*args))
    kinds = _hlo_kinds(step.lower(*args).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(steps):
                jax.block_until_ready(step(*args))
        wall = (time.perf_counter() - t0) * 1e3 / steps
        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    out = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            for ev in line.events:
                if ev.name in kinds:
                    out[kinds[ev.name]] += ev.duration_ns / 1e6 / steps
    return out, wall


_TORCH = [  # (substring of the aten op, kind), first match wins
    ("convolution_backward", "conv input + weight gradient"), ("mkldnn_convolution", "conv forward"),
    ("_convolution", "conv forward"), ("batch_norm_backward", "BatchNorm backward"), ("batch_norm", "BatchNorm forward"),
    ("silu_backward", "SiLU backward"), ("silu", "SiLU forward"), ("max_pool", "max-pool (SPPF)"),
    ("upsample", "concat, slice, upsample, pad"), ("cat", "concat, slice, upsample, pad"),
    ("slice", "concat, slice, upsample, pad"), ("split", "concat, slice, upsample, pad"),
    ("narrow", "concat, slice, upsample, pad"), ("mm", "matmul"), ("bmm", "matmul"),
]


def profile_torch(step, steps):
    import torch

    step()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    out = collections.Counter()
    for ev in prof.key_averages():
        kind = next((k for sub, k in _TORCH if sub in ev.key), "other (loss, autograd, rest)")
        out[kind] += ev.self_cpu_time_total / 1e3 / steps
    return out, wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="yolov8n")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from bench_models import jax_step, torch_step
    from jaxyolo.models import from_torch, upstream

    t = upstream.torch()
    t.set_num_threads(os.cpu_count() or 1)
    quiet, warning = load_check()
    if warning:
        print(warning)
    print(f"machine: {cpu_description()}; {quiet}; jax {jax.__version__}, torch {t.__version__} "
          f"({t.get_num_threads()} threads); {args.model}, B={args.batch}, {args.img}x{args.img}, {args.steps} steps")
    rng = np.random.default_rng(args.seed)
    images = rng.random((args.batch, args.img, args.img, 3), dtype=np.float32)
    targets = random_targets(rng, batch=args.batch, nc=80, max_gt=32, min_size=0.02)
    module = upstream.build_upstream(args.model, nc=80)
    model = from_torch(module.state_dict(), name=args.model)
    step, params, stats = jax_step(model)
    jax_kinds, jax_wall = profile_jax(step, (params, stats, jnp.asarray(images), targets), args.steps)
    tstep = torch_step(module, args.model, images, targets, targets.to_rows().astype(np.float32), t.device("cpu"))
    torch_kinds, torch_wall = profile_torch(tstep, args.steps)

    print(f"\nwall time per step: jaxyolo {jax_wall:.1f} ms, upstream {torch_wall:.1f} ms (profilers on)\n")
    print("| jaxyolo (XLA:CPU thunks) | ms/step | upstream (torch aten ops, self CPU) | ms/step |")
    print("| --- | --- | --- | --- |")
    left = [(k, jax_kinds.get(k, 0.0)) for k in KINDS]
    right = sorted(torch_kinds.items(), key=lambda kv: -kv[1])
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ("", None)
        b = right[i] if i < len(right) else ("", None)
        fa = f"{a[1]:.1f}" if a[1] is not None else ""
        fb = f"{b[1]:.1f}" if b[1] is not None else ""
        print(f"| {a[0]} | {fa} | {b[0]} | {fb} |")
    print(f"| **sum** | {sum(jax_kinds.values()):.1f} | **sum** | {sum(torch_kinds.values()):.1f} |")


if __name__ == "__main__":
    main()
