"""YOLOX loss benchmark: jaxyolo ``yolox_loss`` (jitted value_and_grad w.r.t. every
level) vs yolox==0.3.0 ``YOLOXHead.get_losses`` forward + backward, same inputs.

    python experiments/bench_losses.py --family yolox
    python experiments/bench_yolox.py            # this family alone
"""

from __future__ import annotations

import os
import sys

import numpy as np

from _bench_common import gradient_floor_ms, random_targets, result, time_jitted, time_torch

STRIDES = (8, 16, 32)


def make_inputs(*, batch, img, nc, max_gt, seed):
    """Raw head outputs ``(B, H, W, 5 + nc)`` per level and padded targets."""
    rng = np.random.default_rng(seed)
    preds = []
    for s in STRIDES:
        p = rng.normal(0.0, 0.5, (batch, img // s, img // s, 5 + nc)).astype(np.float32)
        p[..., 4:] -= 3.0  # logits near YOLOX's prior (prior_prob 0.01 -> bias -4.6)
        preds.append(p)
    targets = random_targets(rng, batch=batch, nc=nc, max_gt=max_gt, min_size=0.02)
    return preds, targets


def bench(*, batch=16, img=640, nc=80, max_gt=32, repeats=10, seed=0):
    import jax
    import jax.numpy as jnp

    from jaxyolo.objectives.yolox import YoloxLossConfig, yolox_loss
    from jaxyolo.testing import oracles
    from jaxyolo.testing.oracles import yolox as oyolox

    preds, targets = make_inputs(batch=batch, img=img, nc=nc, max_gt=max_gt, seed=seed)
    config = YoloxLossConfig()

    @jax.jit
    def step(p, t):
        return jax.value_and_grad(lambda q: yolox_loss(q, t, strides=STRIDES, config=config), has_aux=True)(p)

    jpreds = [jnp.asarray(p) for p in preds]
    ((jax_total, _), _), jax_ms, compile_s = time_jitted(step, jpreds, targets, repeats=repeats)
    floor_ms = gradient_floor_ms(jpreds, repeats=repeats)

    oracles.torch()  # shim + import before building the upstream objects
    head = oyolox.yolox_head(nc, strides=STRIDES)
    labels = oracles.tensor(oyolox.yolox_labels(targets, (img, img))[0])

    def torch_step():
        leaves, outputs, origin, xs, ys, es = oyolox._forward_inputs(head, preds, STRIDES)
        loss = head.get_losses(None, xs, ys, es, labels, outputs, origin, dtype=leaves[0].dtype)[0]
        loss.backward()
        return float(loss)

    torch_total, torch_ms = time_torch(torch_step, repeats=repeats)

    return result("yolox", targets, jax_ms=jax_ms, torch_ms=torch_ms, compile_s=compile_s, floor_ms=floor_ms,
                  jax_total=jax_total, torch_total=torch_total)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(bench())
