"""How far a model-level test case is from a discrete near-tie (issue 25).

A train step of a whole network makes discrete choices on float32 values: the
max-pools of SPP/SPPF route each window's gradient to its largest cell, and
the assigners pick anchors (TAL: each GT's top-k align metrics, then the GT of
highest overlap for an anchor claimed twice, and with ``topk2`` (``E2ELoss``'s
one-to-one branch) each GT's best ``topk2`` of the anchors it keeps; SimOTA: ``dynamic_k = int(sum of
the top-10 IoUs)``, the ``dynamic_k`` cheapest anchors, the cheapest GT for
an anchor matched twice).  jaxyolo and PyTorch compute the network in float32
with different rounding, and XLA's CPU code differs with the processor's
instruction set, so a choice whose deciding gap is smaller than that rounding
may go either way on some machine (it did: the YOLOv8n step at 448x512 flipped
one of a GT's top-10 anchors, gap 1.9e-6 of the GT's largest metric, on an
AVX2-only CPU and not on an AVX-512 one).

:func:`replay` runs an upstream computation (its own forward and loss, e.g.
:func:`train_step`) twice, in float32 and in float64, records the inputs of
every max-pool and of the assigner, and returns for each kind of choice

* ``gap``: the smallest deciding gap, from the float64 run;
* ``err``: the largest float32 rounding error of the deciding values (float32
  run against float64), i.e. what one framework's rounding moves them (for
  the max-pools: at the window with the least room, gap / error);

both in the units named below, and whether the float32 and float64
assignments are the same.  A case is machine-independent when every ``gap``
is far above ``err``: :meth:`Replay.check` asserts ``gap >= SAFETY * err``
(the TAL test also measures jaxyolo's own align metrics against upstream's).

Units: max-pool gaps are absolute (activation units: the top value of a window
minus the runner-up at another cell); TAL gaps are divided by the GT's largest
align metric (a flipped pick changes that GT's target scores by about that
much; picks far below the GT's largest metric barely move the loss) or by the
anchor's largest overlap (kinds ``tal_*`` for a loss's first assigner call,
``tal2_*`` for its second: ``E2ELoss`` assigns the one-to-many branch with
top-10, then the one-to-one branch with top-7 and ``topk2`` 1); SimOTA cost gaps are relative to the cost, the dynamic-k gap
is the distance of the top-10 IoU sum to the nearest integer.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field


# How many times the float32 rounding of one framework (float32 against
# float64) a deciding gap must be: two frameworks' roundings can add up (x2),
# each deciding value carries the error of two candidates (x2), and another
# CPU or framework may round a few times worse than the one measured.
SAFETY = 10.0


@dataclass
class Replay:
    gap: dict = field(default_factory=dict)  # kind -> smallest deciding gap (float64 run)
    err: dict = field(default_factory=dict)  # kind -> largest float32 - float64 error of the deciding values
    same_assignment: bool = True  # float32 and float64 assignments identical
    upstream32: dict = field(default_factory=dict)  # the float32 run's assigner record (TAL: "tal", one dict per call)

    def check(self, safety=SAFETY):
        """Assert the case has room on every choice; the message says which does not."""
        assert self.same_assignment, "float32 and float64 assign differently: pick another case"
        bad = [f"{k}: gap {g:.3g} < {safety:g} x float32 error {self.err[k]:.3g}" for k, g in self.gap.items() if g < safety * self.err[k]]
        assert not bad, "near-tie in this case (pick another one): " + "; ".join(bad)

    def __str__(self):
        return ", ".join(f"{k} gap {g:.3g} err {self.err[k]:.3g}" for k, g in self.gap.items())


def _pool_room(t, x32, x64, k):
    """``(gap, err, ratio)`` of the stride-1 ``k x k`` max-pool windows of ``x64``
    at the window of least room: ``gap`` = top value minus the runner-up at
    another cell, ``err`` = the window's largest float32 error (``|x32 - x64|``
    over its cells, plus one float32 ulp of the top value), ``ratio = gap / err``.
    The error is taken per window because it is not uniform: SiLU's flat
    minimum (-0.2785), where many cells sit, leaves nearly none of the
    rounding of its input."""
    p = k // 2

    def windows(v):
        v = t.nn.functional.pad(v.double(), (p, p, p, p), value=-float("inf"))
        return t.nn.functional.unfold(v.flatten(0, 1)[:, None], k)  # (N*C, k*k, H*W)

    w64 = windows(x64)
    e = windows((x32.double() - x64.double()).abs())
    e = t.nan_to_num(e, nan=0.0, neginf=0.0).amax(1)  # padding cells hold -inf
    top2 = w64.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    err = e + top2[:, 0].abs() * 2.0**-23
    ratio = gap / err
    i = int(ratio.argmin())
    return float(gap.flatten()[i]), float(err.flatten()[i]), float(ratio.flatten()[i])


def _pool_windows(pools):
    """``(x, k)`` per max-pool call, on the input of the module's first call:
    SPPF applies one stride-1 pool of kernel ``k`` i times in a row, which is
    one pool of kernel ``i (k - 1) + 1`` on the first input (the copies a pool
    makes of a window's maximum are exact ties between cells that hold the
    same value, and routing among them ends at the same input cell)."""
    first, calls = {}, {}
    out = []
    for mod, x in pools:
        assert mod.stride in (1, (1, 1)) and not mod.ceil_mode and mod.padding == mod.kernel_size // 2, mod
        first.setdefault(id(mod), x)
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        out.append((first[id(mod)], calls[id(mod)] * (mod.kernel_size - 1) + 1))
    return out


@contextlib.contextmanager
def _recording_assigners(rec):
    """Patch upstream's TAL assigner and SimOTA matching (at class level, so an
    assigner built inside ``run`` is caught) to record their deciding values."""
    from ultralytics.utils.tal import TaskAlignedAssigner
    from yolox.models.yolo_head import YOLOXHead

    tal, simota = TaskAlignedAssigner.forward, YOLOXHead.dynamic_k_matching

    def tal_recording(self, *args, **kw):
        out = tal(self, *args, **kw)
        pd_scores, pd_bboxes, anc, labels, gt, mask_gt = args
        mask_pos, metric, overlaps = self.get_pos_mask(pd_scores, pd_bboxes, labels, gt, anc, mask_gt)
        topk2, self.topk2 = self.topk2, self.topk  # the multi-GT resolution alone: the positives topk2 picks from
        try:
            _, _, kept = self.select_highest_overlaps(mask_pos.clone(), overlaps, self.n_max_boxes, metric)
        finally:
            self.topk2 = topk2
        rec.setdefault("tal", []).append(dict(
            metric=metric.double(), overlaps=overlaps.double(), mask_pos=mask_pos.bool(), mask_gt=mask_gt[..., 0].bool(),
            topk=self.topk, topk2=self.topk2, fg=out[3], gt_idx=out[4],
            # topk2 < topk (E2ELoss's one-to-one branch): each GT's topk2 best metrics among its anchors left after
            # the multi-GT resolution decide; the positive mask before that pick
            multi_resolved=kept.bool() if self.topk2 != self.topk else None))
        return out

    def simota_recording(self, cost, ious, gt_classes, num_gt, fg_mask):
        before = fg_mask.clone()
        out = simota(self, cost, ious, gt_classes, num_gt, fg_mask)  # writes fg_mask in place
        rec.setdefault("images", []).append((cost.detach().double(), ious.detach().double(), before, fg_mask.clone(), out[3].clone()))
        return out

    TaskAlignedAssigner.forward, YOLOXHead.dynamic_k_matching = tal_recording, simota_recording
    try:
        yield
    finally:
        TaskAlignedAssigner.forward, YOLOXHead.dynamic_k_matching = tal, simota


def _record(up, run, dtype):
    """``run(module, dtype)`` on a copy of ``up`` in ``dtype``: the inputs of
    its max-pools and the assigner's deciding values."""
    from jaxyolo.models import upstream

    t = upstream.torch()
    m = copy.deepcopy(up).to(dtype)
    pools, rec = [], {}
    hooks = [
        mod.register_forward_hook(lambda mod, inp, out: pools.append((mod, inp[0].detach())))
        for mod in m.modules()
        if isinstance(mod, t.nn.MaxPool2d)
    ]
    try:
        with _recording_assigners(rec), t.no_grad():  # values only: no autograd graph (memory)
            run(m, dtype)
    finally:
        for h in hooks:
            h.remove()
    return pools, rec


