"""The upstream architectures: registry, structure against the upstream
definitions, the trainer-facing interface, bf16, conversion errors, weight
directories and checkpoint files."""

import copy
import importlib.util
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from _arch_cases import compiled, upstream_model
from flax import nnx

from jaxyolo.models import MODELS, YOLOV5S_ANCHORS, build_model, from_torch, load_weights, save_weights, to_torch_state_dict
from jaxyolo.models import ultralytics as ul
from jaxyolo.models import yolov5 as v5
from jaxyolo.models import yolox as yx
from jaxyolo.models.convert import _constants, _torch_shape, torch_key

NAMES = (
    [f"yolov8{s}" for s in "nsmlx"] + [f"yolo11{s}" for s in "nsmlx"] + [f"yolo26{s}" for s in "nsmlx"]
    + [f"yolov10{s}" for s in "nsmblx"] + [f"yolov5{s}" for s in "nsmlx"]
    + [f"yolox-{s}" for s in ("nano", "tiny", "s", "m", "l", "x")]
)


def test_registry():
    assert list(MODELS) == NAMES
    assert {n: (MODELS[n].family, MODELS[n].head_type) for n in ("yolov8n", "yolo11x", "yolo26s", "yolov10b", "yolov5s", "yolox-tiny")} == {
        "yolov8n": ("ultralytics", "yolov8"), "yolo11x": ("ultralytics", "yolov8"),
        "yolo26s": ("ultralytics", "e2e"), "yolov10b": ("ultralytics", "e2e"),
        "yolov5s": ("yolov5", "yolov5"), "yolox-tiny": ("yolox", "yolox"),
    }
    with pytest.raises(ValueError, match=r"unknown model 'yolov7'.*yolov8n, yolov8s"):
        build_model("yolov7", nc=3)
    with pytest.raises(ValueError, match="nc must be a positive int"):
        build_model("yolov8n", nc=0)


def _package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def _yaml_rows(d, *, anchors_module="AnchorDetect"):
    """yaml rows ``[from, n, module, args]`` in our tables' spelling."""
    rows = []
    for f, n, m, args in d["backbone"] + d["head"]:
        f = tuple(f) if isinstance(f, list) else f
        if m == "nn.Upsample":
            assert args in ([None, 2, "nearest"], ["None", 2, "nearest"])
            m, args = "Upsample", []
        elif m == "Concat":
            assert args == [1]
            args = []
        elif m in ("Detect", "v10Detect"):
            assert args[0] == "nc"
            m, args = (anchors_module, ["anchors"]) if len(args) == 2 else (m, [])
        rows.append((f, n, m, tuple(args)))
    return rows


def test_tables_are_the_upstream_yamls():
    root = _package_dir("ultralytics") / "cfg" / "models"
    for arch, path in (("yolov8", root / "v8" / "yolov8.yaml"), ("yolo11", root / "11" / "yolo11.yaml"),
                       ("yolo26", root / "26" / "yolo26.yaml")):
        d = yaml.safe_load(path.read_text())
        table, scales = ul.SCALES[arch]
        assert {k: tuple(v) for k, v in d["scales"].items()} == scales
        assert _yaml_rows(d) == list(table)
        assert (d.get("reg_max", 16), bool(d.get("end2end"))) == ul.HEAD[arch]
    for s, scale in ul.SCALES["yolov10"][1].items():  # one yaml per scale
        d = yaml.safe_load((root / "v10" / f"yolov10{s}.yaml").read_text())
        assert {k: tuple(v) for k, v in d["scales"].items()} == {s: scale}
        assert _yaml_rows(d) == list(ul.yolov10_table(s)), s
        assert "reg_max" not in d and "end2end" not in d  # v10Detect: reg_max 16, end-to-end by itself
    for s, (depth, width) in v5.SCALES.items():
        d = yaml.safe_load((_package_dir("yolov5") / "models" / f"yolov5{s}.yaml").read_text())
        assert (d["depth_multiple"], d["width_multiple"]) == (depth, width)
        assert _yaml_rows(d) == list(v5.YOLOV5)
        assert tuple(map(tuple, d["anchors"])) == YOLOV5S_ANCHORS


