"""The training loop as a product: data parallel on several devices, bf16,
logging without host syncs, the console output, the run-folder lock, crash
safety, resume edge cases."""

import csv
import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxyolo.train import TrainConfig, train
from jaxyolo.train import checkpoint as ckpt
from jaxyolo.train.checkpoint import RunLock, RunLockedError

TINY = TrainConfig(
    img_size=64, batch=8, epochs=1, train_size=64, val_size=8, max_boxes=8, warmup_min_steps=2, eval_every=1,
)
QUIET = dict(progress=False, log=lambda *_: None)


def _xla_flags(devices: int) -> str:
    """XLA_FLAGS for ``devices`` CPU devices, keeping the caller's own flags
    (e.g. ``--xla_cpu_max_isa=AVX2``, which checks the suite on another code path)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def _run_script(code: str, *, devices: int = 1, timeout: int = 900) -> str:
    env = dict(os.environ, XLA_FLAGS=_xla_flags(devices), PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _params(out_dir, config):
    """The trained parameters of the latest checkpoint, as numpy leaves."""
    import jax

    from jaxyolo.train import Session

    s = Session(config, nc=6, steps_per_epoch=config.train_size // config.batch)
    mngr = ckpt.manager(out_dir)
    state = ckpt.restore(mngr, mngr.latest_step(), state=s.state)["state"]
    return jax.tree.leaves(jax.device_get(state["params"]))


@pytest.mark.slow
def test_data_parallel_equals_one_device_and_resumes_across_device_counts(tmp_path):
    out = _run_script(f"""
        import json, dataclasses
        import jax
        from jaxyolo.train import TrainConfig, train
        assert jax.device_count() == 4, jax.devices()
        q = dict(progress=False, log=lambda *_: None, log_every=1)
        cfg = TrainConfig(img_size=64, batch=8, epochs=1, train_size=64, val_size=8, max_boxes=8, warmup_min_steps=2, max_steps=6)
        r4 = train(cfg, {str(tmp_path / 'd4')!r}, devices=4, **q)
        # the 4-device run continues on 1 device to the end of the epoch (8 steps)
        rest = train(dataclasses.replace(cfg, max_steps=None), {str(tmp_path / 'd4')!r}, resume=True, devices=1, **q)
        # the uninterrupted one-device run (max_steps only stops a run: its first 6 steps are the 6-step run's)
        full = train(dataclasses.replace(cfg, max_steps=None), {str(tmp_path / 'full')!r}, devices=1, **q)
        try:
            train(dataclasses.replace(cfg, batch=6), {str(tmp_path / 'bad')!r}, devices=4, **q)
            err = None
        except ValueError as e:
            err = str(e)
        # Step by step on the 4-device trajectory: each 4-device step against a
        # 1-device step from the same state and batch (the runs' executables).
        import numpy as np
        from jaxyolo import parallel
        from jaxyolo.data import TrainBatches, load_embedded
        from jaxyolo.train import Session
        td = load_embedded("train", img_size=64, size=64)
        bt = TrainBatches(td, batch_size=8, max_boxes=8, seed=cfg.seed)
        s4, s1 = (Session(cfg, nc=td.nc, steps_per_epoch=bt.steps_per_epoch, mesh=parallel.make_mesh(n), log_every=1) for n in (4, 1))
        st, em, per_step = s4.state, s4.ema, []
        for k in range(6):
            b = bt.batch(0, k, mosaic=cfg.mosaic_in_epoch(0))
            one = s1.train_step(*jax.device_put(jax.device_get((st, em)), s1.replicated), s1.new_acc(), jax.device_put(b, s1.batch_sharding))
            st, em, a4 = s4.train_step(st, em, s4.new_acc(), jax.device_put(b, s4.batch_sharding))
            one, four = jax.device_get(one), jax.device_get((st, em, a4))
            diff = lambda x, y: max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
            per_step.append({{"four": {{n: float(v) for n, v in four[2]["last"].items()}}, "one": {{n: float(v) for n, v in one[2]["last"].items()}},
                             "params": diff(four[0]["params"], one[0]["params"]), "stats": diff(four[0]["stats"], one[0]["stats"]), "ema": diff(four[1], one[1])}})
        print(json.dumps({{"r4": r4["losses"], "r1": full["losses"][:6], "rest": rest["losses"], "full": full["losses"],
                          "map_rest": rest["map50"], "map_full": full["map50"], "err": err, "per_step": per_step}}))
    """, devices=4)
    r = json.loads(out.strip().splitlines()[-1])
    assert len(r["r4"]) == len(r["r1"]) == 6
    # Step 1 (same parameters, same batch) differs only in the order of the
    # global-batch reductions: 1.2e-6 seen.  Later steps start from parameters
    # that differ by that rounding, and the discrete assignment (an anchor
    # entering or leaving a GT's top-k) turns it into jumps: 1.9e-4 (AdamW)
    # and 8.5e-4 (SGD) by step 6 seen on two CPUs; one device drifts as far
    # from itself when half its initial parameters move by one ulp (0.9e-4 to
    # 3.5e-4, experiments/dp_drift.py).  A per-device BatchNorm or
    # loss normalisation, or a summed instead of averaged gradient, is off by
    # percents from step 1 or 2.
    np.testing.assert_allclose(r["r4"][0], r["r1"][0], rtol=1e-5)
    np.testing.assert_allclose(r["r4"], r["r1"], rtol=2e-3)
    # Every step of the 4-device run equals a 1-device step from the same
    # state: losses to 2.1e-6, gradient norm 7e-6, parameters 7.6e-6 (AdamW's
    # first update is ~lr * sign(g): rounding in a tiny gradient moves it),
    # BatchNorm statistics 1.2e-7, EMA 2.2e-6 seen.  A summed instead of
    # averaged gradient is 4x on grad_norm; per-device statistics or loss
    # normalisation are off by percents.
    # Machine independence (issue 25): both sides run on the same CPU, so its
    # instruction set changes both alike; what can differ is a TAL choice that
    # the reduction order decides (an anchor at a GT's top-k boundary within
    # ~1e-6 of the GT's largest align metric, the size of the step-1
    # difference).  In the model-level cases (tests/_margins.py) the smallest
    # top-k gap per GT was below 2e-4 for about 1 GT in 100 (5 of ~400), so
    # a gap below 1e-6 is expected for about 1 boundary in 2 x 10^4, and these
    # 6 steps have ~300 boundaries: a 1-2 % chance that some CPU's trajectory
    # meets one and this test fails there (the loss then jumps by ~1e-4).
    for k, d in enumerate(r["per_step"]):
        for n in ("loss", "box", "cls", "dfl"):
            np.testing.assert_allclose(d["four"][n], d["one"][n], rtol=1e-5, err_msg=f"step {k + 1} {n}")
        np.testing.assert_allclose(d["four"]["grad_norm"], d["one"]["grad_norm"], rtol=5e-5, err_msg=f"step {k + 1}")
        assert d["params"] < 5e-5 and d["stats"] < 1e-6 and d["ema"] < 2e-5, (k + 1, d)
    assert r["per_step"][0]["one"]["loss"] == pytest.approx(r["r1"][0], rel=1e-5)  # the same start as the runs
    # steps.csv (log_every=1: one row per step) agrees value by value.
    for i, (a, b) in enumerate(zip(_rows(tmp_path / "d4" / "steps.csv")[:6], _rows(tmp_path / "full" / "steps.csv"))):
        assert a["step"] == b["step"]
        for k in ("loss", "box", "cls", "dfl", "lr"):
            np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-5 if i == 0 else 2e-3, err_msg=k)
        # The gradient norm (a diagnostic, ~1e3 this early) sums ~1e5 squared
        # gradients in a different order across 4 devices: 2e-4 seen.
        np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-3)
    assert len(r["rest"]) == 2
    np.testing.assert_allclose(r["rest"], r["full"][6:], rtol=2e-3)
    assert r["map_rest"] == pytest.approx(r["map_full"], abs=0.02)
    assert "batch=6 is not divisible by the 4 devices" in r["err"]
    assert not (tmp_path / "bad").exists()  # nothing written before the inputs validated


@pytest.mark.slow
def test_log_every_does_not_change_training(tmp_path):
    cfg = dataclasses.replace(TINY, max_steps=6)
    a = train(cfg, tmp_path / "every1", log_every=1, **QUIET)
    b = train(cfg, tmp_path / "every4", log_every=4, **QUIET)
    assert a["losses"] == b["losses"]  # every step's loss, fetched from the device window
    for x, y in zip(_params(tmp_path / "every1", cfg), _params(tmp_path / "every4", cfg)):
        np.testing.assert_array_equal(x, y)
    rows = _rows(tmp_path / "every4" / "steps.csv")
    assert [(int(r["step"]), int(r["steps"])) for r in rows] == [(4, 4), (6, 2)]
    # A window's row is the mean of its steps.
    assert float(rows[0]["loss"]) == pytest.approx(np.mean(b["losses"][:4]), rel=1e-6)
    assert [int(r["step"]) for r in _rows(tmp_path / "every1" / "steps.csv")] == list(range(1, 7))


@pytest.mark.slow
def test_bf16_trains_like_float32(tmp_path):
    cfg = dataclasses.replace(TINY, train_size=400, max_steps=50, batch=8)
    f32 = train(cfg, tmp_path / "f32", **QUIET)
    b16 = train(dataclasses.replace(cfg, precision="bf16"), tmp_path / "b16", **QUIET)
    assert len(b16["losses"]) == 50 and np.all(np.isfinite(b16["losses"]))
    end32, end16 = np.mean(f32["losses"][-10:]), np.mean(b16["losses"][-10:])
    assert abs(end16 - end32) <= 0.1 * end32, (end32, end16)
    # ...and it is really bf16 (not float32 under another name): the first losses differ.
    assert f32["losses"][0] != b16["losses"][0]
    p = _params(tmp_path / "b16", dataclasses.replace(cfg, precision="bf16"))
    assert all(x.dtype == np.float32 for x in p)  # master weights stay float32


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from jaxyolo.train import step as step_mod

    real = step_mod.make_objective

    def poisoned(config, **kw):
        f = real(config, **kw)

        def g(preds, targets):
            obj, logs = f(preds, targets)
            bad = jnp.where(targets.mask.sum() >= 0, jnp.nan, 0.0)  # always NaN, traced
            return obj + bad, dict(logs, loss=logs["loss"] + bad)

        return g

    monkeypatch.setattr(step_mod, "make_objective", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(detected at step 3\)"):
        train(dataclasses.replace(TINY, seed=123), tmp_path / "nan", log_every=3, **QUIET)
    assert not list((tmp_path / "nan" / "checkpoints").glob("[0-9]*"))  # no poisoned checkpoint
    assert not (tmp_path / "nan" / ".lock").exists()  # the run left on an exception, after its last write


@pytest.mark.slow
def test_console_compile_line_plain_lines_and_summary(tmp_path, capsys, monkeypatch):
    """Without a TTY (pytest captures stderr): the compile line before the
    first step, one plain line per log point whose rate leaves out the
    compile, the absolute run folder with everything in it, no lock left."""
    from jaxyolo.train.step import Session

    messages, seen_at_first_step = [], []
    real_init = Session.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        step = self.train_step

        def slow_first(*args):
            out = step(*args)
            if not seen_at_first_step:
                seen_at_first_step.append(list(messages))
                time.sleep(4)  # a long compile: it must count in neither the rate nor the ETA
            return out

        self.train_step = slow_first

    monkeypatch.setattr(Session, "__init__", init)
    monkeypatch.chdir(tmp_path)  # a relative out_dir, as scripts/train.sh's runs/<loss>
    train(TINY, "run", log=messages.append, log_every=3)
    err = capsys.readouterr().err
    # TINY's max_boxes=8 is below the embedded set's 9 objects: said once, first.
    cut = "warning: max_boxes=8 is below the 9 objects of the most crowded training image: the boxes beyond it are cut (counted in boxes_cut)"
    assert seen_at_first_step == [[cut, "compiling the train step..."]]  # logged before the first step
    assert re.fullmatch(r"first step done in [\d.]+ s", messages[2]) and float(messages[2].split()[-2]) >= 4
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert [int(ln.split()[1]) for ln in lines] == [3, 6, 8]  # one per log point: every 3 steps and the epoch's end
    first = re.fullmatch(r"step 3  epoch 1/1 \(3/8\)  loss [\d.]+  box [\d.]+  cls [\d.]+  dfl [\d.]+  ([\d.]+) (it/s|s/it)  ETA \d\d:\d\d", lines[0])
    assert first, lines[0]
    # Steps 2-3 in well under 4 s: with the compile counted it would be < 0.75 it/s.
    assert first[2] == "it/s" and float(first[1]) > 1.0, lines[0]
    run = tmp_path / "run"
    assert not (run / ".lock").exists()  # gone once train() returns
    listed = sorted(p.name + "/" * p.is_dir() for p in run.iterdir())
    assert {"checkpoints/", "config.json", "final.json", "metrics.csv", "results.png", "steps.csv"} <= set(listed)
    assert messages[-1] == f"run folder: {run}  ({', '.join(listed)})"


def test_run_lock_file_exists_only_while_held(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as lock:
        assert (run / ".lock").read_text().startswith(f"pid {os.getpid()} on ") and lock.stale is None
    assert not (run / ".lock").exists()
    # A holder killed with the lock (no release) leaves the file: the next
    # acquire takes it over and reports the dead holder.
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from jaxyolo.train.checkpoint import RunLock
        RunLock({str(run)!r}).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """)], timeout=300)
    assert child.returncode == -signal.SIGKILL
    assert (run / ".lock").exists()
    with RunLock(run) as lock:
        assert lock.stale is not None and re.match(r"pid \d+ on ", lock.stale) and f"pid {os.getpid()} " not in lock.stale
    assert not (run / ".lock").exists()


