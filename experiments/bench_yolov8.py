"""YOLOv8 loss benchmark: jaxyolo ``yolov8_loss`` (jitted value_and_grad w.r.t. every
level) vs ultralytics==8.4.190 ``v8DetectionLoss`` forward + backward, same inputs.

    python experiments/bench_losses.py --family yolov8 yolov9
    python experiments/bench_yolov8.py            # this family alone (+ assigner memory)

``bench(preset="yolov9")`` is the YOLOv9 row: ``TalLossConfig(preset="yolov9")``
vs yolo9==1.0.18 ``utils/loss_tal.py`` ``ComputeLoss`` (per-level NCHW leaves).

Upstream gets its training dict (``boxes``/``scores``/``feats`` built from NCHW
leaf tensors, reused, ``.grad`` cleared each call) and the ``batch`` dict
prepared outside the timed region; jaxyolo gets the channels-last
``(B, H, W, 4*reg_max + nc)`` arrays already on device.

The notes also report the dense ``(B, M, A)`` working set of the assigner:
one float32 ``(B, M, A)`` array is ``4*B*M*A`` bytes (B=16, A=8400: 17.2 MB at
M=32, 53.8 MB at M=100), and it scales linearly in each of B, M and A.
``assigner_memory`` measures XLA's temp allocation of the compiled assigner.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from _bench_common import gradient_floor_ms, loss_step_maker, random_targets, result, time_loss_paths, time_torch, to_torch_device, torch_device

STRIDES = (8, 16, 32)
REG_MAX = 16


def make_inputs(*, batch, img, nc, max_gt, seed):
    """Raw head outputs ``(B, H, W, 4*reg_max + nc)`` per level and padded targets."""
    rng = np.random.default_rng(seed)
    preds = [rng.normal(0.0, 1.0, (batch, img // s, img // s, 4 * REG_MAX + nc)).astype(np.float32) for s in STRIDES]
    targets = random_targets(rng, batch=batch, nc=nc, max_gt=max_gt, min_size=0.01)
    return preds, targets


def assigner_memory(*, batch=16, img=640, nc=80, max_boxes=100):
    """Temp bytes XLA allocates for the compiled assigner alone at ``(B, M, A)``."""
    import jax
    import jax.numpy as jnp

    from jaxyolo.assign.tal import task_aligned

    a = sum((img // s) ** 2 for s in STRIDES)
    args = (
        jax.ShapeDtypeStruct((batch, a, nc), jnp.float32),
        jax.ShapeDtypeStruct((batch, a, 4), jnp.float32),
        jax.ShapeDtypeStruct((a, 2), jnp.float32),
        jax.ShapeDtypeStruct((batch, max_boxes), jnp.int32),
        jax.ShapeDtypeStruct((batch, max_boxes, 4), jnp.float32),
        jax.ShapeDtypeStruct((batch, max_boxes), jnp.bool_),
    )
    compiled = jax.jit(task_aligned).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return dict(B=batch, M=max_boxes, A=a, temp_mb=None if temp is None else temp / 1e6,
                bma_f32_mb=4 * batch * max_boxes * a / 1e6)


def bench(*, batch=16, img=640, nc=80, max_gt=32, repeats=10, seed=0, preset="ultralytics"):
    import jax
    import jax.numpy as jnp

    from jaxyolo.objectives.tal import TalLossConfig, yolov8_loss
    from jaxyolo.testing import oracles
    from jaxyolo.testing.oracles.ultralytics import make_v8_criterion
    from jaxyolo.testing.oracles.yolov9 import make_yolov9_criterion

    preds, targets = make_inputs(batch=batch, img=img, nc=nc, max_gt=max_gt, seed=seed)
    config = TalLossConfig(reg_max=REG_MAX, preset=preset)

    make_step = loss_step_maker(yolov8_loss, strides=STRIDES, config=config)

    jpreds = [jnp.asarray(p) for p in preds]
    jtargets = jax.device_put(targets)
    ((jax_total, _), _), jax_ms, compile_s, paths = time_loss_paths(make_step, jpreds, jtargets, repeats=repeats)
    floor_ms = gradient_floor_ms(jpreds, repeats=repeats)

    torch = oracles.torch()
    device = torch_device()
    leaves = [oracles.nhwc_to_torch(p).to(device).requires_grad_(True) for p in preds]
    rows = targets.to_rows()
    if preset == "yolov9":
        crit = to_torch_device(make_yolov9_criterion(strides=STRIDES, nc=nc, reg_max=REG_MAX), device)
        crit.assigner.to(device)
        target_rows = oracles.tensor(rows).to(device)

        def torch_step():
            for leaf in leaves:
                leaf.grad = None
            total, _ = crit(leaves, target_rows)
            total.backward()
            return float(total.item())
    else:
        crit = to_torch_device(make_v8_criterion(strides=STRIDES, nc=nc, reg_max=REG_MAX), device)
        batch_dict = {
            "batch_idx": oracles.tensor(rows[:, 0]).to(device),
            "cls": oracles.tensor(rows[:, 1:2]).to(device),
            "bboxes": oracles.tensor(rows[:, 2:6]).to(device),
        }

        def torch_step():
            for leaf in leaves:
                leaf.grad = None
            b, no = leaves[0].shape[:2]
            cat = torch.cat([x.view(b, no, -1) for x in leaves], 2)
            pd = {"boxes": cat[:, : 4 * REG_MAX], "scores": cat[:, 4 * REG_MAX :], "feats": leaves}
            loss, _ = crit(pd, batch_dict)
            total = loss.sum()
            total.backward()
            return float(total.item())

    torch_total, torch_ms = time_torch(torch_step, repeats=repeats, device=device)

    extra = f" (M={max_gt})"
    if preset == "ultralytics":
        mem = assigner_memory(batch=batch, img=img, nc=nc, max_boxes=100)
        extra += (
            f"; assigner at (B, M, A) = ({mem['B']}, {mem['M']}, {mem['A']}): XLA temp "
            f"{mem['temp_mb']:.0f} MB (one f32 (B,M,A) array = {mem['bma_f32_mb']:.1f} MB; linear in B, M, A)"
            if mem["temp_mb"] is not None
            else f"; one f32 (B,M,A) array = {mem['bma_f32_mb']:.1f} MB"
        )
    family = "yolov9" if preset == "yolov9" else "yolov8"
    return result(family, targets, jax_ms=jax_ms, torch_ms=torch_ms, compile_s=compile_s, floor_ms=floor_ms,
                  jax_total=jax_total, torch_total=torch_total, paths=paths, torch_device=device, extra=extra)

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(bench())
