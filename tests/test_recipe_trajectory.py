"""``recipe="ultralytics"`` against ultralytics' own training code (issue 23).

The same initial weights (upstream's randomly initialised yolov8n, converted
with ``from_torch``), the same fixed batches (every augmentation off), and on
the upstream side ultralytics' own objects, called: ``BaseTrainer``'s
``_build_train_pipeline`` (accumulate, the scaled weight decay,
``build_optimizer`` with ``optimizer=auto``, ``_setup_scheduler``),
``_get_warmup_iterations``, ``optimizer_step`` (``clip_grad_norm_`` 10, the
optimizer, ``ModelEMA.update``) and the loss (``DetectionModel.loss`` =
``v8DetectionLoss``).  ``_do_train``'s loop body cannot be called alone: its
control flow (scheduler step per epoch, the warmup block, backward, the
accumulate test) is reproduced below, marked where it is copied.

Tolerances: the first iteration's loss to 1e-5 (same weights, same batch).
Later iterations are bounded by the yardstick of the data-parallel test:
how far upstream drifts from itself when half its initial parameters move by
one ulp (the discrete TAL assignment turns rounding into jumps); jaxyolo
must stay within ``DRIFT_FACTOR`` times that drift (and a floor of the
first step's tolerance).  Measured on a 2-core Xeon (jaxyolo vs upstream |
upstream vs its 1-ulp twin, running max): loss at iteration 1 3.4e-6 | 4.1e-6,
at 14 3.4e-4 | 7.5e-4 (largest ratio 2.7, iteration 2); batch gradient norm
1.1e-5 .. 2.5e-4 | up to 3.3e-4; parameters after the 5 optimizer steps (per
tensor, in units of its largest value) 0, 3.4e-4 .. 6.7e-4 | 6.9e-4 (AdamW's
first moves are ~lr x sign(g): rounding in tiny gradients flips them);
BatchNorm statistics 2.1e-7 .. 3.0e-5 | 4.4e-5; EMA as the parameters.
A wrong LR, momentum or accumulation count is caught exactly (they are
compared to 1e-6 / equal), a wrong loss scale by the gradient norm (x4 here).
"""

import contextlib
import copy
import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _arch_cases import upstream_model
from flax import nnx

from jaxyolo.data import TrainBatches, load_embedded
from jaxyolo.data.augment import augment
from jaxyolo.models import from_torch
from jaxyolo.models.convert import torch_key
from jaxyolo.targets import Targets
from jaxyolo.train import Session, TrainConfig
from jaxyolo.train.optim import GROUP_NAMES, UltralyticsOptimizer, UltralyticsPlan, ultralytics_param_groups

NB, EPOCHS, B, NBS, NC = 7, 2, 2, 8, 6  # 14 iterations; accumulate 4; nw = round(min(1, EPOCHS - 1) * NB) = 7
NO_AUG = dict(mosaic=0.0, translate=0.0, scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0)
CFG = TrainConfig.from_recipe(
    "ultralytics", model="yolov8n", img_size=64, batch=B, nbs=NBS, epochs=EPOCHS, warmup_epochs=1.0, max_boxes=8,
    train_size=NB * B, val_size=2, **NO_AUG,
)
DRIFT_FACTOR = 10.0


class _Loader:
    """What ``_build_train_pipeline`` reads of a DataLoader."""

    def __init__(self, n: int, batch: int):
        self.dataset = self.sampler = range(n)
        self.batch_size, self.drop_last = batch, False
        self._len = math.ceil(n / batch)

    def __len__(self):
        return self._len


def upstream_args(config: TrainConfig, **extra):
    """ultralytics' ``args`` for ``config``'s recipe fields."""
    from ultralytics.cfg import get_cfg

    names = {"auto": "auto", "sgd": "SGD", "adamw": "AdamW", "musgd": "MuSGD"}
    return get_cfg(overrides=dict(
        imgsz=config.img_size, batch=config.batch, epochs=config.epochs, nbs=config.nbs, optimizer=names[config.optimizer],
        lr0=config.lr0, lrf=config.lrf, momentum=config.momentum, weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs,
        warmup_momentum=config.warmup_momentum, warmup_bias_lr=config.warmup_bias_lr, cos_lr=config.schedule == "cosine",
        close_mosaic=config.close_mosaic, **extra,
    ))