def test_run_lock_released_while_a_second_process_opens_it(tmp_path, monkeypatch):
    """The holder deletes the file as another process has it open: that
    process's lock on the deleted file must not count (a third would then
    lock a new file beside it)."""
    holder = RunLock(tmp_path).acquire()
    real_flock = fcntl.flock

    def flock(fd, op):
        if op & fcntl.LOCK_EX and holder._fd is not None:
            holder.release()  # between the second process's open and its flock
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    second = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    second.release()
    assert not (tmp_path / ".lock").exists()


def test_run_lock_refuses_a_second_writer(tmp_path):
    from jaxyolo.cli import main

    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()
        with pytest.raises(SystemExit, match=rf"error: .*in use by pid {os.getpid()}"):
            main(["train", "--epochs", "1", "--img-size", "64", "--batch", "4", "--train-size", "8", "--val-size", "4",
                  "--no-progress", "--out", str(tmp_path / "run")])
    RunLock(tmp_path / "run").acquire().release()  # free again once the holder is done


@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, threading, time
        from pathlib import Path
        import dataclasses
        from jaxyolo.train import TrainConfig, train
        from jaxyolo.train import checkpoint as ckpt
        cfg = TrainConfig(img_size=64, batch=8, epochs=1, train_size=64, val_size=8, max_boxes=8, warmup_min_steps=2, eval_every=1)
        q = dict(progress=False, log=lambda *_: None)
        train(dataclasses.replace(cfg, max_steps=2), {str(run)!r}, **q)
        real = ckpt.save
        def killing_save(*a, **k):
            def watch():
                while not list(Path({str(run / 'checkpoints')!r}).glob('*tmp*')):
                    time.sleep(0.0005)
                os.kill(os.getpid(), signal.SIGKILL)   # in the middle of the write
            threading.Thread(target=watch, daemon=True).start()
            real(*a, **k)
            time.sleep(30)   # never returns normally
        ckpt.save = killing_save
        train(dataclasses.replace(cfg, max_steps=4), {str(run)!r}, resume=True, **q)
    """)], env=dict(os.environ, XLA_FLAGS=_xla_flags(1)))
    assert child.wait(timeout=900) == -signal.SIGKILL
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert any("tmp" in n for n in leftovers), leftovers  # killed mid-write: the temporary directory is there
    assert ckpt.manager(run).latest_step() == 2
    # The lock died with the process (its file stays, naming it); the resume
    # takes it over and continues from step 2 as if nothing happened.
    assert f"pid {child.pid} on " in (run / ".lock").read_text()
    messages = []
    resumed = train(dataclasses.replace(TINY, max_steps=4), run, resume=True, progress=False, log=messages.append)
    assert any(m.endswith("was left behind (that process was killed or crashed); taken over") and f"pid {child.pid} on " in m for m in messages), messages
    assert not (run / ".lock").exists()
    full = train(dataclasses.replace(TINY, max_steps=4), tmp_path / "full", **QUIET)
    assert resumed["losses"] == full["losses"][2:]


# The start of a training child's script: ``slow_steps(s)`` makes every
# train step take ``s`` seconds longer and print "step" after it, so that a
# signal sent after step N lands mid-run.
_SLOW_STEPS = """
    import time
    from jaxyolo.train import loop
    def slow_steps(seconds):
        init = loop.Session.__init__
        def slow_init(self, *a, **k):
            init(self, *a, **k)
            fast = self.train_step
            def step(*args):
                out = fast(*args)
                time.sleep(seconds)
                print("step", flush=True)
                return out
            self.train_step = step
        loop.Session.__init__ = slow_init
