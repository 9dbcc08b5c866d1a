"""The end-to-end losses and MuSGD against ultralytics 8.4.190.

* :func:`jaxyolo.e2e_loss` against upstream ``E2ELoss`` (YOLO26, on a random
  ``yolo26n.yaml`` model: ``reg_max`` 1) and ``E2EDetectLoss`` (YOLOv10, on a
  random ``yolov10n.yaml`` model: ``reg_max`` 16), fed the same raw head
  outputs of both branches: total, items and the gradients w.r.t. both
  branches, at two epochs of the ``o2m`` decay, with empty and crowded
  images, and the assignment of each branch.  Inputs have continuous random
  logits and distances, so no two anchors tie on a positive alignment
  metric: the target scores are compared everywhere and the foreground /
  GT index where the target score is positive (an anchor that a top-k picks
  with zero metric is tie-order dependent and carries zero weight).
* :func:`jaxyolo.train.muon.musgd` against ``MuSGD.step`` with the optimizer
  that ``BaseTrainer.build_optimizer(name="MuSGD")`` builds on a small torch
  model (conv kernels, linear weights, biases, BatchNorm), 5 steps.
* properties: finite gradients with all-padded targets, jit == eager, no
  retrace when the number of valid boxes or the epoch changes.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import GRAD_TOL, VALUE_TOL
from test_tal_helpers import make_preds, make_rows, targets_from_rows

import jaxyolo
from jaxyolo.assign.tal import task_aligned_details
from jaxyolo.objectives.tal import decode_predictions, gt_pixels
from jaxyolo.train.muon import musgd, ultralytics_musgd_masks

STRIDES = (8, 16, 32)
NC, B, HW, M, EPOCHS = 3, 4, (96, 128), 32, 100
# case -> (our config, upstream loss on which model): 8.4.190 trains every one-to-one head
# with E2ELoss, YOLOv10's included ("yolov10-E2ELoss"); E2EDetectLoss is YOLOv10's own loss
CONFIGS = {"yolo26": jaxyolo.E2ELossConfig(variant="yolo26", reg_max=1),
           "yolov10": jaxyolo.E2ELossConfig(variant="yolov10", reg_max=16),
           "yolov10-E2ELoss": jaxyolo.E2ELossConfig(variant="yolo26", reg_max=16)}
ORACLE = {"yolo26": ("yolo26", "yolo26n.yaml"), "yolov10": ("yolov10", "yolov10n.yaml"),
          "yolov10-E2ELoss": ("yolo26", "yolov10n.yaml")}
ITEM_NAMES = {"box": "box_loss", "cls": "cls_loss", "dfl": "dfl_loss", "l1": "l1_loss"}
TRACES = collections.Counter()
ERRORS = collections.defaultdict(float)  # measured maxima (README table), by kind


def _assign(preds, targets, cfg):
    d = decode_predictions(preds, strides=STRIDES, reg_max=cfg.reg_max)
    gt, mask = gt_pixels(targets, d["imgsz"])
    a = task_aligned_details(jax.nn.sigmoid(jnp.concatenate(d["pred_scores"], axis=1)), d["pred_bboxes"] * d["stride"],
                             d["anchor_points"] * d["stride"], targets.classes, gt, mask, topk=cfg.topk, topk2=cfg.topk2,
                             strides=STRIDES)
    return {"target_scores": a.target_scores, "fg_mask": a.fg_mask, "target_gt_idx": a.target_gt_idx}


@functools.cache
def _step(case):
    """One jitted function per case: loss, items, gradients w.r.t. both branches, both assignments."""
    cfg = CONFIGS[case]

    def f(po, pp, targets, w):
        TRACES[case] += 1

        def loss(a, b):
            return jaxyolo.e2e_loss(a, b, targets, o2m_weight=w, strides=STRIDES, config=cfg)

        (total, items), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(po, pp)
        return total, items, grads, [_assign(p, targets, c) for p, c in zip((po, pp), cfg.branch_configs())]

    return jax.jit(f)


def _preds(rng, reg_max):
    """Per level ``(B, H, W, 4*reg_max + nc)``; for ``reg_max == 1`` the box channels are
    ltrb distances in grid units, spread over [0.2, 5]."""
    if reg_max > 1:
        return make_preds(rng, B, HW, nc=NC, reg_max=reg_max)
    return [np.concatenate([rng.uniform(0.2, 5.0, p.shape[:3] + (4,)), p[..., 8:]], -1).astype(np.float32)
            for p in make_preds(rng, B, HW, nc=NC, reg_max=2)]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    big = np.abs(b) > 1e-5
    return float(np.max(np.abs(a - b)[big] / np.abs(b)[big])) if big.any() else 0.0


def _weight(case, epoch):
    return jaxyolo.e2e_o2m_weight(epoch, EPOCHS) if CONFIGS[case].variant == "yolo26" else None


def _record(kind, value):
    ERRORS[kind] = max(ERRORS[kind], value)


def _run(oracles, case, preds_o2m, preds_o2o, targets, epoch):
    total, items, grads, assign = _step(case)(preds_o2m, preds_o2o, targets, _weight(case, epoch))
    variant, yaml = ORACLE[case]
    ref = oracles.e2e_detection_loss(preds_o2m, preds_o2o, targets, variant=variant, yaml=yaml, nc=NC, epochs=EPOCHS,
                                     epoch=epoch)
    np.testing.assert_allclose(float(total), ref["total"], **VALUE_TOL)
    _record(f"{case} value", _rel([float(total)], [ref["total"]]))
    assert {ITEM_NAMES[k] for k in items} == set(ref["items"])
    for k, v in items.items():
        np.testing.assert_allclose(float(v), ref["items"][ITEM_NAMES[k]], **VALUE_TOL)
        _record(f"{case} items", _rel([float(v)], [ref["items"][ITEM_NAMES[k]]]))
    for ours, theirs in ((grads[0], ref["grads_o2m"]), (grads[1], ref["grads_o2o"])):
        for g, r in zip(ours, theirs):
            assert np.all(np.isfinite(g))
            np.testing.assert_allclose(g, r, **GRAD_TOL)
            _record(f"{case} grad abs", float(np.max(np.abs(np.asarray(g) - r))))
            _record(f"{case} grad rel (|ref| > 1e-5)", _rel(g, r))
    if variant == "yolo26":
        np.testing.assert_allclose(float(_weight(case, epoch)), ref["o2m"], rtol=1e-7)
    for ours, key in zip(assign, ("assign_o2m", "assign_o2o")):
        theirs = ref[key]
        np.testing.assert_allclose(ours["target_scores"], theirs["target_scores"], **VALUE_TOL)
        _record(f"{case} scores abs", float(np.max(np.abs(np.asarray(ours["target_scores"]) - theirs["target_scores"]))))
        pos = theirs["target_scores"].sum(-1) > 0
        np.testing.assert_array_equal(np.asarray(ours["target_scores"]).sum(-1) > 0, pos)
        assert np.asarray(ours["fg_mask"])[pos].all() and theirs["fg_mask"][pos].all()
        np.testing.assert_array_equal(np.asarray(ours["target_gt_idx"])[pos], theirs["target_gt_idx"][pos])
    return total, items, ref


@pytest.mark.parametrize("case", ["yolo26", "yolov10", "yolov10-E2ELoss"])
def test_e2e_loss_parity(oracles, rng, case):
    reg_max = CONFIGS[case].reg_max
    # epoch 0 (o2m 0.8): one empty image, a crowded one (30 GTs); epoch 37 (o2m 0.538): overlapping clusters
    cases = [(0, [0, 5, 30, 12], "random", (0.04, 0.6)), (37, [30, 0, 8, 30], "overlap", (0.2, 0.6))]
    for epoch, counts, kind, size in cases:
        rows = make_rows(rng, B, counts, nc=NC, kind=kind, size=size)
        _, _, ref = _run(oracles, case, _preds(rng, reg_max), _preds(rng, reg_max), targets_from_rows(rows, B, M), epoch)
        assert ref["assign_o2o"]["fg_mask"].sum() > 0
    # a batch of empty images at the last epoch (o2m 0.1): only the class term remains
    rows = np.zeros((0, 6), np.float32)
    _, items, _ = _run(oracles, case, _preds(rng, reg_max), _preds(rng, reg_max), targets_from_rows(rows, B, M), EPOCHS - 1)
    assert float(items["box"]) == 0 and float(items["cls"]) > 0


@pytest.mark.parametrize("epochs", [1, 2, 10, 100])
def test_o2m_schedule_matches_update(oracles, epochs):
    ref = oracles.e2e_o2m_schedule(epochs, epochs + 2)  # also past the end: stays at 0.1
    traced = jax.jit(jaxyolo.e2e_o2m_weight, static_argnums=1)(jnp.arange(epochs + 2), epochs)
    for e, (o2m, o2o) in enumerate(ref):
        np.testing.assert_allclose(float(jaxyolo.e2e_o2m_weight(e, epochs)), o2m, rtol=1e-7)
        np.testing.assert_allclose(float(traced[e]), o2m, rtol=1e-6)
        np.testing.assert_allclose(max(1 - float(jaxyolo.e2e_o2m_weight(e, epochs)), 0), o2o, rtol=1e-6, atol=1e-7)


def test_all_padded_targets_finite_and_no_retrace(rng):
    """All-padded targets: finite loss and gradients, no box term; then new counts of valid
    boxes and new epochs reuse the one compiled program."""
    step = _step("yolo26")
    po, pp = _preds(rng, 1), _preds(rng, 1)
    empty = jaxyolo.Targets(jnp.zeros((B, M, 4)), jnp.zeros((B, M), jnp.int32), jnp.zeros((B, M), bool))
    total, items, grads, _ = step(po, pp, empty, _weight("yolo26", 3))
    assert np.isfinite(float(total)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(items["box"]) == 0 and float(items["l1"]) == 0
    before = TRACES["yolo26"]
    for epoch, counts in ((5, [1, 0, 0, 0]), (50, [3, 7, 0, 31]), (99, [M, M, M, M])):
        rows = make_rows(rng, B, counts, nc=NC)
        total, *_ = step(po, pp, targets_from_rows(rows, B, M), _weight("yolo26", epoch))
        assert np.isfinite(float(total))
    assert TRACES["yolo26"] == before


def test_jit_equals_eager(rng):
    po, pp = _preds(rng, 1), _preds(rng, 1)
    targets = targets_from_rows(make_rows(rng, B, [4, 0, 12, 2], nc=NC), B, M)
    w = _weight("yolo26", 10)
    total, items, _, _ = _step("yolo26")(po, pp, targets, w)
    e_total, e_items = jaxyolo.e2e_loss(po, pp, targets, o2m_weight=w, strides=STRIDES, config=CONFIGS["yolo26"])
    np.testing.assert_allclose(float(e_total), float(total), rtol=1e-6)
    for k in items:
        np.testing.assert_allclose(float(e_items[k]), float(items[k]), rtol=1e-6, atol=1e-9)


def test_e2e_config_checks(rng):
    po, pp = _preds(rng, 1), _preds(rng, 1)
    targets = targets_from_rows(np.zeros((0, 6), np.float32), B, 4)
    with pytest.raises(ValueError, match="variant"):
        jaxyolo.E2ELossConfig(variant="yolov8")
    with pytest.raises(ValueError, match="o2m_weight"):
        jaxyolo.e2e_loss(po, pp, targets, config=jaxyolo.E2ELossConfig(variant="yolov10", reg_max=1), o2m_weight=0.5)
    with pytest.raises(TypeError, match="E2ELossConfig"):
        jaxyolo.e2e_loss(po, pp, targets, config=jaxyolo.TalLossConfig())
    o2m, o2o = CONFIGS["yolo26"].branch_configs()
    assert (o2m.topk, o2m.topk2, o2o.topk, o2o.topk2) == (10, None, 7, 1)
    o2m, o2o = CONFIGS["yolov10"].branch_configs()
    assert (o2m.topk, o2o.topk, o2o.topk2) == (10, 1, None)


# --- MuSGD --------------------------------------------------------------------------


def _torch_model(oracles):
    """A small torch model as build_optimizer sees one: ``model.model`` is a sequence whose
    last entry (the head) has ``cv3``; conv kernels, BatchNorm, linear layers with and
    without bias, a tall and a wide matrix, and two matrices with equal column counts
    (upstream batches those: the short one is iterated transposed)."""
    t = oracles.torch()
    nn = t.nn
    t.manual_seed(0)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.cv2 = nn.ModuleList([nn.Conv2d(32, 64, 1)])
            self.cv3 = nn.ModuleList([nn.Conv2d(32, 3, 3)])
            self.lin = nn.Linear(10, 40, bias=False)

    class Block(nn.Module):
        def __init__(self, c1, c2, k):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, k, bias=False)
            self.bn = nn.BatchNorm2d(c2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(Block(8, 16, 3), Block(16, 32, 1), Head())
            self.model[1].fc = nn.Linear(32, 10)

    m = Model()
    with t.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
        for blk in m.model[:2]:
            blk.bn.weight.uniform_(0.5, 1.5)
    return m


def _to_flax(name, x):
    """torch ``state_dict`` entry -> (flax path, array): conv (O, I, kh, kw) -> kernel (kh, kw, I, O),
    linear (out, in) -> kernel (in, out), BatchNorm weight -> scale."""
    *mods, leaf = name.split(".")
    if leaf == "weight":
        leaf = "kernel" if x.ndim in (2, 4) else "scale"
        x = np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else (x.T if x.ndim == 2 else x)
    return tuple(mods) + (leaf,), x


def _nest(flat):
    out = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def _musgd_case(oracles, ns_float32, *, steps=5, lr=0.01, decay=5e-4, momentum=0.9):
    model = _torch_model(oracles)
    rng = np.random.default_rng(1)
    named = {k: p.detach().numpy().copy() for k, p in model.named_parameters()}
    grads = [{k: (rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in named.items()} for _ in range(steps)]
    ref, groups = oracles.musgd_steps(model, grads, lr=lr, momentum=momentum, decay=decay, ns_float32=ns_float32)
    to_flax = {k: _to_flax(k, v) for k, v in named.items()}
    params = _nest({path: jnp.asarray(x) for path, x in to_flax.values()})
    muon_mask, decay_mask, lr_scale = ultralytics_musgd_masks(params)
    # the grouping equals build_optimizer's
    for k, (path, _) in to_flax.items():
        mine = (functools.reduce(dict.get, path, muon_mask), functools.reduce(dict.get, path, decay_mask),
                functools.reduce(dict.get, path, lr_scale))
        use_muon, wd, group_lr = groups[k]
        assert mine == (use_muon, wd != 0, pytest.approx(group_lr / lr)), k
    tx = musgd(lr, momentum=momentum, weight_decay=decay, muon_mask=muon_mask, decay_mask=decay_mask, lr_scale=lr_scale,
               ns_dtype=jnp.float32 if ns_float32 else jnp.bfloat16)
    state, update = tx.init(params), jax.jit(tx.update)
    worst = 0.0
    for step in range(steps):
        g = _nest({to_flax[k][0]: jnp.asarray(_to_flax(k, v)[1]) for k, v in grads[step].items()})
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        for k, (path, _) in to_flax.items():
            ours, theirs = np.asarray(functools.reduce(dict.get, path, params)), _to_flax(k, ref[step][k])[1]
            worst = max(worst, float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))))
    return worst


def test_musgd_matches_upstream_float32_newton_schulz(oracles):
    """Everything but bfloat16's rounding (both sides iterate Newton-Schulz in float32):
    the groups, momentum, Nesterov, decay on the Muon-updated weight, mixing, scalings."""
    worst = _musgd_case(oracles, True)
    ERRORS["musgd f32 (of tensor max)"] = worst
    assert worst < 1e-6  # measured 1e-7 of each tensor's max


def test_musgd_matches_upstream_bfloat16(oracles):
    """Upstream as is (bfloat16 Newton-Schulz).  torch's CPU bfloat16 GEMM (oneDNN, AMX on
    this machine) accumulates in its own order, which differs between torch's own kernels;
    an entry rounded to the neighbouring bfloat16 moves that step's Muon update at the
    bfloat16 ulp level (jaxyolo/train/muon.py).  On this model's matrices (at most 64x32)
    measured 2.4e-8 of the tensor's max after 5 steps at lr 0.01, up to 1.2e-5 on other
    draws of the same shapes; the floor grows with the matrices (0.5% of the Muon update
    on yolo26n's 256x384 filters)."""
    worst = _musgd_case(oracles, False)
    ERRORS["musgd bf16 (of tensor max)"] = worst
    assert worst < 3e-5


def test_musgd_masks_match_build_optimizer_on_yolov8n(oracles):
    """ultralytics_musgd_masks on jaxyolo's yolov8n parameter tree (paths = state_dict keys)
    against the groups build_optimizer(name="MuSGD") gives upstream's yolov8n, key by key."""
    from flax import nnx

    from jaxyolo.models import build_model

    params = nnx.to_pure_dict(nnx.state(build_model("yolov8n", nc=NC), nnx.Param))
    muon_mask, decay_mask, lr_scale = ultralytics_musgd_masks(params)
    model = oracles.make_e2e_model("yolov8n.yaml", NC, EPOCHS)
    _, groups = oracles.musgd_steps(model, [], lr=0.01)
    ours = {}
    for (path, m), d, s in zip(jax.tree_util.tree_flatten_with_path(muon_mask)[0], jax.tree.leaves(decay_mask),
                               jax.tree.leaves(lr_scale)):
        keys = [str(getattr(k, "key", k)) for k in path]
        keys[-1] = {"kernel": "weight", "scale": "weight"}.get(keys[-1], keys[-1])
        ours[".".join(keys)] = (m, d, s)
    assert set(ours) == set(groups)
    for k, (use_muon, wd, lr) in groups.items():
        assert ours[k] == (use_muon, wd != 0, pytest.approx(lr / 0.01)), k
    assert sum(s == 3.0 for _, _, s in ours.values()) > 0


# --- NMS-free decode of the end-to-end architectures --------------------------------


@pytest.mark.parametrize("name,nc,max_det", [("yolo26n", 3, 50), ("yolov10n", 5, 40)])
def test_end2end_decode_matches_upstream_postprocess(oracles, rng, name, nc, max_det):
    """``end2end_topk(*model.decode(preds))`` against upstream's own end-to-end
    inference with the same random weights: ``Detect.forward`` in eval mode
    with ``end2end`` on (the one-to-one branch, ``Detect.postprocess``: top
    ``max_det`` anchors by best class, then the top ``max_det`` (anchor,
    class) scores, no NMS), ``(B, max_det, 6)``.

    The heads are fed random feature maps of a 64x96 input (126 anchors, so
    both top-k steps select): a random network with random BatchNorm
    statistics forgets its image (its logits vary only by position, from the
    zero padding, with exact ties between interior anchors), so whole-model
    inputs would be decided by tie order; the images-to-raw-outputs path is
    test_arch_parity's forward parity."""
    from _arch_cases import compiled, upstream_model

    from jaxyolo.evaluate import end2end_topk
    from jaxyolo.models import from_torch

    t = oracles.torch()
    up = upstream_model(name, nc)
    head = up.model[-1]
    feats = [rng.normal(0, 1, (2, seq[0].conv.in_channels, 64 // s, 96 // s)).astype(np.float32)
             for seq, s in zip(head.cv2, (8, 16, 32))]
    assert head.stride.tolist() == [8, 16, 32]
    up.eval()
    up.end2end = True  # DetectionModel's setter: the head's one-to-one inference
    head.max_det = max_det
    assert head.end2end and not head.agnostic_nms
    # the class logits of a random head sit near its bias (-5 to -9, where float32's ulp is ~5e-7) and vary by
    # a few hundredths: each level's last one-to-one class conv is rescaled to logits of std 1 about random
    # offsets near -2, so that the candidates are far apart compared with their rounding
    with t.no_grad():
        for k, seq in enumerate(head.one2one_cv3):
            conv, logits = seq[-1], seq(t.from_numpy(feats[k])).double()
            mean, std = logits.mean((0, 2, 3)), logits.std((0, 2, 3))
            conv.weight.div_(std.float()[:, None, None, None])
            conv.bias.copy_((conv.bias.double() - mean) / std + t.from_numpy(rng.normal(-2.0, 1.0, nc)))
        ref, raw = head([t.from_numpy(f) for f in feats])
    ref = ref.numpy()
    assert ref.shape == (2, max_det, 6) and "one2one" in raw

    model = from_torch(up.state_dict(), name=name)
    model.eval()
    nhwc = [jnp.asarray(f.transpose(0, 2, 3, 1)) for f in feats]
    boxes, scores = compiled(lambda f: model.decode(model.head(f)), nhwc)(nhwc)
    # no near-ties at either top-k boundary nor among the kept scores: every relative gap is >= 10x (as
    # _margins.SAFETY) the largest relative difference between the two frameworks of the scores that take
    # part (those >= half the smallest one compared), so the selection and its order do not depend on
    # float32 rounding
    s = np.asarray(scores, np.float64)
    theirs = t.sigmoid(raw["one2one"]["scores"].double()).numpy().transpose(0, 2, 1)
    for img, ref_img in zip(s, theirs):
        best = np.sort(img.max(-1))[::-1][: max_det + 1]
        cand = np.sort(img[np.argsort(-img.max(-1))[:max_det]].ravel())[::-1][: max_det + 1]
        near = ref_img >= 0.5 * min(best[-1], cand[-1])
        err = float(np.max(np.abs(img - ref_img)[near] / ref_img[near]))
        for v in (best, cand):
            assert np.min(-np.diff(v) / v[1:]) >= 10 * max(err, 1e-7), (np.min(-np.diff(v) / v[1:]), err)
        _record(f"{name} decode scores rel (deciding)", err)
    ob, os_, oc, ov = (np.asarray(v) for v in end2end_topk(boxes, scores, conf_thres=0.0, max_det=max_det))
    assert ov.all()
    np.testing.assert_array_equal(oc, ref[..., 5].astype(np.int32))
    np.testing.assert_allclose(os_, ref[..., 4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ob, ref[..., :4], rtol=1e-4, atol=1e-4)
    _record(f"{name} decode boxes abs (px)", float(np.max(np.abs(ob - ref[..., :4]))))
    _record(f"{name} decode scores rel", float(np.max(np.abs(os_ - ref[..., 4]) / ref[..., 4])))
