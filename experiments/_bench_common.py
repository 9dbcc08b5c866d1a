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


#: Names of the two assignment paths of a loss's ``batched=`` option.
PATH_NAMES = {False: "cpu path", True: "accelerator path"}


def loss_step_maker(loss, **kwargs):
    """``make_step(batched)`` for :func:`time_loss_paths`: the jitted
    ``value_and_grad`` (w.r.t. the predictions) of ``loss(preds, targets,
    batched=batched, **kwargs)``, whose output is ``(total, aux...)``."""
    import jax

    def make_step(batched):
        @jax.jit
        def step(p, t):
            return jax.value_and_grad(lambda q: loss(q, t, batched=batched, **kwargs), has_aux=True)(p)

        return step

    return make_step


def time_loss_paths(make_step, *args, repeats, two_paths=True):
    """Time ``make_step(batched)`` (a jitted step) on the path that ``batched=None``
    picks on this backend and, for a loss with two paths, on the other one too.

    Returns ``(output, ms, compile_s, paths)`` of the auto path, ``paths``
    ``{path name: ms}`` (empty for a single-path loss).
    """
    from jaxyolo.assign.tal import resolve_batched

    auto = resolve_batched(None)
    out, ms, compile_s = time_jitted(make_step(auto), *args, repeats=repeats)
    if not two_paths:
        return out, ms, compile_s, {}
    other_ms = time_jitted(make_step(not auto), *args, repeats=repeats)[1]
    return out, ms, compile_s, {PATH_NAMES[auto]: ms, PATH_NAMES[not auto]: other_ms}


def torch_device():
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    from jaxyolo.testing import oracles

    return "cuda" if oracles.torch().cuda.is_available() else "cpu"


def to_torch_device(obj, device):
    """Move an upstream loss object to ``device``: its tensor attributes (also in
    lists/tuples), its ``nn.Module`` attributes and its ``device`` attribute.
    ``obj`` itself is moved too when it is an ``nn.Module``.  Returns ``obj``."""
    from jaxyolo.testing import oracles

    torch = oracles.torch()
    if device == "cpu":
        return obj
    if isinstance(obj, torch.nn.Module):
        obj.to(device)
    for name, value in list(vars(obj).items()):
        if name == "device":
            setattr(obj, name, torch.device(device))
        elif isinstance(value, torch.Tensor):
            setattr(obj, name, value.to(device))
        elif isinstance(value, torch.nn.Module):
            value.to(device)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            setattr(obj, name, type(value)(v.to(device) for v in value))
    return obj


def time_torch(torch_step, *, repeats, device="cpu"):
    """Time an upstream forward+backward with torch's default (all-core) threads,
    synchronising the GPU after each call on ``device="cuda"``:
    ``(result of a warm-up call, median ms)``.  The one-thread setting of the
    parity harness is restored afterwards."""
    import os

    from jaxyolo.testing import oracles

    torch = oracles.torch()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)

    def step():
        out = torch_step()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    try:
        first = step()
        return first, median_ms(step, max(3, repeats // 2))
    finally:
        torch.set_num_threads(threads)


def result(family, targets, *, jax_ms, torch_ms, compile_s, jax_total, torch_total, floor_ms, paths=None,
           torch_device="cpu", extra=""):
    """The dict ``bench_losses.py`` prints, with both totals as a same-inputs check,
    the dense-gradient floor (:func:`gradient_floor_ms`) and, for a loss with two
    assignment paths, each path's time (``paths``; ``jax_ms`` is the auto path)."""
    n_gt = int(np.asarray(targets.mask).sum())
    notes = (
        f"{n_gt} GTs; total jax {float(jax_total):.6g} vs upstream {float(torch_total):.6g}; "
        f"dense-gradient floor {floor_ms:.2f} ms (at most {torch_ms / floor_ms:.1f}x here)" + extra
    )
    return dict(family=family, batch=int(targets.batch_size), jax_ms=jax_ms, torch_ms=torch_ms,
                ratio=torch_ms / jax_ms, compile_s=compile_s, floor_ms=floor_ms, paths=dict(paths or {}),
                torch_device=torch_device, jax_total=float(jax_total), torch_total=float(torch_total), notes=notes)


def cpu_description() -> str:
    """The CPU's model name, core count and widest vector ISA, e.g.
    ``Intel(R) Xeon(R) Processor, 2 cores, AVX-512`` (from ``/proc/cpuinfo``
    on Linux).  An ``--xla_cpu_max_isa`` in ``XLA_FLAGS`` is named too: XLA
    then emits code for that ISA only (torch's equivalent is
    ``ATEN_CPU_CAPABILITY``)."""
    import os
    import platform
    import re

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        name = m.group(1).strip() if m else name
        m = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        pass
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags
           else "NEON/SVE" if platform.machine() in ("arm64", "aarch64") else "unknown ISA")
    capped = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores, {isa}" + (f" (XLA capped at {capped.group(1)})" if capped else "")


def load_check(seconds: float = 1.0, busy_threshold: float = 0.1) -> tuple[str, str | None]:
    """``(description, warning or None)`` of how busy this machine is *now*.

    On Linux, the share of CPU time that others used over ``seconds`` (from
    ``/proc/stat``: every state but idle and iowait, while this process
    sleeps) and the *steal* share, the time a virtual machine's host gave to
    other guests; the 1-minute load average is printed too but not judged, as
    it still counts a run that just finished.  A CPU benchmark on a machine
    that is busy (over ``busy_threshold``) or stolen from measures the
    neighbours as much as the code: call this before starting.
    """
    import os
    import time

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        steal = v[7] if len(v) > 7 else 0
        return sum(v[:8]), idle, steal

    try:
        t0, i0, s0 = sample()
        time.sleep(seconds)
        t1, i1, s1 = sample()
    except (OSError, ValueError, IndexError):
        return f"load average {load:.2f}", None
    total = max(t1 - t0, 1)
    busy, steal = 1 - (i1 - i0) / total, (s1 - s0) / total
    text = f"busy {busy:.0%} (steal {steal:.0%}) over {seconds:g} s before the run, load average {load:.2f}"
    if busy > busy_threshold or steal > busy_threshold / 2:
        return text, (f"WARNING: this machine is busy ({text}): CPU timings and their ratio are unreliable; "
                      "rerun on a quiet machine")
    return text, None
