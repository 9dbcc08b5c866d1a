"""Helpers shared by the ``bench_<family>.py`` modules."""

from __future__ import annotations

import statistics
import time

import numpy as np


def random_targets(rng, *, batch, nc, max_gt, min_size):
    """Padded targets with 0..max_gt boxes per image, sides in ``[min_size, 0.6]``
    of the image, fully inside it (normalised cxcywh)."""
    from jaxyolo.targets import Targets

    rows = []
    for b in range(batch):
        for _ in range(int(rng.integers(0, max_gt + 1))):
            w, h = rng.uniform(min_size, 0.6, 2)
            cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
            rows.append([b, int(rng.integers(nc)), cx, cy, w, h])
    return Targets.from_rows(np.asarray(rows, np.float64).reshape(-1, 6), batch, max_gt)


def median_ms(fn, repeats):
    """Median wall time of ``fn()`` over ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_jitted(step, *args, repeats):
    """Compile and time a jitted function: ``(output, median ms, compile s)``.

    Compile time is the first call minus a warm call; the median is over
    ``repeats`` further calls, each blocked until ready.
    """
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(step(*args))
    warm = time.perf_counter() - t0
    ms = median_ms(lambda: jax.block_until_ready(step(*args)), repeats)
    return out, ms, first - warm


def gradient_floor_ms(preds, *, repeats):
    """Median ms of the cheapest jitted ``value_and_grad`` with a dense gradient
    of the prediction shapes: the loss ``sum(p[..., 0])`` over every level.

    Any loss that returns ``d loss / d preds`` must at least write that
    gradient (a fresh buffer of the predictions' size) and read the inputs;
    this measures that floor on the same arrays, so ``upstream ms / floor ms``
    is the largest speed-up a ``value_and_grad`` can show on this machine.
    """
    import jax
    import jax.numpy as jnp

    step = jax.jit(jax.value_and_grad(lambda ps: sum(jnp.sum(p[..., 0]) for p in ps)))
    return time_jitted(step, preds, repeats=repeats)[1]


def time_torch(torch_step, *, repeats):
    """Time an upstream forward+backward with torch's default (all-core) threads:
    ``(result of a warm-up call, median ms)``.  The one-thread setting of the
    parity harness is restored afterwards."""
    import os

    from jaxyolo.testing import oracles

    torch = oracles.torch()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        first = torch_step()
        return first, median_ms(torch_step, max(3, repeats // 2))
    finally:
        torch.set_num_threads(threads)


def result(family, targets, *, jax_ms, torch_ms, compile_s, jax_total, torch_total, floor_ms, extra=""):
    """The dict ``bench_losses.py`` prints, with both totals as a same-inputs check
    and the dense-gradient floor (:func:`gradient_floor_ms`)."""
    n_gt = int(np.asarray(targets.mask).sum())
    notes = (
        f"{n_gt} GTs; total jax {float(jax_total):.6g} vs upstream {float(torch_total):.6g}; "
        f"dense-gradient floor {floor_ms:.1f} ms (at most {torch_ms / floor_ms:.1f}x here)" + extra
    )
    return dict(family=family, jax_ms=jax_ms, torch_ms=torch_ms, ratio=torch_ms / jax_ms, compile_s=compile_s,
                floor_ms=floor_ms, notes=notes)