def upstream_trainer(model, config: TrainConfig, *, nc: int, n_images: int):
    """A ``BaseTrainer`` without its ``__init__`` (no run folder, no
    dataset check) holding what its own ``_build_train_pipeline`` and
    ``optimizer_step`` use; both are then called as upstream calls them
    (``DetectionTrainer`` overrides neither's optimiser part: its
    ``_build_train_pipeline`` adds the validator's ``max_det`` only)."""
    import torch
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.utils.torch_utils import ModelEMA

    tr = BaseTrainer.__new__(BaseTrainer)
    tr.args = upstream_args(config)
    tr.batch_size, tr.epochs, tr.world_size, tr.stride = config.batch, config.epochs, 1, 32
    tr.model, tr.optimizer, tr.device = model, None, torch.device("cpu")
    tr.data = {"nc": nc, "train": "", "val": ""}
    tr.get_dataloader = lambda *a, **k: _Loader(n_images, config.batch)
    tr._build_train_pipeline()
    tr.scaler = torch.amp.GradScaler("cuda", enabled=False)  # as on a CPU: unscale_/step/update pass through
    tr.ema = ModelEMA(model)
    model.args = tr.args  # set_model_attributes: the loss gains box 7.5, cls 0.5, dfl 1.5
    return tr


def _hp(tr):
    groups = {g["param_group"]: g for g in tr.optimizer.param_groups}
    return {
        "lr": [groups[n]["lr"] for n in GROUP_NAMES],
        "momentum": [groups[n].get("momentum", groups[n].get("betas", (None,))[0]) for n in GROUP_NAMES],
        "accumulate": tr.accumulate,
    }


def _floats(sd):
    return {k: v.detach().numpy().copy() for k, v in sd.items() if v.dtype.is_floating_point}


def upstream_run(model, config, batches, *, nc: int):
    """Upstream's training of ``model`` on ``batches[ni]``: per iteration the
    hyperparameters in force, the per-image loss and whether the optimizer
    stepped; the parameters and EMA after each optimizer step."""
    tr = upstream_trainer(model, config, nc=nc, n_images=NB * config.batch)
    nb, epochs = NB, config.epochs
    nw = tr._get_warmup_iterations(nb)
    last_opt_step, acc0 = -1, tr.accumulate
    tr.scheduler.last_epoch = -1  # _setup_train: start_epoch - 1
    tr.optimizer.zero_grad()
    iters, snaps = [], []
    for epoch in range(epochs):
        tr.epoch = epoch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'lr_scheduler.step() before optimizer.step()', as upstream
            tr.scheduler.step()
        model.train()
        for i in range(nb):
            ni = i + nb * epoch
            # ---- copied from BaseTrainer._do_train (ultralytics 8.4.x): its warmup block is inline there
            if nw and ni <= nw:
                xi = [0, nw]
                tr.accumulate = max(1, int(np.interp(ni, xi, [1, acc0]).round()))
                for x in tr.optimizer.param_groups:
                    x["lr"] = float(np.interp(ni, xi, [tr.args.warmup_bias_lr if x.get("param_group") == "bias" else 0.0, x["initial_lr"] * tr.lf(epoch)]))
                    if "momentum" in x:
                        x["momentum"] = float(np.interp(ni, xi, [tr.args.warmup_momentum, tr.args.momentum]))
            hp = _hp(tr)
            loss, _ = model(batches[ni])  # DetectionModel.forward(dict) -> self.loss (v8DetectionLoss)
            loss = loss.sum()
            loss.backward()
            # the batch's own gradient norm where the sum was empty before it (the first batch after a step)
            fresh = ni == 0 or iters[-1]["stepped"]
            gnorm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)) if fresh else None
            stepped = ni - last_opt_step >= tr.accumulate
            if stepped:
                tr.optimizer_step()
                last_opt_step = ni
            # ---- end of the copied control flow
            iters.append({**hp, "loss": float(loss.detach()) / config.batch, "stepped": stepped, "grad_norm": gnorm})
            if stepped:
                snaps.append({"params": _floats(dict(model.named_parameters())), "ema": _floats(tr.ema.ema.state_dict()), "stats": _floats(model.state_dict())})
    return tr, iters, snaps


def _torch_names(tree) -> dict:
    """A pure params/stats tree as ``{state_dict key: torch-layout array}``."""
    out = {}
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        a = np.asarray(v, np.float32)
        out[torch_key(keys)] = np.ascontiguousarray(a.transpose(3, 2, 0, 1)) if keys[-1] == "kernel" and a.ndim == 4 else a
    return out


def _rel(ours: dict, ref: dict, keys) -> float:
    """Largest difference over ``keys``, each tensor's in units of its largest magnitude."""
    return max(float(np.max(np.abs(ours[k] - ref[k])) / max(np.max(np.abs(ref[k])), 1e-12)) for k in keys)


