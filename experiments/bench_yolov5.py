"""YOLOv5 loss benchmark: jaxyolo ``yolov5_loss`` (jitted value_and_grad w.r.t. every
level) vs yolov5==7.0.14 ``ComputeLoss`` forward + backward, same inputs.

    python experiments/bench_losses.py --family yolov5
    python experiments/bench_yolov5.py            # this family alone

Upstream gets its own layout ``(B, na, H, W, 5 + nc)`` prepared outside the
timed region (leaf tensors reused, ``.grad`` cleared each call); jaxyolo gets
the channels-last ``(B, H, W, na, 5 + nc)`` arrays already on device.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from _bench_common import gradient_floor_ms, random_targets, result, time_loss_paths, time_torch, to_torch_device, torch_device

STRIDES = (8, 16, 32)
#: yolov5s P3-P5 anchors in pixels (models/yolov5s.yaml).
ANCHORS = np.array(
    [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]], np.float32
).reshape(3, 3, 2)


def make_inputs(*, batch, img, nc, max_gt, seed):
    """Raw head outputs ``(B, H, W, na, 5 + nc)`` per level and padded targets."""
    rng = np.random.default_rng(seed)
    preds = [rng.normal(0.0, 1.0, (batch, img // s, img // s, 3, 5 + nc)).astype(np.float32) for s in STRIDES]
    targets = random_targets(rng, batch=batch, nc=nc, max_gt=max_gt, min_size=0.01)
    return preds, targets


def bench(*, batch=16, img=640, nc=80, max_gt=32, repeats=10, seed=0):
    import jax
    import jax.numpy as jnp

    from jaxyolo.objectives.yolov5 import Yolov5LossConfig, scale_yolov5_hyp, yolov5_loss
    from jaxyolo.testing import oracles
    from jaxyolo.testing.oracles.yolov5 import Yolov5Oracle

    preds, targets = make_inputs(batch=batch, img=img, nc=nc, max_gt=max_gt, seed=seed)
    config = scale_yolov5_hyp(Yolov5LossConfig(), nc=nc, num_levels=len(STRIDES), img_size=img)

    def make_step(_batched):  # one assignment path (build_targets has no per-image loop)
        @jax.jit
        def step(p, t):
            def f(q):
                total, comps, _ = yolov5_loss(q, t, anchors=ANCHORS, strides=STRIDES, config=config)
                return total, comps

            return jax.value_and_grad(f, has_aux=True)(p)

        return step

    jpreds = [jnp.asarray(p) for p in preds]
    jtargets = jax.device_put(targets)
    ((jax_total, _), _), jax_ms, compile_s, _ = time_loss_paths(make_step, jpreds, jtargets, repeats=repeats,
                                                                  two_paths=False)
    floor_ms = gradient_floor_ms(jpreds, repeats=repeats)

    oracles.torch()  # shim + import before building the upstream objects
    device = torch_device()
    oracle = Yolov5Oracle(anchors=ANCHORS, strides=STRIDES, nc=nc, hyp=config.hyp())
    to_torch_device(oracle.loss, device)
    leaves = [
        oracles.tensor(np.ascontiguousarray(np.transpose(p, (0, 3, 1, 2, 4)))).to(device).requires_grad_(True)
        for p in preds
    ]
    rows = oracles.tensor(targets.to_rows()).to(device)

    def torch_step():
        for leaf in leaves:
            leaf.grad = None
        loss, _ = oracle.loss(leaves, rows)
        loss.sum().backward()
        return float(loss.item())

    torch_total, torch_ms = time_torch(torch_step, repeats=repeats, device=device)

    return result("yolov5", targets, jax_ms=jax_ms, torch_ms=torch_ms, compile_s=compile_s, floor_ms=floor_ms,
                  jax_total=jax_total, torch_total=torch_total, torch_device=device)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(bench())
