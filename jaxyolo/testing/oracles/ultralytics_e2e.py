"""ultralytics 8.4.190 ``E2ELoss`` / ``E2EDetectLoss`` and ``MuSGD`` as oracles.

The losses are constructed as upstream does, on a real randomly initialised
``DetectionModel`` built from a yaml shipped with ultralytics
(``yolo26n.yaml``: ``reg_max`` 1; ``yolov10n.yaml``: ``reg_max`` 16) with
``model.args = get_cfg()`` (the trainer's hyperparameters: gains 7.5 / 0.5 /
1.5, ``epochs``).  The model's weights are never run: the predictions are fed
as the training-mode head output ``{"one2many": {...}, "one2one": {...}}``,
each ``{"boxes": (B, 4*reg_max, A), "scores": (B, nc, A), "feats": [NCHW]}``
built from per-level NCHW leaves, so the gradients come back per level and
per branch.
"""

from __future__ import annotations

import contextlib
import functools
import types

import numpy as np

from jaxyolo.testing.oracles._torch import _import, grad_nhwc, nhwc_to_torch, numpy, tensor, torch

__all__ = ["e2e_detection_loss", "e2e_o2m_schedule", "float32_newton_schulz", "make_e2e_model", "musgd_steps"]


@functools.cache
def make_e2e_model(yaml: str = "yolo26n.yaml", nc: int = 3, epochs: int = 100):
    """A randomly initialised upstream ``DetectionModel`` with ``args`` set as the trainer sets them."""
    torch().manual_seed(0)
    tasks = _import("ultralytics.nn.tasks")
    cfg = _import("ultralytics.cfg")
    model = tasks.DetectionModel(yaml, nc=nc, verbose=False)
    model.args = cfg.get_cfg(overrides={"epochs": epochs})
    return model


def e2e_detection_loss(preds_o2m, preds_o2o, targets, *, variant="yolo26", yaml=None, nc=3, epochs=100, epoch=0,
                       capture_assign=True):
    """Run upstream ``E2ELoss`` (``variant="yolo26"``) or ``E2EDetectLoss``
    (``"yolov10"``) forward + backward.

    Args:
      preds_o2m, preds_o2o: per level ``(B, H, W, 4*reg_max + nc)`` arrays.
      targets: a :class:`jaxyolo.Targets` (fed through ``to_rows``).
      yaml: the model yaml (default ``yolo26n.yaml`` for "yolo26",
        ``yolov10n.yaml`` for "yolov10").
      epochs, epoch: ``E2ELoss``'s schedule: ``update()`` is called ``epoch``
        times, as the trainer does at the end of each epoch before ``epoch``.

    Returns:
      dict: ``total``, ``items`` (upstream's loss dict, names -> floats),
      ``o2m``/``o2o`` (E2ELoss's weights after the updates), ``grads_o2m``,
      ``grads_o2o`` per level NHWC, ``assign_o2m``/``assign_o2o``
      (``fg_mask``, ``target_gt_idx``, ``target_scores``, from each branch's assigner).
    """
    t = torch()
    loss_mod = _import("ultralytics.utils.loss")
    yaml = yaml or ("yolo26n.yaml" if variant == "yolo26" else "yolov10n.yaml")
    model = make_e2e_model(yaml, nc, epochs)
    crit = loss_mod.E2ELoss(model) if variant == "yolo26" else loss_mod.E2EDetectLoss(model)
    if variant == "yolo26":
        for _ in range(epoch):
            crit.update()
    reg_max = model.model[-1].reg_max
    rows = targets.to_rows() if hasattr(targets, "to_rows") else np.asarray(targets, np.float32).reshape(-1, 6)

    def branch(preds_nhwc):
        leaves = [nhwc_to_torch(p, grad=True) for p in preds_nhwc]
        b, no = leaves[0].shape[:2]
        cat = t.cat([x.view(b, no, -1) for x in leaves], 2)
        return leaves, {"boxes": cat[:, : 4 * reg_max], "scores": cat[:, 4 * reg_max :], "feats": leaves}

    leaves_o2m, p_o2m = branch(preds_o2m)
    leaves_o2o, p_o2o = branch(preds_o2o)
    batch = {"batch_idx": tensor(rows[:, 0]), "cls": tensor(rows[:, 1:2]), "bboxes": tensor(rows[:, 2:6])}
    captured = {}
    hooks = []
    if capture_assign:
        names = ("target_labels", "target_bboxes", "target_scores", "fg_mask", "target_gt_idx")
        for key, c in (("assign_o2m", crit.one2many), ("assign_o2o", crit.one2one)):
            hooks.append(c.assigner.register_forward_hook(
                lambda _m, _i, out, key=key: captured.update({key: {k: numpy(v.clone()) for k, v in zip(names, out)}})
            ))
    try:
        loss, items = crit({"one2many": p_o2m, "one2one": p_o2o}, batch)
    finally:
        for h in hooks:
            h.remove()
    total = loss.sum()
    total.backward()
    out = {
        "total": float(total.detach()),
        "items": {k: float(v) for k, v in items.items()},
        "grads_o2m": [grad_nhwc(x) for x in leaves_o2m],
        "grads_o2o": [grad_nhwc(x) for x in leaves_o2o],
        **captured,
    }
    if variant == "yolo26":
        out["o2m"], out["o2o"] = crit.o2m, crit.o2o
    return out