def _our_shapes(name, nc):
    """``{state_dict key: shape}`` of our model, from abstract evaluation (no init)."""
    model = nnx.eval_shape(lambda: build_model(name, nc=nc))
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(model)):
        out[torch_key(path)] = _torch_shape(path[-1], v.shape)
        if path[-1] == "mean":
            out[".".join(map(str, path[:-1])) + ".num_batches_tracked"] = ()
    out.update({k: c.shape for k, c in _constants(model).items()})
    return out


def _upstream_shapes(name, nc, t):
    """``{key: shape}`` of the upstream model, built on the meta device by
    upstream's own ``parse_model`` / ``Exp.get_model`` (no weights, no forward)."""
    from jaxyolo.models import upstream

    family = MODELS[name].family
    with t.device("meta"):
        if family == "ultralytics":
            from ultralytics.nn.tasks import parse_model, yaml_model_load

            d = yaml_model_load(f"{name}.yaml")
            d["nc"] = nc
            sd = {f"model.{k}": v for k, v in parse_model(copy.deepcopy(d), ch=3, verbose=False)[0].state_dict().items()}
        elif family == "yolov5":
            from yolov5.models.yolo import parse_model

            d = yaml.safe_load((_package_dir("yolov5") / "models" / f"{name}.yaml").read_text())
            d["nc"] = nc
            sd = {f"model.{k}": v for k, v in parse_model(d, ch=[3])[0].state_dict().items()}
        else:
            sd = upstream.build_upstream(name, nc=nc).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


# n and s are compared value for value in test_arch_parity; these cover the
# other scales' rules: max_channels (768 / 512), forced c3k (YOLO11 / YOLO26
# m/l/x; YOLO26's attention block keeps attn over c3k), depth rounding (0.67,
# 1.0, 1.33), YOLOv10's per-scale C2fCIB rows and the YOLOX widths.
STRUCTURE = ["yolov8m", "yolov8x", "yolo11m", "yolo11l", "yolo26m", "yolo26x", "yolov10m", "yolov10b", "yolov10x",
             "yolov5m", "yolov5x", "yolox-tiny", "yolox-m", "yolox-x"]


@pytest.mark.parametrize("name", STRUCTURE)
def test_structure_matches_upstream(oracles, name):
    ours, theirs = _our_shapes(name, 7), _upstream_shapes(name, 7, oracles.torch())
    assert ours == theirs


def test_yolox_scales_are_the_upstream_exps(oracles):
    from yolox.exp import get_exp
    from yolox.models.network_blocks import DWConv

    t = oracles.torch()
    for size, (depth, width, depthwise) in yx.SCALES.items():
        exp = get_exp(exp_name=f"yolox-{size}")
        assert (exp.depth, exp.width) == (depth, width)
        with t.device("meta"):
            head = exp.get_model().head
        assert isinstance(head.cls_convs[0][0], DWConv) == depthwise


