"""Checkpoints: the packed layout and its checks."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxyolo.train import checkpoint as ckpt


def _tree(seed=0):
    r = np.random.default_rng(seed)
    return {
        "params": {"conv": {"kernel": jnp.asarray(r.normal(size=(3, 3, 4, 8)), jnp.float32), "bias": jnp.asarray(r.normal(size=(8,)), jnp.float32)}},
        "opt_state": ({"count": jnp.asarray(7, jnp.int32)}, [jnp.asarray(r.normal(size=(5,)), jnp.float32)]),
        "step": jnp.asarray(41, jnp.int32),
        "half": jnp.asarray(r.normal(size=(2, 3)), jnp.bfloat16),
    }


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_pack_is_one_array_per_dtype_and_unpack_inverts_it():
    t = _tree()
    packed = jax.jit(ckpt.pack)(t)
    assert sorted(packed) == ["bfloat16", "float32", "int32"]
    assert packed["float32"].shape == (3 * 3 * 4 * 8 + 8 + 5,) and packed["int32"].shape == (2,)
    _same(jax.jit(ckpt.unpack)(packed, t), t)
    assert ckpt.layout(t)[0] == ["['half']", [2, 3], "bfloat16"]


def test_writer_round_trip_and_layout_checks(tmp_path):
    state, ema = _tree(0), {"params": _tree(1)["params"]}
    mngr = ckpt.manager(tmp_path)
    writer = ckpt.Writer(mngr, state, ema)
    writer.save(3, state, ema, {"epoch": 1})
    state2 = jax.tree.map(lambda x: x + 1, state)
    writer.save(5, state2, ema, {"epoch": 2})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [3, 5]
    # The arrays on disk: one per dtype and item, not one per tensor.
    on_disk = mngr.item_metadata(5)
    assert sorted(on_disk["state"]) == ["bfloat16", "float32", "int32"] and sorted(on_disk["ema"]) == ["float32"]
    meta = ckpt.restore_meta(mngr, 5)
    assert meta["epoch"] == 2 and meta["layout"]["ema"] == ckpt.layout(ema)

    got = ckpt.restore(mngr, 5, state=_tree(9), ema={"params": _tree(9)["params"]})
    _same(got["state"], state2)
    _same(got["ema"], ema)
    _same(ckpt.restore(mngr, 3, state=_tree(9))["state"], state)

    other = dict(_tree(), params={"conv": {"kernel": jnp.zeros((3, 3, 4, 16)), "bias": jnp.zeros((16,))}})
    with pytest.raises(ckpt.CheckpointError, match=r"'state' does not fit .*: tensor \['params'\]\['conv'\]\['bias'\] is \(8,\) float32 in the checkpoint, .* \(16,\) float32 here"):
        ckpt.restore(mngr, 5, state=other)
    with pytest.raises(ckpt.CheckpointError, match="2 tensors in the checkpoint, 1 here"):
        ckpt.restore(mngr, 5, ema={"params": {"conv": {"bias": ema["params"]["conv"]["bias"]}}})
    mngr.close()


def test_a_checkpoint_of_the_per_tensor_layout_is_refused_clearly(tmp_path):
    mngr = ckpt.manager(tmp_path)
    t = _tree()
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(t), meta=ocp.args.JsonSave({"epoch": 0})))
    mngr.wait_until_finished()
    with pytest.raises(ckpt.CheckpointError, match="written by an earlier jaxyolo"):
        ckpt.restore(mngr, 1, state=t)
    mngr.close()
