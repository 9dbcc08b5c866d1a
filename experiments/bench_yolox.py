"""YOLOX loss benchmark: jaxyolo ``yolox_loss`` (jitted value_and_grad w.r.t. every
level) vs yolox==0.3.0 ``YOLOXHead.get_losses`` forward + backward, same inputs.

    python experiments/bench_losses.py --family yolox
    python experiments/bench_yolox.py            # this family alone
"""

from __future__ import annotations

import os
import sys

import numpy as np

from _bench_common import gradient_floor_ms, loss_step_maker, random_targets, result, time_loss_paths, time_torch, to_torch_device, torch_device

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

    make_step = loss_step_maker(yolox_loss, strides=STRIDES, config=config)

    jpreds = [jnp.asarray(p) for p in preds]
    jtargets = jax.device_put(targets)
    ((jax_total, _), _), jax_ms, compile_s, paths = time_loss_paths(make_step, jpreds, jtargets, repeats=repeats)
    floor_ms = gradient_floor_ms(jpreds, repeats=repeats)

    torch = oracles.torch()  # shim + import before building the upstream objects
    device = torch_device()
    head = to_torch_device(oyolox.yolox_head(nc, strides=STRIDES), device)
    labels = oracles.tensor(oyolox.yolox_labels(targets, (img, img))[0]).to(device)
    leaves = [oracles.nhwc_to_torch(p, grad=True).to(device).detach().requires_grad_(True) for p in preds]

    def torch_step():
        # YOLOXHead.forward's training branch on the head outputs (oracles.yolox._forward_inputs)
        outputs, xs, ys, es = [], [], [], []
        for k, (leaf, stride) in enumerate(zip(leaves, STRIDES)):
            leaf.grad = None
            output = torch.cat([leaf[:, :4], leaf[:, 4:5], leaf[:, 5:]], 1)
            output, grid = head.get_output_and_grid(output, k, stride, leaf.type())
            xs.append(grid[:, :, 0])
            ys.append(grid[:, :, 1])
            es.append(torch.zeros(1, grid.shape[1], device=leaf.device).fill_(stride).type_as(leaf))
            outputs.append(output)
        loss = head.get_losses(None, xs, ys, es, labels, torch.cat(outputs, 1), [], dtype=leaves[0].dtype)[0]
        loss.backward()
        return float(loss)

    torch_total, torch_ms = time_torch(torch_step, repeats=repeats, device=device)

    return result("yolox", targets, jax_ms=jax_ms, torch_ms=torch_ms, compile_s=compile_s, floor_ms=floor_ms,
                  jax_total=jax_total, torch_total=torch_total, paths=paths, torch_device=device)

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(bench())
