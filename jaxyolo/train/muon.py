"""MuSGD (ultralytics 8.4.190 ``ultralytics/optim/muon.py``) as an optax transformation.

YOLO26 trains with MuSGD when ``optimizer=auto`` sees more than 10,000
iterations (``BaseTrainer.build_optimizer``: ``MuSGD``, lr0 0.01, momentum
0.9).  Per parameter, in upstream's order of operations (float32 unless said)::

    Muon leaves (matrices and conv filters, upstream ``param.ndim in {2, 4}``):
        m  = beta m + (1 - beta) g                      # momentum_buffer
        u  = beta m + (1 - beta) g     (Nesterov; else u = m)
        U  = NS5(u as (rows, cols)) * sqrt(max(1, dim[-2] / dim[-1]))
        p  = p - (lr * muon) U
        then the SGD step below on the *updated* p with lr * sgd and its own
        buffer (momentum_buffer_SGD)
    every leaf (the SGD step; Muon leaves after their Muon step):
        g' = g + wd p
        b  = momentum b + g'
        p  = p - lr (g' + momentum b)   (Nesterov; else p - lr b)

``NS5`` is ``zeropower_via_newtonschulz5``: 5 quintic Newton-Schulz steps
with coefficients ``(3.4445, -4.7750, 2.0315)`` in bfloat16 after
``X / (||X||_F + 1e-7)``, on the transpose when ``rows > cols``.

Upstream quirks, named once (reproduced, but for the accumulation order of
bfloat16 products, the last point below):

* the Muon scale ``sqrt(max(1, dim[-2] / dim[-1]))`` reads the last two dims
  of the *torch* shape: ``out / in`` for a linear weight ``(out, in)``, but
  ``kh / kw`` (= 1 for square filters) for a conv weight ``(O, I, kh, kw)``,
  although the matrix orthogonalised is ``(O, I kh kw)``
  (:func:`_muon_scale`).
* weight decay enters the SGD half of a Muon leaf only, and is computed from
  the parameter *after* its Muon step (:func:`musgd`'s ``leaf``); the Muon
  momentum uses the raw gradient.
* bfloat16 where torch's CPU kernels round it: each product ``X X^T``,
  ``A A``, ``B X`` accumulates in float32 and is rounded once, and
  ``baddbmm``'s ``beta * M + alpha * (A B)`` is formed in float32 and
  rounded once (checked against torch 2.13); the Frobenius norm, the ``+
  eps`` and the division each round to bfloat16 (:func:`newton_schulz5`).
* float32 rounding of the momentum lines: torch's ``_foreach_mul_`` then
  ``_foreach_add_`` rounds the product, XLA:CPU would fuse it into a
  multiply-add (:func:`_rounded` keeps them apart; ``a + alpha * b`` is a
  fused multiply-add on both sides).
* bfloat16 GEMM accumulation order (not reproduced): torch's CPU kernel
  (oneDNN, AMX where the CPU has it) sums the float32 products in its own
  blocked order, which differs between torch's own kernels and machines;
  an entry that lands on the other side of a bfloat16 rounding boundary
  changes the rest of the iteration at the bfloat16 ulp level.  Measured:
  ``NS5`` of a 256x384 matrix differs by 1.9e-2 of its max between torch's
  oneDNN and native kernels, and by 1.9e-2 / 1.4e-2 between this code and
  each; one MuSGD step on a random yolo26n (366 leaves, upstream's groups)
  differs from upstream by 0.5% of the largest Muon update (2.6e-4 of the
  parameter's max at lr 0.01); with both sides iterating in float32
  (``ns_dtype=jnp.float32``) by 1.2e-7 of the parameter's max.
* upstream batches the matrices of a parameter group with equal column
  count (and scale), zero-padding rows, and transposes the whole batch when
  the padded row count exceeds the columns: a short matrix batched with a
  tall one is iterated on its transpose.  Zero rows add exact zeros, so the
  per-matrix iteration here equals upstream's once the same transposition
  is chosen, which :func:`_transposed` computes from the static shapes.

How upstream's parameter groups map here (``build_optimizer`` with MuSGD):
upstream's groups ``muon`` (every 2-D/4-D parameter, decay ``wd``),
``weight`` (other weights, decay ``wd``), ``bn`` (normalisation weights,
decay 0) and ``bias`` (decay 0), each split in two, the detect head's class
branches (``cv3`` and ``one2one_cv3`` of ``model[-1]``) at ``lr * 3``.  Here
that is ``muon_mask`` (which leaves get the Muon step), ``decay_mask``
(which leaves get ``wd``) and ``lr_scale`` (3.0 on the head's class
branches); :func:`ultralytics_musgd_masks` computes all three from a
jaxyolo/flax parameter tree whose paths are upstream's ``state_dict`` keys.
The trainer's ``muon=0.2, sgd=1.0`` are this transformation's defaults.
``TrainConfig(optimizer="musgd")`` trains with :func:`musgd` (recipe
"jaxyolo", :func:`jaxyolo.train.optim.make_optimizer`) or with
:func:`musgd_step` at the group LRs of upstream's warmup and LambdaLR
(recipe "ultralytics", :class:`jaxyolo.train.optim.UltralyticsOptimizer`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["HEAD_LR_SCALE", "MuSGDState", "musgd", "musgd_init", "musgd_step", "newton_schulz5", "ultralytics_musgd_masks"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
HEAD_LR_SCALE = 3.0  # build_optimizer: MuSGD's groups of the detect head's class branches at lr * 3


def _bf16(x):
    """Round float32 to the nearest bfloat16 (kept as float32)."""
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _mm(x, y):
    """``x @ y`` of bfloat16-valued float32 matrices: exact products, float32
    accumulation (torch's CPU bf16 GEMM), result still float32."""
    return jnp.matmul(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def newton_schulz5(g, *, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7, transpose=None,
                   dtype=jnp.bfloat16):
    """Upstream ``zeropower_via_newtonschulz5`` on ``(rows, cols)`` (or ``(N, rows, cols)``).

    Args:
      g: float32 matrix (batch).
      steps, coefficients, eps: upstream's 5, ``(3.4445, -4.7750, 2.0315)``, 1e-7.
      transpose: iterate on the transpose (``None``: when ``rows > cols``, as
        upstream on one matrix; see :func:`_transposed` for upstream's batches).
      dtype: ``jnp.bfloat16`` (upstream) or ``jnp.float32`` (the same
        iteration without the bfloat16 roundings).

    Returns:
      float32 array of ``g``'s shape holding bfloat16 values (upstream returns
      bfloat16 and the caller casts it to the gradient's dtype).
    """
    a, b, c = coefficients
    if jnp.dtype(dtype) == jnp.float32:
        rnd, mm = (lambda x: x), (lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    elif jnp.dtype(dtype) == jnp.bfloat16:
        rnd, mm = _bf16, _mm
    else:
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
    x = rnd(g.astype(jnp.float32))
    norm = rnd(jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)))
    x = rnd(x / rnd(norm + jnp.float32(eps)))
    tall = g.shape[-2] > g.shape[-1] if transpose is None else transpose
    if tall:
        x = jnp.swapaxes(x, -2, -1)
    for _ in range(steps):
        m = rnd(mm(x, jnp.swapaxes(x, -2, -1)))  # A = X X^T
        bm = rnd(jnp.float32(b) * m + jnp.float32(c) * mm(m, m))  # baddbmm(A, A, A, beta=b, alpha=c)
        x = rnd(jnp.float32(a) * x + mm(bm, x))  # baddbmm(X, B, X, beta=a)
    return jnp.swapaxes(x, -2, -1) if tall else x


def _rounded(x):
    """``x`` unchanged, but a product ``a * b`` passed through here is rounded to
    float32 before a following addition: XLA:CPU contracts ``a * b + c`` into
    one fused multiply-add, while torch's ``_foreach_mul_`` then
    ``_foreach_add_`` round twice (the select hides the product from the
    contraction; NaN stays NaN)."""
    return jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)