@pytest.fixture(scope="module")
def batches():
    """The jaxyolo pipeline's batches of the two epochs, and upstream's dicts
    of the same images and boxes (the targets as jaxyolo's augment, all
    off, passes them to the loss)."""
    import torch

    data = load_embedded("train", img_size=CFG.img_size, size=NB * B)
    bt = TrainBatches(data, batch_size=B, max_boxes=CFG.max_boxes, seed=CFG.seed)
    ours, theirs = [], []
    for ni in range(NB * EPOCHS):
        b = bt.batch(ni // NB, ni % NB)
        imgs, tg, _ = augment(jax.random.key(0), b["image"], b["rects"], Targets(b["boxes"], b["classes"], b["mask"]),
                              config=CFG.augment_config(mosaic=False), max_boxes=CFG.max_boxes)
        raw = b["image"][:, 0]
        np.testing.assert_array_equal(np.asarray(imgs), raw)  # all augmentations off: the frames as they are
        mask = np.asarray(tg.mask)
        bi, mi = np.nonzero(mask)
        rows = np.concatenate([bi[:, None], np.asarray(tg.classes)[bi, mi][:, None], np.asarray(tg.boxes)[bi, mi]], 1).astype(np.float32)
        ours.append(jax.tree.map(jnp.asarray, b))
        theirs.append({
            "img": torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255)),
            "batch_idx": torch.from_numpy(rows[:, 0]), "cls": torch.from_numpy(rows[:, 1:2]), "bboxes": torch.from_numpy(rows[:, 2:]),
        })
    return ours, theirs


