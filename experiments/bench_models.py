"""Whole-model training-step benchmark: jaxyolo vs upstream PyTorch, same weights and inputs.

    python experiments/bench_models.py                       # yolov8n, yolo11n, yolo26n, yolov10n, yolov5n, yolox-nano; B=16, 640x640
    python experiments/bench_models.py --models yolov8n --batch 4 --img 320 --repeats 3
    python experiments/bench_models.py --json rows.json     # also the rows as JSON

For each model, one forward + backward of the model *with its matching loss*
(train-mode BatchNorm), timed on both sides:

* jaxyolo: ``jax.jit(jax.value_and_grad(loss))`` over the parameters (BatchNorm
  statistics updated as in training), parameters and statistics as raw
  arrays and compiled with jaxyolo's compiler options, as the trainer's step
  has them; inputs already on the default JAX backend (CPU, GPU or TPU),
  median of ``--repeats`` calls after a warm call; ``compile s`` is the first
  call minus a warm one.  The timed calls of the two sides (and of the
  conv-only network, ``--floor``) alternate, one of each per round, so that a
  shared machine's changing speed does not favour one side.
* upstream: the upstream model built by upstream's code, its own loss
  (ultralytics ``DetectionModel.loss`` = ``v8DetectionLoss``, ``E2ELoss`` for YOLO26/YOLOv10, yolov5
  ``ComputeLoss``, YOLOX ``get_losses`` through ``YOLOX.forward``) and
  ``backward()``; on CUDA when ``torch.cuda.is_available()``, else on the CPU
  with all cores; ``.grad`` cleared outside the timed region.

Run as a program it restarts itself once with glibc's huge-page malloc, as the
``jaxyolo`` program does (``jaxyolo/_host.py``); the header prints ``GLIBC_TUNABLES``.

Both sides get the same weights (``from_torch`` of the upstream model), the
same images (jaxyolo ``[0, 1]`` RGB; YOLOX upstream its 0-255 BGR) and the same
targets; the script prints both losses as a same-inputs check.  float32 on
both sides with each framework's default matmul/conv precision (on NVIDIA
GPUs both use TF32 for convolutions by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import cpu_description, load_check, median_ms, random_targets, time_jitted  # noqa: E402

MODELS = ("yolov8n", "yolo11n", "yolo26n", "yolov10n", "yolov5n", "yolox-nano")


def jax_step(model):
    """``(step, params, stats)``: a jitted ``value_and_grad`` of the model's loss."""
    import jax
    from flax import nnx

    from jaxyolo._xla import compiler_options
    from jaxyolo.models import model_loss

    model.train()
    graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    # Raw arrays in and out, as the trainer's step takes them (jaxyolo.train.step):
    # nnx.Variable leaves would add ~7 ms of host work per call on this model.
    params, stats = nnx.pure(params), nnx.pure(stats)

    def loss_fn(p, s, images, targets):
        m = nnx.merge(graph, p, s)  # fresh Variables: BatchNorm writes its statistics
        total, _ = model_loss(m, m(images), targets)
        return total, nnx.pure(nnx.state(m, nnx.BatchStat))

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=compiler_options()), params, stats


def conv_floor_step(model, images, targets):
    """``jax_step`` of the same network with every ``ConvBnAct``'s BatchNorm
    and SiLU skipped, compiled for ``(images, targets)``: its convolutions
    (forward, input and weight gradients), concatenations, upsampling, pooling
    and the loss, as XLA compiles them.  A train step that keeps BatchNorm
    cannot be faster than this program, so ``upstream ms / conv-only ms``
    bounds the speed-up on this backend."""
    from jaxyolo.models import layers

    call = layers.ConvBnAct.__call__
    layers.ConvBnAct.__call__ = lambda self, x: self.conv(x)
    try:  # traced and compiled while the layer is patched
        step, params, stats = jax_step(model)
        return step.lower(params, stats, images, targets).compile(), params, stats
    finally:
        layers.ConvBnAct.__call__ = call


def torch_step(module, name, images, targets, rows, device):
    """A closure running the upstream forward + loss + backward; returns the loss."""
    import jaxyolo
    from jaxyolo.compare import yolox_label_array
    from jaxyolo.models import MODELS as SPECS
    from jaxyolo.models import upstream

    t = upstream.torch()
    family = SPECS[name].family
    x = upstream.torch_images(images, family).to(device)
    module.train().to(device)
    rows_t = t.from_numpy(rows).to(device)
    sync = t.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if family == "ultralytics":
        from ultralytics.cfg import get_cfg

        module.args = get_cfg()
        batch = {"batch_idx": rows_t[:, 0], "cls": rows_t[:, 1:2], "bboxes": rows_t[:, 2:]}

        def loss():
            return module.loss(batch, module(x))[0].sum()
    elif family == "yolov5":
        from yolov5.utils.loss import ComputeLoss

        module.hyp = jaxyolo.Yolov5LossConfig().hyp()
        crit = ComputeLoss(module)

        def loss():
            return crit(module(x), rows_t)[0].sum()
    else:
        labels = t.from_numpy(yolox_label_array(targets, images.shape[1:3])).to(device)

        def loss():
            return module(x, labels)["total_loss"]

    def step():
        module.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        sync()
        return float(value.detach())

    return step


