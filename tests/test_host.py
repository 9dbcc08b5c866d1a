"""The ``jaxyolo`` program restarts itself with glibc's huge-page malloc tunable (jaxyolo/_host.py)."""

import os
import subprocess
import sys
import textwrap

from jaxyolo import _host


def test_hugepage_environ_only_where_it_changes_something():
    env = {"PATH": "/bin"}
    assert _host.hugepage_environ(env, thp_mode="madvise", glibc=True) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # appended to the user's own tunables, never replacing them
    out = _host.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp_mode="madvise", glibc=True)
    assert out["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # the user's own choice (0 turns it off) wins; nothing to gain or not allowed; not glibc
    assert _host.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp_mode="madvise", glibc=True) is None
    assert _host.hugepage_environ(env, thp_mode="always", glibc=True) is None
    assert _host.hugepage_environ(env, thp_mode="never", glibc=True) is None
    assert _host.hugepage_environ(env, thp_mode="", glibc=True) is None  # no THP file
    assert _host.hugepage_environ(env, thp_mode="madvise", glibc=False) is None


def test_thp_mode_reads_the_selected_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert _host._thp_mode(str(f)) == "madvise"
    assert _host._thp_mode(str(tmp_path / "missing")) is None


_CHILD = textwrap.dedent("""
    from jaxyolo._host import reexec_with_hugepages
    reexec_with_hugepages()
    import ctypes, os
    def huge_kb():
        if not os.path.exists("/proc/self/smaps_rollup"):  # not Linux: nothing to count
            return -1
        with open("/proc/self/smaps_rollup") as f:
            return int(next(line.split()[1] for line in f if line.startswith("AnonHugePages")))
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    before = huge_kb()
    n = 64 << 20
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    print(os.environ.get("GLIBC_TUNABLES"), huge_kb() - before)
""")


def test_restarted_process_mallocs_huge_pages():
    def run(**extra):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | extra
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True, timeout=120)
        tunables, huge_kb = out.stdout.split()
        return tunables, int(huge_kb)

    if _host._thp_mode() != "madvise" or not _host._glibc():
        assert run()[0] == "None"  # nothing to gain here: no restart, the environment untouched
        return
    tunables, huge_kb = run()
    assert tunables == "glibc.malloc.hugetlb=1"
    # some of the 64 MB block in 2 MB pages (all of it on a quiet machine; a
    # fragmented one may refuse some), none with the tunable off
    assert huge_kb >= 2 << 10
    assert run(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == ("glibc.malloc.hugetlb=0", 0)  # the user's choice is kept


def test_jaxyolo_program_runs_through_the_restart():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-m", "jaxyolo", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: jaxyolo") and out.stdout.count("usage: jaxyolo") == 1
