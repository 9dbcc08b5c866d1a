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
