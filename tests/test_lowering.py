"""The real train and predict steps lower for GPU and TPU, checked on this CPU with ``jax.export``.

No accelerator is needed: ``jax.export`` lowers a jitted function for other platforms from a
CPU-only jaxlib.  Each case exports :class:`jaxyolo.train.step.Session`'s ``train_step`` (model,
on-device augmentation, loss, optimiser, EMA) and ``predict`` (eval forward, decode, multi-label
NMS) for ``("cuda", "tpu")`` at a small static shape, traced with the accelerator assignment path
(``batched=True``, what ``jax.default_backend()`` selects on a GPU or TPU), and checks the
StableHLO: no host callback (the export refuses one), no float64, and no sort whose operand spans the anchor axis (the CPU
path's stable argsorts; on TPU a sort over A anchors per GT is the slow path the batched
assigners avoid).  A change that breaks GPU or TPU lowering, or puts a callback or float64 into
a step, fails here.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxyolo.train import TrainConfig
from jaxyolo.train.step import Session

S, B, M = 96, 2, 8
A = (S // 8) ** 2 + (S // 16) ** 2 + (S // 32) ** 2  # 189 anchor points at strides 8, 16, 32
PLATFORMS = ("cuda", "tpu")


def _accelerator_trace(monkeypatch):
    """Trace as on an accelerator: the losses pick their assignment path from
    ``jax.default_backend()`` at trace time (:func:`jaxyolo.assign.tal.resolve_batched`)."""
    from jaxyolo.assign.tal import resolve_batched

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_batched(None) is True  # the losses will trace their accelerator path


def _batch(k):
    return {
        "image": jnp.zeros((B, k, S, S, 3), jnp.uint8), "rects": jnp.tile(jnp.asarray([0, 0, S, S], jnp.int32), (B, k, 1)),
        "boxes": jnp.full((B, k, M, 4), 0.25, jnp.float32), "classes": jnp.zeros((B, k, M), jnp.int32), "mask": jnp.ones((B, k, M), bool),
    }


def check_module(text: str, what: str):
    """The StableHLO text of an export: no float64 type, no sort over the anchor axis.  (A host
    callback cannot get this far: ``jax.export`` refuses to serialise one.)"""
    assert not re.search(r"[<x]f64>", text), f"{what}: float64 in the step"
    # top_k is a "chlo.top_k" composite the backends run natively; its reference decomposition
    # (a private function holding a full sort) is left out.
    text = re.sub(r"func\.func private @chlo\.top_k\.impl.*?\n  \}", "", text, flags=re.S)
    spanning = []
    # "stablehlo.sort"(operands) <{dimension = d, ...}> ({comparator}) : (operand types) -> ...
    for dim, types in re.findall(r'"stablehlo\.sort"\(.*?dimension = (\d+).*?\}\) : \((tensor<[^>]*>)', text, flags=re.S):
        shape = types[len("tensor<"):-1].split("x")[:-1]
        if int(shape[int(dim)]) == A:
            spanning.append(types)
    assert not spanning, f"{what}: sorts over the {A} anchors: {spanning[:3]}"


@pytest.mark.parametrize("model", ["yolov8n", "yolov5n", "yolox-nano"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_and_predict_steps_lower_for_gpu_and_tpu(model, precision, monkeypatch):
    _accelerator_trace(monkeypatch)
    cfg = TrainConfig(model=model, img_size=S, batch=B, max_boxes=M, train_size=4, val_size=2, epochs=2, precision=precision, seed=7)
    s = Session(cfg, nc=3, steps_per_epoch=2)
    k = 4  # a mosaic step (the other step differs only in K = 1)
    exp = export.export(s.train_step, platforms=PLATFORMS)(s.state, s.ema, s.new_acc(), _batch(k))
    assert exp.platforms == PLATFORMS
    check_module(exp.mlir_module(), f"{model} {precision} train step")
    pred = export.export(s.predict, platforms=PLATFORMS)(s.ema["params"], s.ema["stats"], jnp.zeros((B, S, S, 3), jnp.uint8), 300)
    check_module(pred.mlir_module(), f"{model} {precision} predict")


def test_check_catches_a_callback_float64_and_an_anchor_sort():
    """The checks fail on what they look for (each in a tiny exported function)."""
    x = jnp.zeros((B, M, A), jnp.float32)

    def text(fn):
        return export.export(jax.jit(fn), platforms=PLATFORMS)(x).mlir_module()

    def callback(v):
        return jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(v.shape, v.dtype), v)

    with pytest.raises(NotImplementedError, match="callback"):  # in a step, the export itself fails
        text(callback)
    with jax.enable_x64(True):
        f64 = text(lambda v: (v.astype(jnp.float64) * 2).astype(jnp.float32))
    with pytest.raises(AssertionError, match="float64"):
        check_module(f64, "f64")
    with pytest.raises(AssertionError, match="sorts over"):
        check_module(text(lambda v: jnp.argsort(v, axis=-1, stable=True)), "sort")
    check_module(text(lambda v: jax.lax.top_k(v, 10)[0]), "top_k")  # top-k over anchors is fine