def train_step(family, x, rows, targets):
    """The ``run`` of upstream's train-mode forward and its own loss (as the
    step-parity test runs it) on ``x`` ``(B, H, W, 3)`` and ``rows``."""
    from jaxyolo.models import upstream

    t = upstream.torch()

    def run(m, dtype):
        m.train()
        xt = upstream.torch_images(x, family).to(dtype)
        if family == "ultralytics":
            from ultralytics.cfg import get_cfg

            m.args, m.criterion = get_cfg(), None  # a criterion of this module's dtype
            batch = {"batch_idx": t.from_numpy(rows[:, 0]), "cls": t.from_numpy(rows[:, 1:2]), "bboxes": t.from_numpy(rows[:, 2:])}
            m.loss(batch, m(xt))
        elif family == "yolox":
            from jaxyolo.testing.oracles.yolox import yolox_labels

            labels, _ = yolox_labels(targets, x.shape[1:3])
            m(xt, t.from_numpy(labels).to(dtype))
        else:  # yolov5: build_targets reads the targets and anchors only; no assignment on predictions
            m(xt)

    return run


def replay(up, run, *, pools: bool = True) -> Replay:
    """Deciding gaps and float32 rounding errors of ``run(module, dtype)`` (e.g.
    :func:`train_step`) on copies of the upstream module ``up`` in float32 and
    float64 (see the module docstring).  ``pools=False`` leaves the max-pools
    out (a forward alone: the routing of their gradient does not matter)."""
    from jaxyolo.models import upstream

    t = upstream.torch()
    p32, r32 = _record(up, run, t.float32)
    p64, r64 = _record(up, run, t.float64)
    out = Replay(upstream32=r32)
    if pools and p64:
        rooms = [_pool_room(t, x32, x64, k) for (x32, _), (x64, k) in zip(_pool_windows(p32), _pool_windows(p64))]
        out.gap["maxpool"], out.err["maxpool"], _ = min(rooms, key=lambda r: r[2])
    calls = list(zip(r32.get("tal", []), r64.get("tal", [])))
    for i, (c32, c64) in enumerate(calls):  # E2ELoss: the one-to-many (topk 10), then the one-to-one (topk 7, topk2 1)
        _tal_room(c32, c64, out, "tal" if i == 0 else f"tal{i + 1}")
    if "images" in r64:
        _simota_room(t, r32["images"], r64["images"], out)
    return out


