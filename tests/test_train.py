"""Training: one-batch overfit, exact resume, optimiser pieces, the progress view.  (That each
loss trains to a stated mAP in the real loop: tests/test_learning.py.)"""

import csv
import dataclasses
import io
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxyolo.data import TrainBatches, load_embedded
from jaxyolo.models import build_detector
from jaxyolo.train import Session, TrainConfig, decay_mask, ema_decay, ema_tau_for, lr_schedule, train
from jaxyolo.train.logs import Progress

TINY = TrainConfig(
    img_size=64, batch=4, epochs=1, max_boxes=8, lr0=0.003, warmup_epochs=0, warmup_min_steps=10,
    schedule="linear", lrf=1.0, grad_clip=None, model="pico",
)
# One fixed batch, seen as it is: every augmentation off.
NO_AUG = dict(mosaic=0.0, translate=0.0, scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0)


@pytest.fixture(scope="module")
def one_batch():
    d = load_embedded("train", size=16, img_size=64)
    batch = TrainBatches(d, batch_size=4, max_boxes=8, seed=0).batch(0, 0)
    assert int(batch["mask"].sum()) >= 8
    return jax.tree.map(jnp.asarray, batch)


def _one_batch_losses(loss, batch, steps, **overrides):
    session = Session(dataclasses.replace(TINY, loss=loss, **NO_AUG, **overrides), nc=6, steps_per_epoch=300)
    state, ema, acc, out = session.state, session.ema, session.new_acc(), []
    for _ in range(steps):
        state, ema, acc = session.train_step(state, ema, acc, batch)
        out.append({k: float(v) for k, v in acc["last"].items()})
    return out


@pytest.mark.slow
def test_yolov8_overfits_one_batch(one_batch):
    logs = _one_batch_losses("yolov8", one_batch, 300, lr0=0.005)
    losses = np.array([r["loss"] for r in logs])
    assert np.all(np.isfinite(losses))
    end = {k: np.mean([r[k] for r in logs[-5:]]) for k in ("loss", "box", "cls", "dfl")}
    # box (1 - CIoU) and cls (BCE) can reach 0: both down >= 80%.  DFL is a
    # cross-entropy against two-bin soft targets, so it has an entropy floor
    # (~0.6 here); the total still falls by ~80%.
    assert end["box"] <= 0.2 * logs[0]["box"], (logs[0], end)
    assert end["cls"] <= 0.2 * logs[0]["cls"], (logs[0], end)
    assert end["dfl"] <= 0.6 * logs[0]["dfl"], (logs[0], end)
    assert end["loss"] <= 0.25 * logs[0]["loss"], (logs[0], end)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    cfg = dataclasses.replace(TINY, epochs=2, train_size=16, val_size=8, grad_clip=10.0, warmup_min_steps=2)
    full = train(cfg, tmp_path / "full", progress=False, log=lambda *_: None)
    assert full["steps"] == 8

    part = train(dataclasses.replace(cfg, max_steps=3), tmp_path / "part", progress=False, log=lambda *_: None)
    assert part["steps"] == 3 and part["map50"] is None
    np.testing.assert_array_equal(part["losses"], full["losses"][:3])
    # A checkpoint that never finished writing (orbax's temporary directory) is ignored.
    (tmp_path / "part" / "checkpoints" / "7.orbax-checkpoint-tmp-1234").mkdir()
    mid = train(dataclasses.replace(cfg, max_steps=6), tmp_path / "part", resume=True, progress=False, log=lambda *_: None)
    assert mid["steps"] == 6
    rest = train(cfg, tmp_path / "part", resume=True, progress=False, log=lambda *_: None)
    assert rest["steps"] == 8
    # The next step's loss after each resume equals the uninterrupted run's, bit for bit.
    np.testing.assert_array_equal(mid["losses"], full["losses"][3:6])
    np.testing.assert_array_equal(rest["losses"], full["losses"][6:8])
    assert rest["map50"] == full["map50"] and rest["map50_95"] == full["map50_95"]
    # steps.csv rows are logged windows (log points: every 50 steps, epoch ends,
    # stops); across the resumes they tile steps 1..8 exactly once.
    rows = list(csv.DictReader((tmp_path / "part" / "steps.csv").open()))
    ends = [int(r["step"]) for r in rows]
    assert ends == [3, 4, 6, 8] and sum(int(r["steps"]) for r in rows) == 8


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TINY, tmp_path / "empty", resume=True, progress=False)


def test_weight_decay_only_on_conv_kernels():
    from flax import nnx

    params = nnx.state(build_detector("yolov8", nc=3, size="pico"), nnx.Param)
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert any(v for k, v in flat.items() if "kernel" in k)
    assert all(v == ("kernel" in k) for k, v in flat.items())  # BN scale/bias and conv biases: no decay