def _to_torch(x, layout):
    """A leaf in torch's layout: flax conv ``(kh, kw, I, O)`` -> ``(O, I, kh, kw)``,
    flax dense ``(in, out)`` -> ``(out, in)``."""
    if layout == "torch":
        return x
    if x.ndim == 4:
        return jnp.transpose(x, (3, 2, 0, 1))
    return x.T


def _from_torch(x, layout):
    if layout == "torch":
        return x
    if x.ndim == 4:
        return jnp.transpose(x, (2, 3, 1, 0))
    return x.T


def _muon_scale(torch_shape):
    """Upstream's ``max(1, grad.size(-2) / grad.size(-1)) ** 0.5`` (the torch shape's last two dims)."""
    return max(1.0, torch_shape[-2] / torch_shape[-1]) ** 0.5


def _muon_direction(u, layout, transpose, ns_dtype):
    """``NS5`` of a Muon leaf's Nesterov update, scaled, in the leaf's own layout."""
    t = _to_torch(u, layout)
    mat = t.reshape(t.shape[0], -1) if t.ndim > 2 else t  # (O, I kh kw) for conv filters, row-major as torch's flatten(1)
    out = newton_schulz5(mat, transpose=transpose, dtype=ns_dtype).reshape(t.shape) * jnp.float32(_muon_scale(t.shape))
    return _from_torch(out, layout)


