"""Shared set-up of the architecture tests: upstream models built by upstream's
own code, random BatchNorm statistics, random images and targets."""

from __future__ import annotations

import jax
import numpy as np

# XLA's backend (LLVM) optimisation level 0 halves the CPU compile time of
# these whole-network programs (measured 24 s vs 50 s for the YOLOv8n train
# step); the float semantics are the same (no fast-math either way) and the
# results agree with the default level to ~1e-6 relative.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with :data:`FAST_COMPILE`."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def upstream_model(name: str, nc: int, *, seed: int = 0):
    """The upstream PyTorch model of ``name`` (randomly initialised by upstream),
    with random BatchNorm running statistics **and** affine parameters (so a
    swapped weight/bias or mean/var mapping cannot hide behind 1/0 defaults).

    An end-to-end head's one-to-one branch starts as a ``deepcopy`` of the
    one-to-many one; its conv weights get noise of half their spread here, so
    that a branch mapped onto the other cannot pass unnoticed."""
    from jaxyolo.models import upstream

    t = upstream.torch()
    t.manual_seed(seed)
    module = upstream.build_upstream(name, nc=nc)
    g = t.Generator().manual_seed(seed)
    with t.no_grad():
        for m in module.modules():
            if isinstance(m, t.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(t.randn(c, generator=g) * 0.2)
                m.running_var.copy_(t.rand(c, generator=g) + 0.5)
                m.weight.copy_(t.rand(c, generator=g) + 0.5)
                m.bias.copy_(t.randn(c, generator=g) * 0.2)
        for k, p in module.named_parameters():
            if ".one2one_" in k and p.ndim == 4:
                p.add_(t.randn(p.shape, generator=g) * p.std() * 0.5)
    return module


def random_rows(rng, *, batch: int, nc: int, per_image: int = 3, sizes=(0.1, 0.5)) -> np.ndarray:
    """``(batch * per_image, 6)`` float32 rows ``[image, class, cx, cy, w, h]``,
    sides in ``sizes`` (fractions of the image), boxes inside the image."""
    rows = []
    for b in range(batch):
        for _ in range(per_image):
            w, h = rng.uniform(*sizes, 2)
            rows.append([b, rng.integers(nc), rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2), w, h])
    return np.asarray(rows, np.float32)


def upstream_nhwc(module, name: str, images):
    """Eval-mode raw per-level outputs of an upstream module, in jaxyolo's layout:
    a list of ``(B, H, W, C)`` arrays, or for an end-to-end head the dict
    ``{"one2many": [...], "one2one": [...]}`` of such lists (as the jaxyolo model returns)."""
    from jaxyolo.models import upstream
    from jaxyolo.models.registry import get_spec

    family = get_spec(name).family
    t = upstream.torch()
    module.eval()
    with t.no_grad():
        raw = upstream.raw_outputs(module, family, upstream.torch_images(images, family))
    if isinstance(raw, dict):
        return {k: [upstream.to_nhwc(r, family) for r in v] for k, v in raw.items()}
    return [upstream.to_nhwc(r, family) for r in raw]
