"""XLA compile options jaxyolo passes to the ``jax.jit`` of its model steps.

One option today, on the CPU only:

* **XLA:CPU's YNNPACK convolutions are off** (``xla_cpu_experimental_ynn_fusion_type``
  without ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``; YNNPACK keeps its
  reductions and matrix products).  jaxlib 0.10 hands every convolution to
  YNNPACK by default; for the convolutions of a YOLO train step (small channel
  counts, the weight gradients as convolutions with a window the size of the
  feature map) XLA's Eigen convolutions are faster: the yolov8n train step at
  B 16, 128x128 went from 300-314 ms to 197-259 ms on a 2-core Xeon (docs/speed.md,
  *Speed* of the architectures).  Turning every YNNPACK fusion off instead is
  slower (412 ms): its BatchNorm reductions are the fast ones.

The option is passed per ``jit`` (``compiler_options``), so it applies to
jaxyolo's steps and nothing else in the process.  A user who sets
``xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` keeps their choice,
and a jaxlib that does not know the option (it is experimental) gets none.
"""

from __future__ import annotations

import functools
import os

__all__ = ["compiler_options"]

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """The ``compiler_options`` for ``jax.jit`` of a model step on ``backend``
    (default: JAX's default backend); ``None`` where jaxyolo sets nothing."""
    import jax

    if (backend or jax.default_backend()) != "cpu" or _YNN in os.environ.get("XLA_FLAGS", ""):
        return None
    return _cpu_options()


@functools.cache
def _cpu_options() -> dict[str, str] | None:
    import jax
    import jax.numpy as jnp

    options = {_YNN: _YNN_WITHOUT_CONVOLUTIONS}
    try:  # an unknown option or enum value fails at compile time: probe once
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - any refusal means "not this jaxlib"
        return None
    return options