def test_ema_decay_schedule():
    assert float(ema_decay(1, decay=0.9999, tau=2000)) == pytest.approx(0.9999 * (1 - np.exp(-1 / 2000)), rel=1e-4)
    assert float(ema_decay(10**6, decay=0.9999, tau=2000)) == pytest.approx(0.9999, rel=1e-6)
    assert ema_tau_for(TrainConfig(ema_tau=2000.0), 1000) == 2000.0
    assert ema_tau_for(TrainConfig(), 1000) == 200.0


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(lr0=0.01, lrf=0.1, warmup_epochs=1, warmup_min_steps=5, schedule="cosine")
    sched = lr_schedule(cfg, total_steps=100, steps_per_epoch=10)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.005)
    assert float(sched(10)) == pytest.approx(0.01)
    assert float(sched(100)) == pytest.approx(0.001, rel=1e-4)
    vals = [float(sched(i)) for i in range(10, 101)]
    assert all(a >= b - 1e-9 for a, b in zip(vals, vals[1:]))
    lin = lr_schedule(dataclasses.replace(cfg, schedule="linear"), total_steps=100, steps_per_epoch=10)
    assert float(lin(55)) == pytest.approx(0.01 - 0.5 * 0.009, rel=1e-4)
    # YOLOX with SGD scales its LR per image (upstream's 0.01 / 64 per image); AdamW does not.
    yx = lr_schedule(dataclasses.replace(cfg, loss="yolox", batch=32, optimizer="sgd"), total_steps=100, steps_per_epoch=10)
    assert float(yx(10)) == pytest.approx(0.005)
    yx = lr_schedule(dataclasses.replace(cfg, loss="yolox", batch=32, optimizer="adamw"), total_steps=100, steps_per_epoch=10)
    assert float(yx(10)) == pytest.approx(0.01)


def test_sgd_is_nesterov_with_decay_on_weights():
    from jaxyolo.train import make_optimizer

    cfg = TrainConfig(optimizer="sgd", lr0=0.1, warmup_epochs=0, warmup_min_steps=0, grad_clip=None, weight_decay=0.5)
    tx, _ = make_optimizer(cfg, total_steps=1000, steps_per_epoch=10)
    params = {"kernel": jnp.ones((1, 1, 1, 1)), "bias": jnp.ones((1,))}
    upd, _ = tx.update({"kernel": jnp.zeros((1, 1, 1, 1)), "bias": jnp.zeros((1,))}, tx.init(params), params)
    # grad 0 + decay 0.5 * w on the kernel only; nesterov first step: -(lr) * (g + m * g)
    assert float(upd["kernel"].ravel()[0]) == pytest.approx(-0.1 * 0.5 * (1 + 0.937), rel=1e-4)
    assert float(upd["bias"][0]) == 0.0
    assert isinstance(optax.global_norm(upd), jax.Array)


@pytest.mark.slow
def test_musgd_recipe_trains_a_few_steps(one_batch):
    """``optimizer="musgd"`` under the default recipe: 3 steps of pico on one
    batch (clipped at 10, as the recipe's default) with a finite loss move
    every kernel and every backbone leaf (BatchNorm and biases: the SGD half;
    the head's box branch at the two coarser strides gets no gradient from
    this batch); the Muon state (``momentum_sgd`` beside ``momentum``) is
    held by exactly the conv kernels (pico's only 2-D/4-D leaves), and the
    head's class branch runs at lr x3.  (26 s, the train step's compile,
    on a 2-core machine; 2 min when it is busy.)"""
    from flax import nnx

    from jaxyolo.train.muon import MuSGDState, ultralytics_musgd_masks

    cfg = dataclasses.replace(TINY, optimizer="musgd", lr0=0.01, grad_clip=10.0, warmup_min_steps=0, **NO_AUG)
    session = Session(cfg, nc=6, steps_per_epoch=300)
    p0 = jax.device_get(session.state["params"])
    state, ema, acc = session.state, session.ema, session.new_acc()
    losses = []
    for _ in range(3):
        state, ema, acc = session.train_step(state, ema, acc, one_batch)
        losses.append(float(acc["last"]["loss"]))
    assert np.all(np.isfinite(losses)), losses
    p1 = jax.device_get(state["params"])
    moved = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda a, b: bool(np.any(a != b)), p0, p1))[0]}
    assert all(v for k, v in moved.items() if k.endswith("['kernel']") or k.startswith("['backbone']")), moved
    (ms,) = [s for s in state["opt_state"] if isinstance(s, MuSGDState)]
    held = [k for k, b in jax.tree_util.tree_flatten_with_path(ms.momentum_sgd)[0] if b.ndim > 0]
    assert held == [k for k, p in jax.tree_util.tree_flatten_with_path(p1)[0] if p.ndim == 4] != []
    _, _, lr_scale = ultralytics_musgd_masks(nnx.to_pure_dict(nnx.state(build_detector("yolov8", nc=6, size="pico"), nnx.Param)))
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(lr_scale)[0]}
    assert {k for k, v in flat.items() if v == 3.0} == {k for k in flat if k.startswith("['head']['cv3']")} != set()