def test_trajectory_matches_ultralytics_trainer(oracles, batches):
    """14 iterations (2 epochs of 7 batches, B 2, nbs 8: accumulate 4) over
    warmup (nw 7, ending in epoch 2), accumulation boundaries and the epoch
    boundary, ``optimizer=auto`` (AdamW, lr 0.001 for nc 6, bias warmup from 0)."""
    torch = oracles.torch()
    ours_b, theirs_b = batches
    up0 = upstream_model("yolov8n", NC)
    sd0 = {k: v.clone() for k, v in up0.state_dict().items()}

    # upstream, and upstream from initial parameters moved by one ulp (half of them)
    t0 = time.perf_counter()
    ref_tr, ref, ref_snaps = upstream_run(copy.deepcopy(up0), CFG, theirs_b, nc=NC)
    moved = copy.deepcopy(up0)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for p in moved.parameters():
            x = p.numpy()
            p.copy_(torch.from_numpy(np.where(rng.random(x.shape) < 0.5, np.nextafter(x, np.float32(np.inf)), x)))
    _, pert, pert_snaps = upstream_run(moved, CFG, theirs_b, nc=NC)
    print(f"upstream: 2 runs in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()

    # jaxyolo: the trainer's own Session and jitted step, from the converted weights
    session = Session(CFG, nc=NC, steps_per_epoch=NB, train_images=NB * B)
    plan = session.plan
    assert (plan.optimizer, plan.lr0, plan.momentum, plan.warmup_bias_lr) == ("adamw", ref_tr.args.lr0, 0.9, ref_tr.args.warmup_bias_lr) == ("adamw", 0.001, 0.9, 0.0)
    assert plan.accumulate == 4 and plan.nw == ref_tr._get_warmup_iterations(NB) == 7
    assert plan.weight_decay == ref_tr.optimizer.param_groups[0]["weight_decay"]  # 5e-4 * 2 * 4 / 8
    model = from_torch(sd0, name="yolov8n")
    model.train()
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.pure(params), nnx.pure(stats)

    # build_optimizer's groups, by name: jaxyolo's rule gives every tensor upstream's group
    names = {id(p): n for n, p in up0.named_parameters()}
    up_groups = {}
    fresh = upstream_trainer(up0, CFG, nc=NC, n_images=NB * B)
    for g in fresh.optimizer.param_groups:
        for p in g["params"]:
            up_groups[names[id(p)]] = GROUP_NAMES.index(g["param_group"])
    ours_groups = {k: int(v) for k, v in _torch_names(ultralytics_param_groups(params)).items()}
    frozen = {n for n, p in up0.named_parameters() if not p.requires_grad} | {n for n in up_groups if ".dfl." in n}
    assert {k: v for k, v in up_groups.items() if k not in frozen} == ours_groups
    assert [sum(v == i for v in ours_groups.values()) for i in range(3)] == [63, 57, 63]

    params, stats = jax.device_get((params, stats))  # host copies: the state and the EMA get their own (donated) buffers
    state = jax.device_put(dict(session.state, params=params, stats=stats), session.replicated)
    ema = jax.device_put({"params": params, "stats": stats}, session.replicated)
    acc = session.new_acc()
    iters, snaps = [], []
    for ni in range(NB * EPOCHS):
        hp = jax.device_get(plan.hyperparams(ni))
        state, ema, acc = session.train_step(state, ema, acc, ours_b[ni])
        stepped = int(state["accum"]["last_opt_step"]) == ni
        iters.append({"lr": hp["lr"], "momentum": float(hp["momentum"]), "accumulate": int(hp["accumulate"]), "loss": float(acc["last"]["loss"]), "stepped": stepped,
                      "grad_norm": float(acc["last"]["grad_norm"])})
        if stepped:
            p, e = jax.device_get((state["params"], ema))
            snaps.append({"params": _torch_names(p), "ema": {**_torch_names(e["params"]), **_torch_names(e["stats"])}, "stats": _torch_names(state["stats"])})

    print(f"jaxyolo: {time.perf_counter() - t0:.1f} s")
    # Hyperparameters and the accumulation: exactly upstream's, iteration by iteration
    assert [r["stepped"] for r in iters] == [r["stepped"] for r in ref] == [k in (0, 1, 3, 7, 11) for k in range(14)]
    assert [r["accumulate"] for r in iters] == [r["accumulate"] for r in ref] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]
    for k, (o, r) in enumerate(zip(iters, ref)):
        np.testing.assert_allclose(o["lr"], r["lr"], rtol=1e-6, atol=0, err_msg=f"iteration {k} lr (weight, bn, bias)")
        assert all(m == pytest.approx(o["momentum"], rel=1e-7) for m in r["momentum"]), (k, o["momentum"], r["momentum"])
    assert int(state["accum"]["updates"]) == ref_tr.ema.updates == 5

    # Losses
    loss, ref_loss, pert_loss = (np.array([r["loss"] for r in x]) for x in (iters, ref, pert))
    err = np.abs(loss - ref_loss) / np.abs(ref_loss)
    drift = np.maximum.accumulate(np.abs(pert_loss - ref_loss) / np.abs(ref_loss))
    print("loss rel. error per iteration ", " ".join(f"{v:.1e}" for v in err))
    print("1-ulp drift (running max)     ", " ".join(f"{v:.1e}" for v in drift))
    assert err[0] <= 1e-5
    assert np.all(err <= np.maximum(1e-5, DRIFT_FACTOR * drift)), (err, drift)

    # The gradient of the objective (upstream's loss.sum(), x B, no nbs / B
    # factor: AdamW would hide a scale), where upstream's .grad held one batch's
    fresh = [k for k, r in enumerate(ref) if r["grad_norm"] is not None]
    assert fresh == [0, 1, 2, 4, 8, 12]
    g, g_ref, g_pert = (np.array([x[k]["grad_norm"] for k in fresh]) for x in (iters, ref, pert))
    g_err = np.abs(g - g_ref) / g_ref
    g_drift = np.maximum.accumulate(np.abs(g_pert - g_ref) / g_ref)
    print("grad norm rel. error          ", " ".join(f"{v:.1e}" for v in g_err), " 1-ulp drift", " ".join(f"{v:.1e}" for v in g_drift))
    assert g_err[0] <= 1e-4  # a single step's gradients: 1e-4 as tests/test_arch_parity.py
    assert np.all(g_err <= np.maximum(1e-4, DRIFT_FACTOR * g_drift)), (g_err, g_drift)

    # Parameters, BatchNorm statistics and EMA after every optimizer step
    keys = [k for k in ref_snaps[0]["params"] if ".dfl." not in k]  # the frozen DFL constant: a jaxyolo constant
    bn = [k for k in ref_snaps[0]["stats"] if "running_" in k]
    for what, ks in (("params", keys), ("stats", bn), ("ema", keys + bn)):
        e = np.array([_rel(o[what], r[what], ks) for o, r in zip(snaps, ref_snaps)])
        d = np.maximum.accumulate([_rel(q[what], r[what], ks) for q, r in zip(pert_snaps, ref_snaps)])
        print(f"{what}: rel. error per optimizer step", " ".join(f"{v:.1e}" for v in e), " 1-ulp drift", " ".join(f"{v:.1e}" for v in d))
        assert np.all(e <= np.maximum(1e-5, DRIFT_FACTOR * d)), (what, e, d)


# ---------------------------------------------------------- the optimizer alone