def _boundary(metric, k, mask_gt, scale):
    """Smallest gap between each GT's ``k``-th and ``k+1``-th metric, in units
    of ``scale``, where both are positive (1.0 if no boundary decides)."""
    top = metric.sort(-1, descending=True).values
    live = mask_gt & (top[..., k] > 0)  # a boundary between positive metrics decides
    return float(((top[..., k - 1] - top[..., k]) / scale[..., 0])[live].min()) if live.any() else 1.0


def _tal_room(r32, r64, out, name="tal"):
    """TAL, one assigner call, kinds ``{name}_topk``/``_multi`` (and ``_topk2``):
    each GT's top-k boundary, each anchor claimed by several GTs, and with a
    ``topk2 < topk`` (E2ELoss's one-to-one branch) each GT's top-``topk2``
    boundary among the anchors it keeps after the multi-GT resolution."""
    metric, overlaps, k = r64["metric"], r64["overlaps"], r64["topk"]
    scale = metric.amax(-1, keepdim=True).clamp(min=1e-300)  # each GT's largest align metric
    err = float(((r32["metric"].double() - metric).abs() / scale).max())
    out.gap[f"{name}_topk"], out.err[f"{name}_topk"] = _boundary(metric, k, r64["mask_gt"], scale), err
    multi = r64["mask_pos"].sum(1) > 1  # (B, A) anchors claimed by several GTs
    ov = overlaps.sort(1, descending=True).values
    best = ov[:, :1].clamp(min=1e-300)  # (B, 1, A) each anchor's largest overlap
    out.gap[f"{name}_multi"] = float(((ov[:, 0] - ov[:, 1]) / best[:, 0])[multi].min()) if multi.any() else 1.0
    out.err[f"{name}_multi"] = float(((r32["overlaps"].double() - overlaps).abs() / best).max())
    if r64["multi_resolved"] is not None:
        kept = metric * r64["multi_resolved"]
        out.gap[f"{name}_topk2"], out.err[f"{name}_topk2"] = _boundary(kept, r64["topk2"], r64["mask_gt"], scale), err
        out.same_assignment &= bool((r32["multi_resolved"] == r64["multi_resolved"]).all())
    fg = r64["fg"]
    out.same_assignment &= bool((r32["fg"] == fg).all() and (r32["gt_idx"][fg] == r64["gt_idx"][fg]).all())


def _simota_room(t, images32, images64, out):
    """SimOTA, per image: the dynamic-k sums, each GT's cost boundary, and the
    cost conflicts of anchors matched to several GTs."""
    gk, gc, gm, ek, ec = [], [], [], [], []
    for (c32, i32, in32, fg32, g32), (c64, i64, in64, fg64, g64) in zip(images32, images64):
        n = min(10, i64.shape[1])
        s = i64.topk(n, dim=1).values.sum(1)
        ek.append(float((i32.topk(n, dim=1).values.sum(1) - s).abs().max()))
        frac = s - s.floor()
        gk.append(float(t.minimum(frac, 1 - frac)[s >= 1].min()) if (s >= 1).any() else 1.0)  # int() and clamp(min=1)
        ec.append(float(((c32 - c64).abs() / c64.abs().clamp(min=1e-12)).max()))
        cost = c64.sort(1).values
        matched = t.zeros_like(c64, dtype=t.bool)
        for g, kk in enumerate(s.int().clamp(min=1).tolist()):
            if kk < cost.shape[1]:
                gc.append(float((cost[g, kk] - cost[g, kk - 1]) / cost[g, kk].abs()))
            matched[g, c64[g].topk(kk, largest=False).indices] = True
        multi = matched.sum(0) > 1
        if multi.any():
            two = c64[:, multi].sort(0).values[:2]
            gm.append(float(((two[1] - two[0]) / two[1].abs()).min()))
        out.same_assignment &= bool((in32 == in64).all() and (fg32 == fg64).all() and (g32 == g64).all())
    out.gap.update(simota_k=min(gk), simota_cost=min(gc) if gc else 1.0, simota_multi=min(gm) if gm else 1.0)
    out.err.update(simota_k=max(ek), simota_cost=max(ec), simota_multi=max(ec))