def _torch_shape(shape, layout):
    if layout == "torch":
        return tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape[::-1])


def _transposed(shapes, group_keys, layout):
    """Whether upstream's ``muon_update`` iterates on each matrix's transpose.

    Upstream orthogonalises the matrices of one parameter group that share
    ``(cols, scale)`` in one batch, zero-padded to the largest row count (a
    batch is split where row counts span more than 16x), and transposes the
    whole batch when that padded row count exceeds ``cols``: a short matrix
    batched with a tall one is iterated transposed.  The result is the same
    matrix mathematically, but bfloat16 rounds it differently, so the
    decision is reproduced.  ``shapes``: the leaves' shapes; ``group_keys``:
    their upstream parameter group (hashable).  Returns a list of bools.
    """
    buckets = {}
    for i, (shape, key) in enumerate(zip(shapes, group_keys)):
        t = _torch_shape(shape, layout)
        rows, cols = t[0], int(math.prod(t[1:]))
        buckets.setdefault((key, cols, _muon_scale(t)), []).append((i, rows, cols))
    out = [False] * len(shapes)
    for items in buckets.values():
        items.sort(key=lambda it: -it[1])  # stable, as upstream's list.sort
        start = 0
        for j in range(1, len(items) + 1):
            if j == len(items) or items[start][1] > 16 * items[j][1]:
                for i, _, cols in items[start:j]:
                    out[i] = items[start][1] > cols
                start = j
    return out


class MuSGDState(NamedTuple):
    """State of :func:`musgd`: ``count`` (int32 steps, for a schedule), ``momentum``
    (upstream ``momentum_buffer``: Muon's for Muon leaves, SGD's for the others)
    and ``momentum_sgd`` (``momentum_buffer_SGD`` of Muon leaves; a ``()`` zero
    elsewhere)."""

    count: jax.Array
    momentum: Any
    momentum_sgd: Any


def _tree_or_call(x, params, default):
    if x is None:
        return jax.tree.map(default, params)
    return x(params) if callable(x) else x