def test_interface(rng):
    """What the trainer reads: ``head_type``, ``strides``, ``nc``, ``head.reg_max`` /
    ``head.anchor_array``, ``decode``, BatchNorm train/eval switching."""
    expected = {
        "yolov8n": ("yolov8", lambda h: h.reg_max == 16),
        "yolo11n": ("yolov8", lambda h: h.reg_max == 16 and not h.legacy and not h.end2end),
        "yolo26n": ("e2e", lambda h: h.reg_max == 1 and not h.legacy and h.end2end),
        "yolov10n": ("e2e", lambda h: h.reg_max == 16 and not h.legacy and h.end2end),
        "yolov5n": ("yolov5", lambda h: np.array_equal(h.anchor_array, np.asarray(YOLOV5S_ANCHORS, np.float32).reshape(3, 3, 2))),
        "yolox-nano": ("yolox", lambda h: h.nc == 5),
    }
    for name, (head_type, check) in expected.items():
        m = nnx.eval_shape(lambda n=name: build_model(n, nc=5))
        assert (m.name, m.head_type, m.strides, m.nc) == (name, head_type, (8, 16, 32), 5)
        assert check(m.head)
        bns = [x for _, x in nnx.iter_graph(m) if type(x).__name__ == "BatchNorm"]
        assert bns and not any(b.use_running_average for b in bns)  # train mode, as a fresh torch module
        m.eval()
        assert all(b.use_running_average for b in bns)
        m.train()
        assert not any(b.use_running_average for b in bns)
    x = build_model("yolox-nano", nc=2)
    assert (x.bgr, x.pixel_scale) == (True, 255.0)
    with pytest.raises(ValueError, match="multiples of 32"):
        x(jnp.zeros((1, 48, 64, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        x(jnp.zeros((1, 64, 64, 1)))


def test_bf16_computation(rng):
    """``dtype=bfloat16``: float32 parameters and statistics, bf16 outputs close
    to the float32 model's; ``decode`` in float32."""
    m32 = build_model("yolo11n", nc=3)
    m16 = build_model("yolo11n", nc=3, dtype=jnp.bfloat16)
    m32.eval()
    m16.eval()
    assert {v.dtype for v in jax.tree.leaves(nnx.state(m16))} == {jnp.dtype(jnp.float32)}
    x = jnp.asarray(rng.random((1, 64, 96, 3), dtype=np.float32))
    outs = []
    for m in (m32, m16):
        g, s = nnx.split(m)
        outs.append(compiled(lambda st, im, g=g: nnx.merge(g, st)(im), s, x)(s, x))
    for a, b in zip(*outs):
        assert b.dtype == jnp.bfloat16 and a.dtype == jnp.float32
        assert float(jnp.abs(a - b.astype(jnp.float32)).max()) < 0.05 * float(jnp.abs(a).max())
    boxes, scores = m16.decode(outs[1])
    assert boxes.dtype == scores.dtype == jnp.float32 and boxes.shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 4)


def test_from_torch_errors_and_numpy_round_trip():
    model = build_model("yolov5n", nc=3, anchors=np.asarray(YOLOV5S_ANCHORS, np.float32).reshape(3, 3, 2) * 1.5)
    sd = to_torch_state_dict(model)  # numpy arrays: no torch needed
    back = from_torch(sd, name="yolov5n")
    assert back.nc == 3 and np.array_equal(back.head.anchor_array, model.head.anchor_array)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))

    with pytest.raises(ValueError, match="name is required"):
        from_torch(sd)
    with pytest.raises(ValueError, match="unknown model"):
        from_torch(sd, name="yolov6n")
    with pytest.raises(ValueError, match="nc=4 but the checkpoint's yolov5n predicts 3 classes"):
        from_torch(sd, name="yolov5n", nc=4)
    bad = dict(sd)
    del bad["model.0.conv.weight"]
    bad["model.99.foo"] = np.zeros(1)
    bad["model.1.bn.weight"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"does not match yolov5n: missing: model\.0\.conv\.weight; unexpected: model\.99\.foo; "
                                         r"wrong shape: model\.1\.bn\.weight \(5,\) \(expected \(32,\)\)"):
        from_torch(bad, name="yolov5n")
    with pytest.raises(ValueError, match=r"wrong shape: model\.0\.bn\.bias \(16,\) \(expected \(32,\)\), model\.0\.bn\.running_mean"):
        from_torch(sd, name="yolov5s")  # a yolov5n state_dict is not a yolov5s
    v8 = to_torch_state_dict(build_model("yolov8n", nc=2))
    v8["model.22.dfl.conv.weight"] = v8["model.22.dfl.conv.weight"] * 2
    with pytest.raises(ValueError, match=r"model\.22\.dfl\.conv\.weight \(expected the constant"):
        from_torch(v8, name="yolov8n")


