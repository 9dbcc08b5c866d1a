"""Shared test configuration.

* Parity runs in float32; on accelerators matmuls are forced to full float32.
* XLA's persistent compilation cache is on (``.jax-cache/`` at the repo root
  unless ``JAX_COMPILATION_CACHE_DIR`` says otherwise), shared by the xdist
  workers and the subprocesses the tests start: the many short training runs
  compile the same train steps, and a hit is keyed by the whole program, so
  it changes no result (a CI clone starts empty).
* The oracles are imported through :mod:`jaxyolo.testing.oracles`, which
  installs the torchvision shim and pins torch to one thread.  An oracle that
  fails to import fails the test that needs it: nothing is skipped.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")  # ultralytics: errors only (no settings banner, no model summaries)
# Before jax is imported; inherited by subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax-cache"))

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

settings.register_profile(
    "jaxyolo",
    deadline=None,
    max_examples=40,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("jaxyolo")

# Parity tolerances from the issues: values rtol 1e-5 / atol 1e-6, gradients 1e-4.
VALUE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="session")
def oracles():
    from jaxyolo.testing import oracles as o

    o.torch()
    return o


@pytest.fixture
def rng(request):
    import zlib

    import numpy as np

    # A stable seed per test so failures reproduce (hash() is salted per process).
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop JAX's in-memory caches of traced and
    compiled programs and give freed memory back to the OS.

    A worker runs dozens of modules, each compiling its own whole-network
    programs.  Kept alive, they grew one xdist worker to 7.5 GB RSS by the end
    of the suite (measured), and a worker then took 6 s from pytest's end to
    its exit handlers, freeing them: past the 5 s that execnet grants a
    worker at shutdown before it sends itself SIGINT, the likely source of
    the stray ``KeyboardInterrupt`` traceback at the end of a run.  Measured
    on five heavy modules in one process: peak RSS 4.25 GB -> 1.30 GB.  A
    later module that compiles the same program again loads it from the
    persistent compilation cache."""
    yield
    import ctypes
    import gc

    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