def e2e_o2m_schedule(epochs: int, n: int):
    """``E2ELoss.o2m`` during epochs ``0..n-1`` (``update()`` after each), on a yolo26n model."""
    loss_mod = _import("ultralytics.utils.loss")
    crit = loss_mod.E2ELoss(make_e2e_model("yolo26n.yaml", 3, epochs))
    out = []
    for _ in range(n):
        out.append((crit.o2m, crit.o2o))
        crit.update()
    return out


@contextlib.contextmanager
def float32_newton_schulz():
    """Within: upstream's MuSGD iterates Newton-Schulz in float32, not
    bfloat16 (``Tensor.bfloat16`` returns ``.float()``; nothing else
    changes), to compare everything but bfloat16's rounding."""
    t = torch()
    orig = t.Tensor.bfloat16
    t.Tensor.bfloat16 = lambda self, *a, **k: self.float()
    try:
        yield
    finally:
        t.Tensor.bfloat16 = orig


def musgd_steps(model, grads_seq, *, lr=0.01, momentum=0.9, decay=5e-4, ns_float32=False):
    """Upstream ``MuSGD.step`` on ``model`` (a torch module), with the optimizer
    built by ``BaseTrainer.build_optimizer(model, name="MuSGD", ...)``: its
    parameter groups (``muon`` for 2-D/4-D parameters, ``weight``, ``bn``,
    ``bias``, each split for ``model.model[-1]``'s ``cv3``/``one2one_cv3`` at
    ``lr * 3``) and ``muon=0.2, sgd=1.0``.

    Args:
      model: torch module with ``.model`` (a sequence whose last entry is the head).
      grads_seq: list (one per step) of dicts ``state_dict`` name -> numpy gradient.
      ns_float32: run upstream's Newton-Schulz in float32 instead of bfloat16
        (:func:`float32_newton_schulz` around the step).

    Returns:
      ``(steps, groups)``: per step a dict name -> numpy parameter after it;
      ``groups`` name -> ``(use_muon, weight_decay, lr)`` of its param group
      (parameters that require a gradient; upstream's frozen DFL conv sits in
      the muon group but never gets a gradient, so MuSGD skips it).
    """
    trainer = _import("ultralytics.engine.trainer")
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}  # not Detect's fixed DFL conv
    opt = trainer.BaseTrainer.build_optimizer(types.SimpleNamespace(), model, name="MuSGD", lr=lr, momentum=momentum,
                                              decay=decay)
    by_id = {id(p): k for k, p in named.items()}
    groups = {by_id[id(p)]: (bool(g["use_muon"]), g["weight_decay"], g["lr"])
              for g in opt.param_groups for p in g["params"] if id(p) in by_id}
    out = []
    for grads in grads_seq:
        for k, p in named.items():
            p.grad = tensor(grads[k])
        with float32_newton_schulz() if ns_float32 else contextlib.nullcontext():
            opt.step()
        out.append({k: numpy(p).copy() for k, p in named.items()})
    return out, groups