def musgd_init(params, muon_mask) -> MuSGDState:
    """The zero :class:`MuSGDState` of ``params`` (``muon_mask``: pytree of bools, the Muon leaves)."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    sgd_buf = jax.tree.map(lambda p, m: jnp.zeros_like(p) if m else jnp.zeros((), p.dtype), params, muon_mask)
    return MuSGDState(jnp.zeros((), jnp.int32), zeros, sgd_buf)


def musgd_step(grads, state: MuSGDState, params, *, lr, momentum, weight_decay, muon_mask, batch_key, nesterov: bool = True,
               muon: float = 0.2, sgd: float = 1.0, layout: str = "flax", ns_dtype=jnp.bfloat16):
    """One ``MuSGD.step`` with per-leaf hyperparameters, as upstream reads them
    from each leaf's parameter group: ``(new_params, new_state)``.

    Args:
      grads, state, params: pytrees of ``params``' structure (``state`` from
        :func:`musgd_init` with the same ``muon_mask``).
      lr: pytree of each leaf's group ``lr`` (a Python float or a traced
        ``()`` float32), before the ``muon`` / ``sgd`` weights.
      momentum: the groups' ``momentum`` (float or traced ``()`` float32),
        SGD's and Muon's ``beta`` alike.
      weight_decay: pytree of each leaf's group ``weight_decay`` (Python
        floats; 0 skips the decay term, as upstream).
      muon_mask: pytree of bools, the leaves of a ``use_muon`` group.
      batch_key: pytree of hashables, each leaf's parameter group: upstream
        orthogonalises a group's matrices in batches (:func:`_transposed`).
      nesterov, muon, sgd, layout, ns_dtype: as :func:`musgd`.
    """
    if layout not in ("flax", "torch"):
        raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}")
    f32 = jnp.float32
    beta, one_minus = jnp.asarray(momentum, f32), jnp.asarray(1 - momentum, f32)  # a Python float rounds 1 - beta once, as torch's alpha

    def leaf(p, g, buf, buf_sgd, lr_l, wd, is_muon, transpose):
        g = g.astype(p.dtype)
        new = p
        # each line is one torch _foreach op: "a + alpha * b" is a fused multiply-add
        # in both torch and XLA, a separate _foreach_mul_ is rounded (_rounded)
        if is_muon:
            buf = _rounded(buf * beta) + one_minus * g
            u = _rounded(buf * beta) + one_minus * g if nesterov else buf
            new = new + jnp.asarray(-(lr_l * muon), f32) * _muon_direction(u, layout, transpose, ns_dtype)
            lr_s = lr_l * sgd
        else:
            lr_s = lr_l
        if wd != 0:
            g = g + f32(wd) * new  # the Muon-updated parameter, as upstream
        b = buf_sgd if is_muon else buf
        b = _rounded(b * beta) + g
        step = g + beta * b if nesterov else b
        new = new + jnp.asarray(-lr_s, f32) * step
        if is_muon:
            buf_sgd = b
        else:
            buf = b
        return new, buf, buf_sgd

    flat_p, treedef = jax.tree.flatten(params)
    rest = [treedef.flatten_up_to(t) for t in (grads, state.momentum, state.momentum_sgd, lr, weight_decay, muon_mask)]
    flat_key = treedef.flatten_up_to(batch_key)
    muon_idx = [i for i, m in enumerate(rest[5]) if m]
    odd = [i for i in muon_idx if flat_p[i].ndim < 2]
    if odd:  # Muon orthogonalises matrices (upstream's muon_update: "each must have at least two dimensions")
        path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(params)[0][odd[0]][0])
        raise ValueError(f"muon_mask: Muon needs a matrix or conv filter, but {path} of shape {flat_p[odd[0]].shape} is marked")
    tr = _transposed([flat_p[i].shape for i in muon_idx], [flat_key[i] for i in muon_idx], layout)
    transpose = dict(zip(muon_idx, tr))
    out = [leaf(*args, transpose.get(i)) for i, args in enumerate(zip(flat_p, *rest))]
    pick = lambda i: treedef.unflatten([o[i] for o in out])  # noqa: E731
    return pick(0), MuSGDState(state.count + 1, pick(1), pick(2))


def musgd(
    learning_rate,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    muon: float = 0.2,
    sgd: float = 1.0,
    muon_mask=None,
    decay_mask=None,
    lr_scale=None,
    layout: str = "flax",
    ns_dtype=jnp.bfloat16,
) -> optax.GradientTransformation:
    """ultralytics' ``MuSGD`` step (see the module docstring) as an optax transformation.

    Args:
      learning_rate: float or optax schedule of the step count (upstream's
        group ``lr`` before ``lr_scale``).
      momentum: SGD momentum, also Muon's ``beta`` (upstream uses the group's
        momentum for both; 0.9 under ``optimizer=auto``).
      nesterov: Nesterov for both halves (``build_optimizer``: True).
      weight_decay: upstream's ``decay`` (already scaled by ``batch * accumulate
        / nbs``), applied where ``decay_mask``.
      muon, sgd: the mixing weights: Muon leaves step ``lr * muon`` along the
        orthogonalised update and ``lr * sgd`` along their SGD update
        (``build_optimizer``: 0.2 and 1.0; ``MuSGD``'s own defaults are 0.5, 0.5).
      muon_mask: pytree of bools (or a function of the params) selecting the
        Muon leaves; default ``ndim in (2, 4)`` (upstream's rule).
      decay_mask: pytree of bools (or function); default = the Muon leaves
        (upstream: ``muon`` and ``weight`` groups decay, ``bn`` / ``bias`` do not).
      lr_scale: pytree of floats (or function) multiplying the learning rate
        per leaf; default 1 (upstream: 3 on the head's class branches).
      layout: ``"flax"`` (conv kernels ``(kh, kw, I, O)``, dense ``(in, out)``)
        or ``"torch"`` (``(O, I, kh, kw)``, ``(out, in)``): Muon works on
        upstream's matrices either way.
      ns_dtype: the Newton-Schulz precision, ``jnp.bfloat16`` (upstream) or
        ``jnp.float32``.

    Returns:
      ``optax.GradientTransformation`` whose ``update(grads, state, params)``
      (params required) returns ``new_params - params``.
    """
    if layout not in ("flax", "torch"):
        raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}")

    def masks(params):
        mu = _tree_or_call(muon_mask, params, lambda p: p.ndim in (2, 4))
        dec = mu if decay_mask is None else _tree_or_call(decay_mask, params, None)
        sc = _tree_or_call(lr_scale, params, lambda p: 1.0)
        return mu, dec, sc

    def init(params):
        return musgd_init(params, masks(params)[0])

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("musgd needs params (its weight decay and the Muon step read them)")
        mu, dec, sc = masks(params)
        # a constant learning rate stays a Python float, so that lr * scale * muon
        # rounds once to float32, as upstream's Python arithmetic
        lr = jnp.asarray(learning_rate(state.count), jnp.float32) if callable(learning_rate) else learning_rate
        # the params' structure: jax.tree.map stops at its leaves (masks hold Python bools and floats)
        lr_leaf = jax.tree.map(lambda _, s: lr * s, params, sc)
        wd_leaf = jax.tree.map(lambda _, d: weight_decay if d else 0.0, params, dec)
        key = jax.tree.map(lambda _, d, s: (bool(d), s), params, dec, sc)  # upstream's group: (decays, lr scale)
        new, state = musgd_step(grads, state, params, lr=lr_leaf, momentum=momentum, weight_decay=wd_leaf, muon_mask=mu,
                                batch_key=key, nesterov=nesterov, muon=muon, sgd=sgd, layout=layout, ns_dtype=ns_dtype)
        return jax.tree.map(jnp.subtract, new, params), state

    return optax.GradientTransformation(init, update)


def ultralytics_musgd_masks(params, *, head: str | None = None):
    """``(muon_mask, decay_mask, lr_scale)`` for :func:`musgd` as upstream's
    ``build_optimizer`` groups a model's parameters under MuSGD.

    ``params``: a pytree whose key paths spell upstream's ``state_dict`` keys
    (``model/23/cv3/0/...``; flax leaf names ``kernel`` / ``scale`` /
    ``bias``).  Muon: every 2-D/4-D leaf; decay: Muon leaves and other
    non-bias, non-``scale`` (normalisation) leaves; ``lr_scale``
    :data:`HEAD_LR_SCALE` (3) under the detect head's ``cv3`` and
    ``one2one_cv3`` (``head``: the head's key; default the largest integer
    key under ``model``, upstream's ``model[-1]``, else a top-level ``head``,
    jaxyolo's own detectors), else 1.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_keys(path) for path, _ in flat]
    if head is None:
        idx = [int(p[i + 1]) for p in paths for i in range(len(p) - 1) if p[i] == "model" and p[i + 1].isdigit()]
        head = str(max(idx)) if idx else ("head" if any(p[:1] == ("head",) for p in paths) else None)

    def boosted(path):
        return any(path[i] == head and path[i + 1] in ("cv3", "one2one_cv3") for i in range(len(path) - 1))

    muon_mask = [p.ndim in (2, 4) for _, p in flat]
    decay_mask = [m or keys[-1] not in ("bias", "scale") for m, keys in zip(muon_mask, paths)]
    lr_scale = [HEAD_LR_SCALE if boosted(keys) else 1.0 for keys in paths]
    return tuple(treedef.unflatten(x) for x in (muon_mask, decay_mask, lr_scale))


def _keys(path):
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