def _upstream_iterations(tr, epochs, nb, nw):
    """``(epoch, ni)`` of upstream's training loop, its LambdaLR stepped at each
    epoch's start and, before each iteration, the warmup block of ultralytics'
    ``BaseTrainer._do_train`` (8.4.190) applied to ``tr.optimizer``: copied, as
    it is inline in the loop, which the tests cannot call on its own."""
    for epoch in range(epochs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.scheduler.step()
        for i in range(nb):
            ni = i + nb * epoch
            if nw and ni <= nw:
                xi = [0, nw]
                for x in tr.optimizer.param_groups:
                    x["lr"] = float(np.interp(ni, xi, [tr.args.warmup_bias_lr if x.get("param_group") == "bias" else 0.0, x["initial_lr"] * tr.lf(epoch)]))
                    if "momentum" in x:
                        x["momentum"] = float(np.interp(ni, xi, [tr.args.warmup_momentum, tr.args.momentum]))
            yield epoch, ni


def _tiny_torch_model(torch):
    """conv (with bias) -> BatchNorm -> conv (no bias) -> linear: every group."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=False), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def _tiny_params(m):
    """The torch module's parameters as a jaxyolo-style pytree (``kernel`` HWIO / IO, ``scale``, ``bias``)."""
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    return {
        "c0": {"kernel": sd["0.weight"].transpose(2, 3, 1, 0), "bias": sd["0.bias"]},
        "bn": {"scale": sd["1.weight"], "bias": sd["1.bias"]},
        "c2": {"kernel": sd["2.weight"].transpose(2, 3, 1, 0)},
        "fc": {"kernel": sd["4.weight"].T, "bias": sd["4.bias"]},
    }


_TORCH_OF = {"c0": "0", "bn": "1", "c2": "2", "fc": "4"}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_steps_match_torch(oracles, optimizer):
    """``UltralyticsOptimizer`` + ``UltralyticsPlan.hyperparams`` against the
    optimizer upstream's ``build_optimizer`` builds (torch SGD Nesterov /
    AdamW, three groups, decay on the weights only), driven through a warmup
    with a nonzero bias LR (0.1), SGD's momentum warmup and an epoch's
    LambdaLR step, on the same random gradients: the hyperparameters to
    1e-6 and the parameters to 2e-6 (float32 arithmetic of the step sizes
    vs torch's double scalars) after every step."""
    torch = oracles.torch()
    cfg = TrainConfig.from_recipe("ultralytics", optimizer=optimizer, epochs=3, batch=16, nbs=64, warmup_epochs=1.0, weight_decay=0.05, schedule="cosine")
    nb = 6
    m = _tiny_torch_model(torch)
    tr = upstream_trainer(m, cfg, nc=3, n_images=nb * cfg.batch)
    plan = UltralyticsPlan.from_config(cfg, nc=3, steps_per_epoch=nb)
    params = jax.tree.map(jnp.asarray, _tiny_params(m))
    groups = ultralytics_param_groups(params)
    assert groups == {"c0": {"kernel": 0, "bias": 2}, "bn": {"scale": 1, "bias": 2}, "c2": {"kernel": 0}, "fc": {"kernel": 0, "bias": 2}}
    assert [len(g["params"]) for g in tr.optimizer.param_groups] == [3, 1, 3]  # upstream's weight, bn, bias groups
    tx = UltralyticsOptimizer(plan, groups)
    step = jax.jit(lambda g, s, p, ni: tx.step(g, s, p, **{k: v for k, v in plan.hyperparams(ni).items() if k != "accumulate"}))
    opt_state = tx.init(params)
    nw = tr._get_warmup_iterations(nb)
    assert nw == plan.nw == 6
    tr.scheduler.last_epoch = -1
    rng = np.random.default_rng(1)
    warm_lrs = []
    for epoch, ni in _upstream_iterations(tr, cfg.epochs, nb, nw):
        ref = _hp(tr)
        hp = jax.device_get(plan.hyperparams(ni))
        np.testing.assert_allclose(hp["lr"], ref["lr"], rtol=1e-6, err_msg=f"iteration {ni}")
        np.testing.assert_allclose(hp["momentum"], ref["momentum"][0], rtol=1e-7, err_msg=f"iteration {ni}")
        grads = {k: {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in d.items()} for k, d in params.items()}
        for k, d in grads.items():
            for n, g in d.items():
                t = getattr(m, _TORCH_OF[k])
                tp = getattr(t, "weight" if n in ("kernel", "scale") else "bias")
                tp.grad = torch.from_numpy(np.ascontiguousarray(g.transpose(3, 2, 0, 1) if g.ndim == 4 else g.T if n == "kernel" else g))
        tr.optimizer.step()
        params, opt_state = step(jax.tree.map(jnp.asarray, grads), opt_state, params, ni)
        for k, d in _tiny_params(m).items():
            for n, v in d.items():
                np.testing.assert_allclose(np.asarray(params[k][n]), v, rtol=2e-6, atol=2e-7, err_msg=f"{optimizer} iteration {ni} {k}.{n}")
        warm_lrs.append(ref["lr"])
    warm_lrs = np.array(warm_lrs)
    assert warm_lrs[1, 2] > 0.05 > warm_lrs[1, 0] > 0  # the bias group's LR falls from 0.1, the others rise from 0


@pytest.mark.parametrize("ns_float32", [True, False], ids=["ns_float32", "ns_bfloat16"])
def test_musgd_steps_match_torch(oracles, ns_float32):
    """``UltralyticsOptimizer`` with ``optimizer="musgd"`` + the plan's six LR
    groups against the MuSGD that upstream's ``_build_train_pipeline`` builds
    (``build_optimizer(name="MuSGD")``: muon / weight / bn / bias groups, each
    split off at lr x3 for the head's ``cv3``), driven by upstream's warmup
    block (bias groups from ``warmup_bias_lr`` 0.1, the lr x3 bias group
    included, the momentum from 0.8) and two LambdaLR steps, on the same
    random gradients: LRs and momentum to 1e-6 at every iteration; the
    parameters after every step to 1e-6 of each tensor's max with
    Newton-Schulz in float32 on both sides (measured 1.2e-7 .. 1.5e-7 over 6
    gradient draws); with upstream's bfloat16 the leaves without Muon as
    closely (7e-8) and the Muon leaves to 1% of the sum of their Muon step
    sizes ``lr * 0.2`` so far (measured 0.07% .. 0.4% over the 6 draws, up to
    5.4e-5 of the tensor's max: the bfloat16 GEMM's summation order, see
    jaxyolo/train/muon.py)."""
    from test_e2e import _nest, _to_flax, _torch_model

    torch = oracles.torch()
    cfg = TrainConfig.from_recipe("ultralytics", optimizer="musgd", epochs=3, batch=16, nbs=64, warmup_epochs=1.0, weight_decay=0.05, schedule="cosine")
    nb = 4
    m = _torch_model(oracles)
    tr = upstream_trainer(m, cfg, nc=3, n_images=nb * cfg.batch)
    assert type(tr.optimizer).__name__ == "MuSGD"
    plan = UltralyticsPlan.from_config(cfg, nc=3, steps_per_epoch=nb)
    named = dict(m.named_parameters())
    to_flax = {k: _to_flax(k, v.detach().numpy())[0] for k, v in named.items()}
    params = _nest({to_flax[k]: jnp.asarray(_to_flax(k, v.detach().numpy())[1]) for k, v in named.items()})
    groups = ultralytics_param_groups(params, musgd=True)
    # upstream's group of every tensor, as (GROUP_NAMES index, + 3 at lr x3): its muon group is the weight group here
    by_id = {id(p): k for k, p in named.items()}
    theirs = {}
    for g in tr.optimizer.param_groups:
        k = GROUP_NAMES.index("weight" if g["param_group"] == "muon" else g["param_group"]) + 3 * (g["initial_lr"] != cfg.lr0)
        theirs.update({by_id[id(p)]: k for p in g["params"]})
        assert g["use_muon"] == (g["param_group"] == "muon") and g["nesterov"]
    ours = {k: _at(groups, path) for k, path in to_flax.items()}
    assert ours == theirs and sorted(set(ours.values())) == [0, 1, 2, 3, 5]  # the head's cv3: a lr x3 kernel (3) and bias (5)
    tx = UltralyticsOptimizer(plan, groups, ns_dtype=jnp.float32 if ns_float32 else jnp.bfloat16)
    step = jax.jit(lambda g, s, p, ni: tx.step(g, s, p, **{k: v for k, v in plan.hyperparams(ni).items() if k != "accumulate"}))
    opt_state = tx.init(params)
    nw = tr._get_warmup_iterations(nb)
    assert nw == plan.nw == 4
    tr.scheduler.last_epoch = -1
    rng = np.random.default_rng(1)
    worst, muon_worst, lr_seen = 0.0, 0.0, []
    muon_lr = {k: 0.0 for k in named}  # per tensor: the sum of its Muon step sizes lr * muon so far
    for epoch, ni in _upstream_iterations(tr, cfg.epochs, nb, nw):
        hp = jax.device_get(plan.hyperparams(ni))
        for k, p in named.items():
            g = next(x for x in tr.optimizer.param_groups if any(q is p for q in x["params"]))
            np.testing.assert_allclose(hp["lr"][ours[k]], g["lr"], rtol=1e-6, err_msg=f"iteration {ni} {k}")
            np.testing.assert_allclose(hp["momentum"], g["momentum"], rtol=1e-7, err_msg=f"iteration {ni} {k}")
        lr_seen.append(hp["lr"])
        grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in named.items()}
        for k, p in named.items():
            p.grad = torch.from_numpy(grads[k])
        with oracles.float32_newton_schulz() if ns_float32 else contextlib.nullcontext():
            tr.optimizer.step()
        params, opt_state = step(_nest({to_flax[k]: jnp.asarray(_to_flax(k, g)[1]) for k, g in grads.items()}), opt_state, params, ni)
        for k, p in named.items():
            ref = _to_flax(k, p.detach().numpy())[1]
            err = float(np.max(np.abs(np.asarray(_at(params, to_flax[k])) - ref)))
            muon_lr[k] += float(hp["lr"][ours[k]]) * 0.2 if p.ndim in (2, 4) else 0.0
            if muon_lr[k] and not ns_float32:  # bfloat16 Newton-Schulz: in units of the Muon steps taken
                muon_worst = max(muon_worst, err / muon_lr[k])
            else:  # no Newton-Schulz in the step, or float32's: float32's agreement
                worst = max(worst, err / float(np.max(np.abs(ref))))
    print(f"MuSGD ({'float32' if ns_float32 else 'bfloat16'} Newton-Schulz): parameters within {worst:.1e} of each tensor's max"
          + ("" if ns_float32 else f", Muon leaves within {muon_worst:.1e} of their summed Muon step sizes"))
    assert worst < 1e-6
    assert muon_worst < 1e-2
    lr_seen = np.array(lr_seen)
    assert lr_seen[1, 5] > 0.05 and lr_seen[1, 5] != pytest.approx(3 * lr_seen[1, 2])  # the lr x3 bias group falls from 0.1 too
    np.testing.assert_allclose(lr_seen[nw:, 3], 3 * lr_seen[nw:, 0], rtol=1e-6)  # after the warmup: the lr x3 groups at 3 lr0 lf


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# ---------------------------------------------------------- the recipe as data


