"""Host-process settings for the ``jaxyolo`` command: transparent huge pages for malloc.

XLA:CPU allocates each step's temporary buffer (a few hundred MB for a nano
model at B 8, 320 px; 570 MB for yolo11n) with ``malloc``, which glibc serves
with a fresh ``mmap`` and returns with ``munmap`` after the step.  The next step
touches every page of it again: on a 2-core Xeon (Linux 6.18, glibc 2.36,
transparent huge pages in ``madvise`` mode, the Debian/Ubuntu default) the
yolo11n step at B 8, 320 px took 140 000 minor page faults and 250-265 ms of
kernel time per step (a 600 ms step); a 68 s ``bench_train.py`` run of the
main command's config (pico, B 16, 128 px, ~200 steps) took 2.8 million
faults and 7.6 s of kernel time.  With glibc's ``glibc.malloc.hugetlb=1``
tunable malloc asks for 2 MB pages (``madvise(MADV_HUGEPAGE)``): 900 faults
and 110 ms per step for the first, 0.4 million faults and 4.3 s for the
second (docs/speed.md).

A tunable is read when the process starts, so :func:`reexec_with_hugepages`
starts the same command line again with it set (``os.execve``: the same
process id; called before JAX starts or any file is opened, at the cost of
importing jaxyolo twice, about 0.6 s).  Only where it can help:
Linux with glibc 2.35 or later (the first with the tunable) and huge pages in ``madvise`` mode (``always`` already gives
them, ``never`` forbids them).  A ``glibc.malloc.hugetlb`` already in
``GLIBC_TUNABLES`` is left as it is, so ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``
turns this off.
"""

from __future__ import annotations

import os
import sys

__all__ = ["hugepage_environ", "reexec_with_hugepages"]

_TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = _THP_MODE) -> str | None:
    """The selected transparent-huge-page mode (``always``/``madvise``/``never``), or ``None``."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc() -> bool:
    """Whether this process runs on a glibc that knows ``glibc.malloc.hugetlb`` (2.35+)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
    except (AttributeError, ValueError, OSError):
        return False


def hugepage_environ(environ=None, *, thp_mode=None, glibc=None) -> dict[str, str] | None:
    """The environment to restart with so that malloc uses huge pages, or
    ``None`` where nothing would change (not Linux/glibc, huge pages not in
    ``madvise`` mode, or ``glibc.malloc.hugetlb`` already set)."""
    environ = os.environ if environ is None else environ
    glibc = (sys.platform.startswith("linux") and _glibc()) if glibc is None else glibc
    thp_mode = _thp_mode() if thp_mode is None else thp_mode
    tunables = environ.get("GLIBC_TUNABLES", "")
    if not glibc or thp_mode != "madvise" or _TUNABLE in tunables:
        return None
    return dict(environ, GLIBC_TUNABLES=f"{tunables}:{_TUNABLE}=1" if tunables else f"{_TUNABLE}=1")


def reexec_with_hugepages() -> None:
    """Restart this process's command line (``sys.orig_argv``) with
    :func:`hugepage_environ`, or return where it would change nothing.  Call
    it first thing in a program's entry point, never from library code."""
    env = hugepage_environ()
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