def bench_one(name, *, batch, img, nc, max_gt, repeats, seed, device, floor=False):
    import jax
    import jax.numpy as jnp

    from jaxyolo.models import from_torch, upstream

    rng = np.random.default_rng(seed)
    images = rng.random((batch, img, img, 3), dtype=np.float32)
    targets = random_targets(rng, batch=batch, nc=nc, max_gt=max_gt, min_size=0.02)
    rows = targets.to_rows().astype(np.float32)

    module = upstream.build_upstream(name, nc=nc)
    model = from_torch(module.state_dict(), name=name)  # the same weights, before any training-mode forward
    step, params, stats = jax_step(model)
    x = jax.device_put(jnp.asarray(images))
    out, _, compile_s = time_jitted(step, params, stats, x, targets, repeats=1)
    jax_loss = float(out[0][0])
    del out
    timed = {"jax": lambda: jax.block_until_ready(step(params, stats, x, targets))}
    if floor:
        fstep, fparams, fstats = conv_floor_step(model, x, targets)
        jax.block_until_ready(fstep(fparams, fstats, x, targets))
        timed["floor"] = lambda: jax.block_until_ready(fstep(fparams, fstats, x, targets))
    tstep = torch_step(module, name, images, targets, rows, device)
    torch_loss = tstep()  # warm-up (and the loss from the same starting weights)
    timed["torch"] = tstep
    # Interleaved rounds (jaxyolo, conv-only, upstream, jaxyolo, ...): a drift of
    # a shared machine's speed falls on every column alike, not on one side.
    times = {k: [] for k in timed}
    for _ in range(repeats):
        for k, fn in timed.items():
            times[k].append(median_ms(fn, 1))
    jax_ms, torch_ms = statistics.median(times["jax"]), statistics.median(times["torch"])
    floor_ms = statistics.median(times["floor"]) if floor else None
    return dict(name=name, jax_ms=jax_ms, torch_ms=torch_ms, ratio=torch_ms / jax_ms, compile_s=compile_s, floor_ms=floor_ms,
                jax_loss=jax_loss, torch_loss=torch_loss, boxes=int(np.asarray(targets.mask).sum()))


def table(rows, *, floor=False):
    """The markdown table of ``bench_one``'s rows (with the conv-only columns when ``floor``)."""
    cols = (" conv-only ms | largest speed-up |", " --- | --- |") if floor else ("", "")
    lines = ["| model | jaxyolo ms | upstream ms | speed-up |" + cols[0] + " compile s | loss jaxyolo | loss upstream | boxes |",
             "| --- | --- | --- | --- |" + cols[1] + " --- | --- | --- | --- |"]
    for r in rows:
        extra = f" {r['floor_ms']:.1f} | {r['torch_ms'] / r['floor_ms']:.2f}x |" if floor else ""
        lines.append(f"| {r['name']} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | {r['ratio']:.2f}x |{extra} {r['compile_s']:.1f} | "
                     f"{r['jax_loss']:.6g} | {r['torch_loss']:.6g} | {r['boxes']} |")
    return "\n".join(lines)


def write_json(path, header, rows):
    """Write ``header`` with ``rows`` to ``path`` (replaced whole, never half written)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(header, rows=rows), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--nc", type=int, default=80)
    p.add_argument("--max-gt", type=int, default=32, help="0..max-gt boxes per image")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor", action="store_true",
                   help="also time the conv-only network (BatchNorm and SiLU skipped): the largest speed-up it allows")
    p.add_argument("--json", metavar="FILE", help="also write the header and rows as JSON to FILE (after every model)")
    args = p.parse_args(argv)

    import jax

    from jaxyolo.models import upstream

    t = upstream.torch()
    device = t.device("cuda" if t.cuda.is_available() else "cpu")
    if device.type == "cpu":
        t.set_num_threads(os.cpu_count() or 1)
    quiet, warning = load_check()
    if warning:
        print(warning, flush=True)
    print(f"machine: {cpu_description()}; {quiet}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"torch {t.__version__} on {device} ({t.get_num_threads()} threads); "
          f"B={args.batch}, {args.img}x{args.img}, nc={args.nc}, median of {args.repeats}", flush=True)
    header = dict(glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), jax=jax.__version__, jax_backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind,
                  torch=t.__version__, torch_device=device.type, machine=cpu_description(), load=quiet,
                  batch=args.batch, img=args.img, nc=args.nc, max_gt=args.max_gt, repeats=args.repeats)
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        r = bench_one(name, batch=args.batch, img=args.img, nc=args.nc, max_gt=args.max_gt, repeats=args.repeats,
                      seed=args.seed, device=device, floor=args.floor)
        rows.append(r)
        print(f"  {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.json:  # after every model: a run stopped half way keeps its rows
            write_json(args.json, header, rows)
    print()
    print(table(rows, floor=args.floor))
    return rows


if __name__ == "__main__":
    from jaxyolo._host import reexec_with_hugepages

    reexec_with_hugepages()  # malloc as the `jaxyolo` program has it (jaxyolo/_host.py)
    main()