def test_recipe_values_are_upstream_defaults(oracles):
    """``TrainConfig.from_recipe("ultralytics")`` holds ultralytics' own
    defaults (cfg/default.yaml through ``get_cfg``) and round-trips through
    JSON; ``from_recipe("jaxyolo")`` is ``TrainConfig()``."""
    from ultralytics.cfg import get_cfg

    up = get_cfg()
    c = TrainConfig.from_recipe("ultralytics")
    for ours, theirs in (("optimizer", "optimizer"), ("lr0", "lr0"), ("lrf", "lrf"), ("momentum", "momentum"), ("weight_decay", "weight_decay"),
                         ("warmup_epochs", "warmup_epochs"), ("warmup_momentum", "warmup_momentum"), ("warmup_bias_lr", "warmup_bias_lr"),
                         ("nbs", "nbs"), ("close_mosaic", "close_mosaic")):
        assert getattr(c, ours) == getattr(up, theirs), ours
    assert (c.schedule == "cosine") == up.cos_lr
    for k in ("mosaic", "translate", "scale", "degrees", "shear", "perspective", "hsv_h", "hsv_s", "hsv_v", "flipud", "fliplr"):
        assert getattr(c, k) == getattr(up, k), k
    assert (c.grad_clip, c.ema_decay, c.ema_tau) == (10.0, 0.9999, 2000.0)  # optimizer_step's max_norm, ModelEMA's defaults
    assert TrainConfig.from_json(c.to_json()) == c
    assert TrainConfig.from_recipe("jaxyolo") == TrainConfig() and TrainConfig().recipe == "jaxyolo"
    assert TrainConfig.from_recipe("ultralytics", lr0=0.02, optimizer="sgd").lr0 == 0.02