def test_ultralytics_recipe_session_builds_musgd_groups():
    """``recipe="ultralytics", optimizer="musgd"``: the Session's optimizer
    steps MuSGD on build_optimizer's six LR groups, the lr x3 halves (3..5)
    exactly the head's class branch ``cv3`` (jaxyolo's pico: a top-level
    ``head``), and its state holds Muon buffers for the kernels.  (No step is
    compiled; the steps against upstream: tests/test_recipe_trajectory.py.)"""
    from jaxyolo.train.muon import MuSGDState

    cfg = TrainConfig.from_recipe("ultralytics", optimizer="musgd", model="pico", img_size=64, batch=4, nbs=8, epochs=2, max_boxes=8)
    session = Session(cfg, nc=6, steps_per_epoch=4)
    assert (session.plan.optimizer, session.plan.groups, session.plan.lr0) == ("musgd", 6, 0.01)
    groups = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(session.tx.groups)[0]}
    assert sorted(set(groups.values())) == [0, 1, 2, 3, 4, 5]
    assert {k for k, v in groups.items() if v >= 3} == {k for k in groups if k.startswith("['head']['cv3']")}
    assert all(v % 3 == {"kernel": 0, "scale": 1, "bias": 2}[k.rsplit("'", 2)[-2]] for k, v in groups.items())
    opt = session.state["opt_state"]
    assert isinstance(opt, MuSGDState) and all(b.ndim == 4 for k, b in jax.tree_util.tree_flatten_with_path(opt.momentum_sgd)[0] if "kernel" in jax.tree_util.keystr(k))


def test_musgd_checks_name_the_argument():
    """What cannot work is refused by name: a Muon leaf that is no matrix, a
    parameter group past the plan's LR groups (the jit would clamp the index)."""
    from jaxyolo.train.muon import musgd
    from jaxyolo.train.optim import UltralyticsOptimizer, UltralyticsPlan

    params = {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones((4,))}
    tx = musgd(0.01, muon_mask={"kernel": True, "bias": True})
    with pytest.raises(ValueError, match=r"muon_mask: Muon needs a matrix or conv filter, but \['bias'\] of shape \(4,\)"):
        tx.update(params, tx.init(params), params)
    plan = UltralyticsPlan.from_config(TrainConfig.from_recipe("ultralytics", optimizer="sgd"), nc=3, steps_per_epoch=10)
    with pytest.raises(ValueError, match=r"groups: plan.optimizer 'sgd' has 3 LR groups 0..2, got group 5"):
        UltralyticsOptimizer(plan, {"kernel": 0, "bias": 5})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="muon")


def test_config_validation():
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="yolov7")
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig(img_size=100)
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch=0)


def test_train_config_augment_defaults_are_the_augment_module_defaults():
    """TrainConfig keeps the augmentation strengths flat (one CLI flag each);
    its defaults must be AugmentConfig's (ultralytics' defaults)."""
    from jaxyolo.data.augment import AugmentConfig

    assert TrainConfig().augment_config() == AugmentConfig()
    assert TrainConfig().augment_config(mosaic=False) == dataclasses.replace(AugmentConfig(), mosaic=0.0)


# ------------------------------------------------ the console view of the steps


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _rates(text):
    return [float(r) for r in re.findall(r"([\d.]+) ?it/s", text)]


def test_progress_without_a_tty_is_one_plain_line_per_log_point():
    out = io.StringIO()
    p = Progress(epochs=2, steps_per_epoch=8, names=("loss", "box"), stream=out)
    p.start(0, 1)  # after a first step (the compile): its time is not in the rate
    time.sleep(0.2)
    p.point(4, 4, {"loss": 1.5, "box": 0.25, "cls": 9.0})
    p.point(8, 8, {"loss": 1.25, "box": 0.125, "cls": 9.0})
    p.end()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"step 4  epoch 1/2 \(4/8\)  loss 1\.5  box 0\.25  [\d.]+ it/s  ETA \d\d:\d\d", lines[0]), lines[0]
    assert lines[1].startswith("step 8  epoch 1/2 (8/8)  loss 1.25  box 0.125  ") and lines[1].endswith("ETA 00:00")
    # 3 steps since the clock started, in >= 0.2 s: <= 15 it/s (counting the
    # step done before the clock started would be 20).
    assert 0 < _rates(lines[0])[0] <= 15.0


def test_progress_bar_on_a_terminal_counts_from_its_start():
    out = _Terminal()
    p = Progress(epochs=2, steps_per_epoch=8, names=("loss",), stream=out)
    p.start(1, 1)
    time.sleep(0.2)
    p.point(4, 12, {"loss": 1.5})
    p.end()
    text = out.getvalue()
    assert "\r" in text and "epoch 2/2" in text and "4/8" in text and "loss=1.5" in text  # a tqdm bar
    assert "step 12" not in text  # ...not the plain lines
    assert 0 < _rates(text)[-1] <= 15.0


def test_progress_disabled_writes_nothing():
    for out in (io.StringIO(), _Terminal()):
        p = Progress(epochs=1, steps_per_epoch=8, names=("loss",), enabled=False, stream=out)
        p.start(0, 0)
        assert p.running
        p.point(8, 8, {"loss": 1.0})
        p.end()
        assert out.getvalue() == "" and not p.running