def test_save_load_weights(tmp_path):
    model = build_model("yolov5n", nc=3, seed=1, anchors=np.asarray(YOLOV5S_ANCHORS, np.float32).reshape(3, 3, 2) + 2)
    save_weights(model, tmp_path / "w", names=["a", "b", "c"])
    meta = json.loads((tmp_path / "w" / "model.json").read_text())
    assert {k: meta[k] for k in ("format", "name", "nc", "family", "head_type", "names")} == {
        "format": "jaxyolo-weights/1", "name": "yolov5n", "nc": 3, "family": "yolov5", "head_type": "yolov5", "names": ["a", "b", "c"]
    }
    back = load_weights(tmp_path / "w")
    assert (back.name, back.nc, back.class_names) == ("yolov5n", 3, ("a", "b", "c"))
    np.testing.assert_array_equal(back.head.anchor_array, model.head.anchor_array)
    a, b = to_torch_state_dict(model), to_torch_state_dict(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="nc=4 but"):
        load_weights(tmp_path / "w", nc=4)
    with pytest.raises(ValueError, match="names has 2 entries but the model has nc=3"):
        save_weights(model, tmp_path / "w2", names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="no model.json"):
        load_weights(tmp_path)


def test_checkpoint_files(oracles, tmp_path):
    """The three upstream file formats, written the way upstream writes them (fp16 pickled models)."""
    from jaxyolo.models import upstream

    t = oracles.torch()
    up = upstream_model("yolov8n", 3)
    up.names = {0: "cat", 1: "dog", 2: "bird"}
    t.save({"model": copy.deepcopy(up).half(), "ema": None, "train_args": {}}, tmp_path / "v8.pt")
    m = from_torch(tmp_path / "v8.pt")
    assert (m.name, m.nc, m.class_names) == ("yolov8n", 3, ("cat", "dog", "bird"))
    half = {k: v.half().float().numpy() for k, v in up.state_dict().items() if v.is_floating_point()}
    ours = to_torch_state_dict(m)
    assert all(np.array_equal(ours[k], v) for k, v in half.items() if k in ours)
    with pytest.raises(ValueError, match="name='yolo11n' but the checkpoint is a yolov8n"):
        from_torch(tmp_path / "v8.pt", name="yolo11n")

    up5 = upstream_model("yolov5s", 2)
    t.save({"model": None, "ema": copy.deepcopy(up5).half()}, tmp_path / "v5.pt")
    m5 = load_weights(tmp_path / "v5.pt")  # a checkpoint file goes through from_torch
    assert (m5.name, m5.nc, m5.class_names) == ("yolov5s", 2, ("0", "1"))
    np.testing.assert_array_equal(m5.head.anchor_array, np.asarray(YOLOV5S_ANCHORS, np.float32).reshape(3, 3, 2))

    upx = upstream_model("yolox-nano", 4)
    t.save({"model": upx.state_dict()}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="name is required"):
        from_torch(tmp_path / "x.pth")
    mx = from_torch(tmp_path / "x.pth", name="yolox-nano")
    assert mx.nc == 4 and mx.class_names is None
    ours = to_torch_state_dict(mx)
    assert all(np.array_equal(ours[k], v.numpy()) for k, v in upx.state_dict().items() if v.is_floating_point())

    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        from_torch(tmp_path / "missing.pt", name="yolov8n")
    t.save({"optimizer": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not an upstream checkpoint"):
        from_torch(tmp_path / "junk.pt", name="yolov8n")
    # original-repo yolov5 pickles name their classes models.* / utils.*
    from yolov5.models.yolo import DetectionModel

    assert upstream._Unpickler(io.BytesIO(b"")).find_class("models.yolo", "DetectionModel") is DetectionModel


@pytest.mark.parametrize("name", ["yolo26n", "yolov10n"])
def test_end_to_end_branches_start_as_copies(name):
    """Upstream deep-copies ``cv2``/``cv3`` into ``one2one_cv2``/``one2one_cv3``
    before the bias init: equal values at init, separate parameters."""
    head = build_model(name, nc=3).head
    for a, b in (("cv2", "one2one_cv2"), ("cv3", "one2one_cv3")):
        sa, sb = nnx.to_flat_state(nnx.state(getattr(head, a))), nnx.to_flat_state(nnx.state(getattr(head, b)))
        assert [p for p, _ in sa] == [p for p, _ in sb] and len(sa) > 10
        for (p, va), (_, vb) in zip(sa, sb):
            np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]), err_msg=str(p))
    head.one2one_cv2[0][0].conv.kernel[...] += 1.0
    assert not np.array_equal(np.asarray(head.cv2[0][0].conv.kernel[...]), np.asarray(head.one2one_cv2[0][0].conv.kernel[...]))