def test_recipe_validation_names_the_field():
    with pytest.raises(ValueError, match="recipe must be one of"):
        TrainConfig.from_recipe("yolov5")
    with pytest.raises(ValueError, match="recipe must be one of"):
        TrainConfig(recipe="darknet")
    with pytest.raises(ValueError, match="optimizer='auto' is ultralytics' rule"):
        TrainConfig(optimizer="auto")
    with pytest.raises(ValueError, match="loss='yolox' does not fit recipe='ultralytics'"):
        TrainConfig.from_recipe("ultralytics", loss="yolox")
    with pytest.raises(ValueError, match="warmup_momentum must be a number in"):
        TrainConfig.from_recipe("ultralytics", warmup_momentum=1.5)
    with pytest.raises(ValueError, match="warmup_bias_lr must be a number >= 0"):
        TrainConfig.from_recipe("ultralytics", warmup_bias_lr=-0.1)
    with pytest.raises(ValueError, match="grad_clip: recipe='ultralytics' clips"):
        TrainConfig.from_recipe("ultralytics", grad_clip=None)


def test_auto_rule_and_accumulation_as_upstream(oracles):
    """``optimizer=auto``, ``accumulate`` and the scaled decay against
    upstream's own ``_build_train_pipeline`` + ``build_optimizer`` on a tiny
    module, over batch sizes and dataset sizes on both sides of the 10 000
    iteration threshold (AdamW up to it, MuSGD beyond)."""
    torch = oracles.torch()
    from jaxyolo.train.optim import ultralytics_auto_optimizer

    for nc, n_images, batch, epochs in ((6, 640, 16, 100), (80, 6400, 24, 100), (1, 100, 128, 3), (3, 64000, 32, 10)):  # 10 000 iterations: still AdamW
        cfg = TrainConfig.from_recipe("ultralytics", batch=batch, epochs=epochs)
        tr = upstream_trainer(_tiny_torch_model(torch), cfg, nc=nc, n_images=n_images)
        plan = UltralyticsPlan.from_config(cfg, nc=nc, steps_per_epoch=math.ceil(n_images / batch), n_images=n_images)
        groups = {g["param_group"]: g for g in tr.optimizer.param_groups}
        assert plan.accumulate == tr.accumulate, (batch, plan.accumulate, tr.accumulate)
        assert plan.weight_decay == groups["weight"]["weight_decay"] and groups["bn"]["weight_decay"] == groups["bias"]["weight_decay"] == 0
        assert (plan.lr0, plan.momentum, plan.warmup_bias_lr) == (groups["weight"]["lr"], groups["weight"]["betas"][0], tr.args.warmup_bias_lr)
        assert type(tr.optimizer).__name__ == "AdamW" and plan.optimizer == "adamw"
    # beyond 10 000 iterations: MuSGD, lr0 0.01, momentum 0.9, the bias warmup from 0 (10 010 and 184 900 iterations)
    for nc, n_images, batch, epochs in ((3, 64064, 32, 10), (80, 118287, 16, 100)):
        cfg = TrainConfig.from_recipe("ultralytics", batch=batch, epochs=epochs)
        holder = torch.nn.Module()
        holder.model = _tiny_torch_model(torch)  # MuSGD looks for the head at model.model[-1]
        tr = upstream_trainer(holder, cfg, nc=nc, n_images=n_images)
        plan = UltralyticsPlan.from_config(cfg, nc=nc, steps_per_epoch=math.ceil(n_images / batch), n_images=n_images)
        muon = next(g for g in tr.optimizer.param_groups if g["param_group"] == "muon" and g["params"])
        assert type(tr.optimizer).__name__ == "MuSGD" and plan.optimizer == "musgd"
        assert (plan.lr0, plan.momentum, plan.warmup_bias_lr) == (muon["lr"], muon["momentum"], tr.args.warmup_bias_lr) == (0.01, 0.9, 0.0)
        assert plan.weight_decay == muon["weight_decay"] and plan.accumulate == tr.accumulate
        assert plan.target_momentum == tr.args.momentum == 0.937  # where the warmup's momentum ends: auto leaves args.momentum
    assert ultralytics_auto_optimizer(nc=3, n_images=64064, batch=32, epochs=10) == ("musgd", 0.01, 0.9)
    assert ultralytics_auto_optimizer(nc=3, n_images=64000, batch=32, epochs=10)[0] == "adamw"  # exactly 10 000
    assert ultralytics_auto_optimizer(nc=80, n_images=6400, batch=16, epochs=100) == ("adamw", 0.000119, 0.9)


