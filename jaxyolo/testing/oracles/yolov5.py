"""yolov5==7.0.14 ``ComputeLoss`` as an oracle, driven with channels-last inputs.

``ComputeLoss`` wants a model; :func:`fake_yolov5_model` builds the smallest
one it accepts: a module with one parameter (for the device), ``hyp``, and a
``model[-1]`` Detect stand-in holding ``nc``, ``nl``, ``na``, ``stride`` and
``anchors`` in **grid units** (``pixels / stride``, as ``Detect`` stores them).
"""

from __future__ import annotations

import numpy as np

from jaxyolo.testing.oracles._torch import numpy, tensor, torch, yolov5_modules

__all__ = ["fake_yolov5_model", "Yolov5Oracle", "yolov5_compute_loss"]


def fake_yolov5_model(*, anchors, strides, nc: int, hyp: dict):
    """A torch module that ``yolov5.utils.loss.ComputeLoss`` accepts.

    Args:
      anchors: ``(L, na, 2)`` pixels.
      strides: ``L`` strides.
      nc: number of classes.
      hyp: upstream hyperparameter dict (``box, obj, cls, cls_pw, obj_pw,
        anchor_t, fl_gamma, label_smoothing``).
    """
    t = torch()
    nn = t.nn
    anchors = np.asarray(anchors, np.float32)

    class Detect(nn.Module):
        def __init__(self):
            super().__init__()
            self.nc, self.nl, self.na = nc, anchors.shape[0], anchors.shape[1]
            self.register_buffer("stride", t.tensor([float(s) for s in strides], dtype=t.float32))
            # Detect: m.anchors /= m.stride.view(-1, 1, 1) (float32)
            self.register_buffer("anchors", t.from_numpy(anchors.copy()) / self.stride.view(-1, 1, 1))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(t.zeros(1))
            self.model = nn.ModuleList([Detect()])
            self.hyp = dict(hyp)
            self.nc = nc
            self.gr = 1.0  # Model.gr; ComputeLoss 7.0 ignores it and hard-codes self.gr = 1.0

    return Model()


class Yolov5Oracle:
    """A stateful upstream ``ComputeLoss`` (its ``balance`` persists across calls).

    Args:
      anchors: ``(L, na, 2)`` pixels; strides: ``L`` strides; nc: classes.
      hyp: upstream hyp dict (e.g. ``Yolov5LossConfig().hyp()``).
      autobalance, sort_obj_iou: upstream's flags.
      gr: overrides ``ComputeLoss.gr`` (hard-coded 1.0 in ``ComputeLoss.__init__``,
        whatever ``model.gr`` says).
      balance: overrides the initial ``ComputeLoss.balance`` list.
    """

    def __init__(self, *, anchors, strides, nc, hyp, autobalance=False, sort_obj_iou=False, gr=None, balance=None):
        loss_mod, _ = yolov5_modules()
        self.model = fake_yolov5_model(anchors=anchors, strides=strides, nc=nc, hyp=hyp)
        self.loss = loss_mod.ComputeLoss(self.model, autobalance=autobalance)
        self.loss.sort_obj_iou = bool(sort_obj_iou)
        if gr is not None:
            self.loss.gr = float(gr)
        if balance is not None:
            self.loss.balance = [float(b) for b in balance]

    @property
    def balance(self) -> np.ndarray:
        return np.asarray(self.loss.balance, np.float64)

    @staticmethod
    def _inputs(preds_nhwc, targets):
        if hasattr(targets, "to_rows"):
            targets = targets.to_rows()
        rows = tensor(np.asarray(targets, np.float32).reshape(-1, 6))
        leaves = [
            tensor(np.ascontiguousarray(np.transpose(np.asarray(p, np.float32), (0, 3, 1, 2, 4))), grad=True)
            for p in preds_nhwc
        ]
        return leaves, rows

    def _rows(self, leaves, rows):
        with torch().no_grad():
            tcls, tbox, indices, anch = self.loss.build_targets(leaves, rows)
        level_rows = []
        for c, tb, (b, a, gj, gi), an in zip(tcls, tbox, indices, anch):
            cols = [b[:, None], a[:, None], gj[:, None], gi[:, None], tb, an, c[:, None]]
            widths = (1, 1, 1, 1, 4, 2, 1)
            level_rows.append(
                np.concatenate(
                    [numpy(x).astype(np.float32).reshape(len(b), k) for x, k in zip(cols, widths)], axis=1
                )
            )
        return level_rows

    def build_targets(self, preds_nhwc, targets) -> list[np.ndarray]:
        """Upstream ``build_targets`` alone: per level ``(n, 11)`` rows
        ``[b, a, gj, gi, tx, ty, tw, th, anchor_w, anchor_h, cls]`` in its order
        (only the shapes of ``preds_nhwc`` matter)."""
        return self._rows(*self._inputs(preds_nhwc, targets))

    def __call__(self, preds_nhwc, targets) -> dict:
        """One forward + backward.

        Args:
          preds_nhwc: list of ``(B, H, W, na, 5 + nc)`` arrays.
          targets: ``(N, 6)`` rows ``[img, cls, cx, cy, w, h]`` (normalised), e.g.
            ``Targets.to_rows()``, or a :class:`~jaxyolo.Targets`.

        Returns:
          dict with ``total`` (float), ``components`` ``(3,)`` [box, obj, cls],
          ``grads`` list of NHWC ``(B, H, W, na, 5 + nc)`` numpy gradients of
          ``total``, ``rows`` list per level of ``(n, 11)`` build_targets rows
          ``[b, a, gj, gi, tx, ty, tw, th, anchor_w, anchor_h, cls]`` in upstream
          order, and ``balance`` (after the call).
        """
        leaves, rows = self._inputs(preds_nhwc, targets)
        level_rows = self._rows(leaves, rows)
        total, comps = self.loss(leaves, rows)
        total.sum().backward()
        grads = [np.transpose(numpy(leaf.grad), (0, 2, 3, 1, 4)) for leaf in leaves]
        return {
            "total": float(total.item()),
            "total_shape": tuple(total.shape),
            "components": numpy(comps),
            "grads": grads,
            "rows": level_rows,
            "balance": self.balance,
        }


def yolov5_compute_loss(
    preds_nhwc,
    targets,
    *,
    anchors,
    strides,
    hyp,
    nc=None,
    autobalance=False,
    sort_obj_iou=False,
    gr=None,
    balance=None,
) -> dict:
    """One call of upstream ``ComputeLoss`` (see :class:`Yolov5Oracle`); ``nc``
    defaults to the channel count of ``preds_nhwc[0]`` minus 5."""
    if nc is None:
        nc = np.shape(preds_nhwc[0])[-1] - 5
    oracle = Yolov5Oracle(
        anchors=anchors,
        strides=strides,
        nc=nc,
        hyp=hyp,
        autobalance=autobalance,
        sort_obj_iou=sort_obj_iou,
        gr=gr,
        balance=balance,
    )
    return oracle(preds_nhwc, targets)