"""

# A child that trains through the CLI (its exit status is tested) with
# ~0.3 s per step (a signal sent after step N lands mid-epoch), printing
# "step" after each, and whose first checkpoint write after a signal sends it
# a second SIGTERM (the save must not be disturbed by it).
_SLOW_CLI = _SLOW_STEPS + """
    import os, signal, sys
    from jaxyolo import cli
    from jaxyolo.train import checkpoint as ckpt, preempt
    slow_steps(0.3)
    handle, save = preempt.StopSignals._handle, ckpt.save
    got = []
    def handle_(self, signum, frame):
        got.append(signum)
        handle(self, signum, frame)
    def save_(*a, **k):
        if len(got) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal, handled in the middle of the write
            got.append("sent")
        return save(*a, **k)
    preempt.StopSignals._handle, ckpt.save = handle_, save_
    sys.exit(cli.main(sys.argv[1:]))
"""


def _signal_after(child, n_steps: int, *, group: bool = False) -> list:
    """Read the child's "step" lines; after the ``n_steps``-th send SIGTERM
    to it (``group``: to its process group, its decode workers included).
    Returns the lines read."""
    lines = []
    while sum(ln == "step" for ln in lines) < n_steps:
        ln = child.stdout.readline()
        assert ln, "".join(lines) + child.stderr.read()[-3000:]
        lines.append(ln.strip())
    if group:
        os.killpg(child.pid, signal.SIGTERM)
    else:
        child.send_signal(signal.SIGTERM)
    return lines


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_exactly(tmp_path):
    """SIGTERM to the process group of ``jaxyolo train`` streaming a dataset
    (as a VM's shutdown or Ctrl-C reach the decode workers too) after its
    4th step, and a second one during the checkpoint write."""
    from _datasets import make_yaml_dataset

    from jaxyolo.train.preempt import PREEMPTED_EXIT_CODE

    data_yaml, _ = make_yaml_dataset(tmp_path / "data", n_train=96, n_val=4)
    run = tmp_path / "run"
    args = ["train", "--data", str(data_yaml), "--epochs", "1", "--img-size", "64", "--batch", "8", "--max-boxes", "8", "--cache", "none", "--workers", "1",
            "--log-every", "1", "--save-every", "3", "--no-progress", "--out", str(run)]
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SLOW_CLI), *args], env=dict(os.environ, XLA_FLAGS=_xla_flags(1)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _signal_after(child, 4, group=True)
    out, err = child.communicate(timeout=600)
    assert child.returncode == PREEMPTED_EXIT_CODE == 75, out[-2000:] + err[-3000:]
    stopped = re.search(r"^stopped by SIGTERM at step (\d+) \(epoch 1/1, batch (\d+)/12\); checkpoint in (\S+); continue with --resume$", out, re.M)
    assert stopped, out
    s = int(stopped[1])
    assert 4 <= s < 12 and int(stopped[2]) == s and stopped[3] == str(run / "checkpoints" / str(s))
    assert "SIGTERM again: still stopping" in err  # the second signal, during the write, changed nothing
    assert ckpt.manager(run).latest_step() == s
    assert {int(p.name) for p in (run / "checkpoints").iterdir()} == {s, 3 * ((s - 1) // 3)}  # --save-every 3 (two kept)
    assert not (run / ".lock").exists() and not (run / "final.json").exists()
    # The interrupted run's steps and the resumed run's next steps are those of an uninterrupted run, bit for bit.
    assert "cannot be read" not in out + err  # the workers outlived the signal: every decode of the steps before the stop came back
    cfg = TrainConfig.from_json(json.loads((run / "config.json").read_text()))
    full = train(cfg, tmp_path / "full", log_every=1, cache="none", workers=1, **QUIET)
    assert [float(r["loss"]) for r in _rows(run / "steps.csv")] == full["losses"][:s]
    messages = []
    rest = train(cfg, run, resume=True, log_every=1, cache="none", workers=1, progress=False, log=messages.append)
    assert f"resumed {run} at step {s} (epoch 1/1, batch {s + 1}/12)" in messages
    assert rest["losses"] == full["losses"][s:] and rest["preempted"] is None
    assert rest["map50"] == full["map50"]


@pytest.mark.slow
def test_resume_edge_cases(tmp_path):
    messages = []
    cfg = TINY  # 8 steps in one epoch
    full = train(cfg, tmp_path / "full", **QUIET)
    train(dataclasses.replace(cfg, max_steps=3), tmp_path / "part", **QUIET)
    # --max-steps equal to where the run stands: no step runs.
    same = train(dataclasses.replace(cfg, max_steps=3), tmp_path / "part", resume=True, progress=False, log=messages.append)
    assert same["steps"] == 3 and same["losses"] == [] and "nothing to train" in messages[-1]
    rest = train(cfg, tmp_path / "part", resume=True, **QUIET)
    # The resumed epoch's metrics row averages the whole epoch (steps 1-8), not the steps after the resume.
    a, b = _rows(tmp_path / "full" / "metrics.csv"), _rows(tmp_path / "part" / "metrics.csv")
    assert len(a) == len(b) == 1
    for k in ("loss", "box", "cls", "dfl", "lr", "grad_norm", "map50", "map50_95"):
        assert float(a[0][k]) == pytest.approx(float(b[0][k]), rel=1e-6), k
    assert rest["map50"] == full["map50"]
    # Resuming a finished run says so and only re-evaluates.
    messages.clear()
    again = train(cfg, tmp_path / "part", resume=True, progress=False, log=messages.append)
    assert "the run is complete (1 epochs, 8 steps)" in messages[0] and not any("epoch 2" in m for m in messages)
    assert again["steps"] == 8 and again["losses"] == [] and again["map50"] == full["map50"]


@pytest.mark.slow
def test_a_stop_at_the_last_step_skips_the_evaluation_and_resume_does_it(tmp_path, monkeypatch):
    """A stop agreed at an epoch's last step writes the epoch-end checkpoint
    without evaluating (the grace period is for the checkpoint); when that
    was the run's last step, --resume evaluates and writes final.json."""
    from jaxyolo.train import preempt

    monkeypatch.setattr(preempt.StopSignals, "reached", lambda self, step: step == 8)
    messages = []
    stopped = train(TINY, tmp_path / "run", progress=False, log=messages.append)
    assert stopped["preempted"] == "preemption notice" and stopped["steps"] == 8 and stopped["map50"] is None
    assert "epoch 1: evaluation skipped (stopping); --resume evaluates at the end of the run" in messages
    assert ckpt.manager(tmp_path / "run").latest_step() == 8 and not (tmp_path / "run" / "final.json").exists()
    assert _rows(tmp_path / "run" / "metrics.csv")[0]["map50"] == ""
    monkeypatch.undo()
    done = train(TINY, tmp_path / "run", resume=True, **QUIET)
    full = train(TINY, tmp_path / "full", **QUIET)
    assert done["map50"] == full["map50"] and done["preempted"] is None
    assert json.loads((tmp_path / "run" / "final.json").read_text())["map50"] == full["map50"]


def test_python_dash_m_runs_the_cli():
    p = subprocess.run([sys.executable, "-m", "jaxyolo", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--log-every" in p.stdout and "--precision" in p.stdout and "--devices" in p.stdout
    assert "--save-every" in p.stdout and "exit status 75" in " ".join(p.stdout.split())


def test_log_every_and_cache_validated(tmp_path):
    with pytest.raises(ValueError, match="log_every must be a positive int"):
        train(TINY, tmp_path / "x", log_every=0, **QUIET)
    with pytest.raises(ValueError, match="save_every must be a positive int or None, got 0"):
        train(TINY, tmp_path / "x", save_every=0, **QUIET)
    with pytest.raises(ValueError, match="cache must be one of auto, ram, disk, none, got 'runs/cache'"):
        train(TINY, tmp_path / "x", cache="runs/cache", **QUIET)  # the old --cache DIR: now --cache disk --cache-dir DIR
    assert not (tmp_path / "x").exists()


# A training child for the multi-process test: ``python -c _MULTI MODE OUT DATA``
# trains 4 steps of DATA into OUT (MODE "run" | "resume" | "preempt": 2.5 s
# a step and "step" printed after each, so that a signal sent after step 1
# stops the run before step 4: JAX's SIGTERM listener polls about once a
# second, and the processes then agree on the largest step counter plus
# one), counting the image files its decode workers open; its last line is
# JSON, its exit status 75 when stopped by a signal.
_MULTI = _SLOW_STEPS + """
    import json, sys
    import jax
    from jaxyolo.data.stream import StreamedFrames
    from jaxyolo.train import TrainConfig, train
    mode, out, data = sys.argv[1:]
    opened = []
    submit = StreamedFrames._submit
    StreamedFrames._submit = lambda self, i, row: (opened.append(self.files[i]), submit(self, i, row))[1]
    if mode == "preempt":
        slow_steps(2.5)
    cfg = TrainConfig(data=data, img_size=64, batch=8, epochs=1, max_boxes=8, warmup_min_steps=2, max_steps=4, close_mosaic=0)
    r = train(cfg, out, resume=mode == "resume", progress=False, log=lambda m: print(m, flush=True), log_every=1, cache="none", workers=1)
    print(json.dumps([jax.process_index(), jax.process_count(), jax.device_count(), r["losses"], opened, r["steps"], r["preempted"]]), flush=True)
    sys.exit(75 if r["preempted"] else 0)
"""


def _launch_two(mode: str, out, data) -> list:
    """Two processes x two CPU devices running :data:`_MULTI`, with the
    standard coordinator variables (as on a multi-host GPU/TPU cluster)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS=_xla_flags(2), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(_MULTI), mode, str(out), str(data)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs):
    """``(exit codes, last JSON line of each, (stdout, stderr) of each)``."""
    outs = [p.communicate(timeout=900) for p in procs]
    codes = [p.returncode for p in procs]
    try:
        return codes, [json.loads(o[0].strip().splitlines()[-1]) for o in outs], outs
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"exit codes {codes}: " + " | ".join(o[0][-1500:] + o[1][-2500:] for o in outs)) from None


@pytest.mark.slow
def test_multi_process_run_equals_one_device_and_stops_at_one_step_on_sigterm(tmp_path):
    """Two processes x two CPU devices streaming a dataset on disk: each
    process decodes only the files of its half of every batch (mosaic frames
    included; counted), the losses equal a one-device run's.  SIGTERM to one
    process stops both at the same step (JAX's preemption service), each
    exits with status 75, one joint checkpoint at that step; resumed, the
    next steps' losses are the uninterrupted run's, bit for bit."""
    from _datasets import make_yaml_dataset

    from jaxyolo.data.formats import discover
    from jaxyolo.data.pipeline import TrainBatches
    from jaxyolo.data.stream import DecodePool, open_split

    data_yaml, _ = make_yaml_dataset(tmp_path / "data", n_train=63, n_val=4)
    codes, got, outs = _finish(_launch_two("run", tmp_path / "mh", data_yaml))
    assert codes == [0, 0], [o[1][-2000:] for o in outs]
    got.sort()
    assert [g[0] for g in got] == [0, 1] and all(g[1:3] == [2, 4] for g in got)
    env = dict(os.environ, XLA_FLAGS=_xla_flags(1))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(_MULTI), "run", str(tmp_path / "one"), str(data_yaml)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads(p.stdout.strip().splitlines()[-1])
    assert one[1:3] == [1, 1]
    np.testing.assert_allclose(got[0][3][0], one[3][0], rtol=1e-5)
    np.testing.assert_allclose(got[0][3], one[3], rtol=2e-3)  # see the 4-device test
    assert got[0][3] == got[1][3]
    # Each process opened exactly the files of its rows of the 4 batches (x 4 mosaic frames), each once
    # (its ring of (2 + 2) x 4 x 4 = 64 rows keeps every frame it decoded: none is decoded again).
    spec = discover(data_yaml, "train")
    with DecodePool(0) as pool:
        index = open_split(spec, img_size=64, pool=pool)
        for k in range(2):
            rows = TrainBatches(index, batch_size=8, max_boxes=8, seed=0, process_index=k, process_count=2)
            mine = {str(spec.files[i]) for j in range(4) for i in rows.indices(0, j, mosaic=True).ravel()}
            assert sorted(got[k][4]) == sorted(mine)
        index.close()
    assert len(set(got[0][4])) < len(spec.files) and len(set(got[1][4])) < len(spec.files)  # neither opened the whole set
    # Only process 0 wrote the logs; the checkpoint is one, written jointly.
    assert len(_rows(tmp_path / "mh" / "steps.csv")) == 4
    assert ckpt.manager(tmp_path / "mh").latest_step() == 4

    # Preemption: SIGTERM to process 1 after its first step.
    procs = _launch_two("preempt", tmp_path / "pre", data_yaml)
    _signal_after(procs[1], 1)
    codes, pre, outs = _finish(procs)
    assert codes == [75, 75], [o[1][-2000:] for o in outs]
    s = pre[0][5]
    assert pre[1][5] == s and 1 <= s < 4 and pre[0][6] == pre[1][6] == "preemption notice"
    for o in outs:
        assert f"stopped by preemption notice at step {s} (epoch 1/1, batch {s}/" in o[0], o[0]
    assert pre[0][3] == pre[1][3] == got[0][3][:s]
    assert ckpt.manager(tmp_path / "pre").latest_step() == s
    codes, rest, outs = _finish(_launch_two("resume", tmp_path / "pre", data_yaml))
    assert codes == [0, 0], [o[1][-2000:] for o in outs]
    assert rest[0][3] == rest[1][3] == got[0][3][s:]