@pytest.mark.slow
def test_ultralytics_recipe_resumes_exactly(tmp_path):
    """The recipe's extra state (the gradient sum, the last optimizer step's
    iteration, the EMA's update count) is checkpointed: stopped after
    iteration 3 (its gradients summed, not yet stepped: nbs 8 / batch 4,
    warmup accumulate 1, 1, 2, 2, 2 ...: steps at iterations 1, 2, 4, 6) and
    resumed, the next losses across the epoch boundary are the uninterrupted
    run's, bit for bit."""
    import dataclasses

    from jaxyolo.train import train

    cfg = TrainConfig.from_recipe("ultralytics", img_size=64, batch=4, nbs=8, epochs=2, train_size=16, val_size=8, max_boxes=8, max_steps=6)
    q = dict(progress=False, log=lambda *_: None, log_every=1)
    full = train(cfg, tmp_path / "full", **q)
    part = train(dataclasses.replace(cfg, max_steps=3), tmp_path / "part", **q)
    rest = train(cfg, tmp_path / "part", resume=True, **q)
    assert full["steps"] == rest["steps"] == 6 and part["steps"] == 3
    np.testing.assert_array_equal(part["losses"] + rest["losses"], full["losses"])
    # a lost gradient sum (or step count) changes the step at iteration 4, and so the losses after it
    assert len(set(full["losses"][3:])) == 3
