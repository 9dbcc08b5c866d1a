"""``jaxyolo convert`` and ``jaxyolo compare`` through ``jaxyolo.cli.main``."""

import copy
import re
import shutil

import numpy as np
import pytest
import _margins
from _arch_cases import random_rows, upstream_model

from jaxyolo.cli import main
from jaxyolo.models import from_torch, load_weights, to_torch_state_dict


@pytest.fixture(scope="module")
def checkpoints(oracles, tmp_path_factory):
    """Upstream-format checkpoint files of randomly initialised upstream models."""
    t = oracles.torch()
    d = tmp_path_factory.mktemp("ckpt")
    v8 = upstream_model("yolov8n", 3)
    v8.names = {0: "a", 1: "b", 2: "c"}
    t.save({"model": copy.deepcopy(v8).half(), "ema": None, "train_args": {}}, d / "yolov8n.pt")
    t.save({"model": copy.deepcopy(upstream_model("yolov5n", 2)).half()}, d / "yolov5n.pt")
    t.save({"model": upstream_model("yolox-nano", 3).state_dict()}, d / "yolox_nano.pth")
    t.save({"model": copy.deepcopy(upstream_model("yolo26n", 5)).half(), "ema": None, "train_args": {}}, d / "yolo26n.pt")
    return d


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A tiny YOLO dataset: ``images/`` (3 PNGs of different sizes) and ``labels/``.

    Seed 5: ``test_compare_labelled``'s cases have room on every assignment
    choice (smallest gap / float32 error: TAL top-k 1.7e-2 / 1.1e-6, SimOTA
    cost 6.4e-2 / 3.2e-7).  Seed 7 had two YOLOX costs 4.2e-7 apart (relative,
    error 2.4e-7): at 64 px SimOTA also picks anchors outside the centre
    region, whose costs carry the 1e5 penalty and so are rounded to 1/128."""
    from PIL import Image

    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rows = random_rows(rng, batch=3, nc=2, per_image=2)
    for i, (h, w) in enumerate([(50, 70), (64, 64), (90, 60)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        lines = [" ".join(f"{v:.6f}" if j else str(int(v)) for j, v in enumerate(r[1:])) for r in rows if r[0] == i]
        (root / "labels" / f"{i}.txt").write_text("\n".join(lines) + "\n")
    return root


GRID = 8  # stride-8 cells per side at 64 px


def _grid_labels() -> str:
    """YOLO label lines of the boxes ``grid``'s model predicts at 64 px: one
    per stride-8 cell, class 0, centred on the cell, 16 px wide and high,
    clipped to the 64 x 64 image; normalised."""
    lines = []
    for cy in (np.arange(GRID) + 0.5) * 8:
        for cx in (np.arange(GRID) + 0.5) * 8:
            x0, y0, x1, y1 = (np.clip([cx - 8, cy - 8, cx + 8, cy + 8], 0, 64) / 64).tolist()
            lines.append(f"0 {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def grid(oracles, tmp_path_factory):
    """``(pt, root)``: an ultralytics yolov8n ``.pt`` (classes a, b, c) whose
    head ignores the image, and a dataset labelled with what it predicts.

    The model: every stride-8 cell predicts class ``a`` at score 0.5 with a
    box one stride (8 px) from the cell's centre on each side; all else
    scores sigmoid(-20), under the eval threshold 0.001.  ``root/data.yaml``
    (names a, b, c): 2 val images of 64 x 64 labelled with exactly those boxes
    at 64 px (:func:`_grid_labels`), so evaluated at 64 px the model finds
    every box (mAP 1), at 128 px its 16 px boxes cover a quarter of each
    label (IoU 0.25: mAP 0).  ``root/wide.yaml``: one 64 x 32 (w x h) image."""
    from PIL import Image

    t = oracles.torch()
    m = upstream_model("yolov8n", 3)
    m.names = {0: "a", 1: "b", 2: "c"}
    head = m.model[-1]
    with t.no_grad():
        for level, (box, cls) in enumerate(zip(head.cv2, head.cv3)):
            box[2].weight.zero_()
            cls[2].weight.zero_()
            box[2].bias.copy_(t.tensor([20.0 if b == 1 else 0.0 for b in range(head.reg_max)] * 4))  # DFL: 1 stride per side
            cls[2].bias.fill_(-20.0)
            if level == 0:
                cls[2].bias[0] = 0.0
    root = tmp_path_factory.mktemp("grid")
    t.save({"model": m.half(), "ema": None, "train_args": {}}, root / "grid.pt")
    rng = np.random.default_rng(0)
    for split, shapes in (("val", [(64, 64), (64, 64)]), ("wide", [(32, 64)])):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, hw in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text(_grid_labels() if split == "val" else "0 0.5 0.5 0.5 0.5\n")
        (root / f"{'data' if split == 'val' else split}.yaml").write_text(f"path: {root}\ntrain: images/{split}\nval: images/{split}\nnames: [a, b, c]\n")
    return root / "grid.pt", root


def _record_eval(monkeypatch, *, run: bool):
    """``seen``: per evaluation, ``(images.shape, content_rects)`` of the val
    data the model is given (the frames and where each image lies in them).
    ``run=False`` skips the model (mAP 0): no compile."""
    from jaxyolo.train import loop

    seen, real = [], loop.evaluate_model

    def spy(predict, params, stats, data, **kw):
        seen.append((data.images.shape, data.content_rects.tolist()))
        if run:
            return real(predict, params, stats, data, **kw)
        zero = {"map50": 0.0, "map50_95": 0.0, "precision": 0.0, "recall": 0.0, "coco_map50": 0.0, "coco_map50_95": 0.0}
        return {**zero, "images": len(data.labels), "instances": 0, "per_class": [], "nms_overflow": 0}

    monkeypatch.setattr(loop, "evaluate_model", spy)
    return seen


def test_eval_converted_weights_at_img_size(grid, capsys, monkeypatch):
    """``eval --checkpoint X.pt --data data.yaml [--img-size S]``: the val
    images letterboxed to S, the model run at S, the size printed; 640 by default."""
    pt, root = grid
    seen = _record_eval(monkeypatch, run=True)
    # Square frames: at 64 px every box found (yolo val's perfect AP is 0.995, pycocotools' 1.0);
    # at 128 px none.  (With yolo val's rectangular batches, the default, the 64 px images sit in
    # 96 x 96 frames whose grey border gets boxes too: tests/test_yolo_val.py checks that framing.)
    for size, map50, coco in ((64, "0.9950", "1.0000"), (128, "0.0000", "0.0000")):
        assert main(["eval", "--checkpoint", str(pt), "--data", str(root / "data.yaml"), "--img-size", str(size), "--no-rect"]) == 0
        out = capsys.readouterr().out
        assert f"{pt} (converted weights, {size} px): val mAP50 {map50}" in out and f"(yolo val)   COCO mAP@0.5 {coco}" in out
        assert seen[-1] == ((2, size, size, 3), [[0, 0, size, size]] * 2)
    seen = _record_eval(monkeypatch, run=False)
    assert main(["eval", "--checkpoint", str(pt), "--data", str(root / "wide.yaml")]) == 0  # upstream's default size
    assert f"{pt} (converted weights, 640 px): val mAP50 0.0000" in capsys.readouterr().out
    assert seen[-1] == ((1, 640, 640, 3), [[160, 0, 320, 640]])  # the 64 x 32 image scaled by 10, centred


def test_eval_converted_weights_class_names(grid, tmp_path, capsys, monkeypatch):
    """The weights' class names must be the dataset's (count and order);
    weights without names need only the same count."""
    from jaxyolo.models import save_weights

    pt, root = grid
    seen = _record_eval(monkeypatch, run=False)
    text = (root / "data.yaml").read_text()

    def data(names: str):
        f = tmp_path / f"{len(list(tmp_path.glob('*.yaml')))}.yaml"
        f.write_text(text.replace("names: [a, b, c]", f"names: [{names}]"))
        return str(f)

    with pytest.raises(SystemExit, match=r"^error: the checkpoint's 3 classes differ from the dataset's: class 1 is 'b' in the checkpoint, 'x' in the dataset$"):
        main(["eval", "--checkpoint", str(pt), "--data", data("a, x, c")])
    with pytest.raises(SystemExit, match=r"^error: the checkpoint's 3 classes \('a', 'b', 'c'\) differ from the dataset's 2 \('a', 'b'\)$"):
        main(["eval", "--checkpoint", str(pt), "--data", data("a, b")])
    assert seen == []  # refused before evaluating
    model = load_weights(pt)
    model.class_names = None
    nameless = save_weights(model, tmp_path / "nameless")
    assert main(["eval", "--checkpoint", str(nameless), "--data", data("x, y, z")]) == 0
    assert f"{nameless} (converted weights, 640 px): val mAP50 " in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: the checkpoint's 3 classes \('0', '1', '2'\) differ from the dataset's 2"):
        main(["eval", "--checkpoint", str(nameless), "--data", data("x, y")])


def test_convert(checkpoints, tmp_path, capsys):
    assert main(["convert", str(checkpoints / "yolov8n.pt"), "--out", str(tmp_path / "w")]) == 0
    assert "(yolov8n, nc=3, classes a, b, c)" in capsys.readouterr().out
    model = load_weights(tmp_path / "w")
    direct = from_torch(checkpoints / "yolov8n.pt")
    assert (model.name, model.nc, model.class_names) == ("yolov8n", 3, ("a", "b", "c"))
    a, b = to_torch_state_dict(model), to_torch_state_dict(direct)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    with pytest.raises(SystemExit, match="name is required"):
        main(["convert", str(checkpoints / "yolox_nano.pth"), "--out", str(tmp_path / "x")])
    assert main(["convert", str(checkpoints / "yolox_nano.pth"), "--name", "yolox-nano", "--out", str(tmp_path / "x")]) == 0
    assert load_weights(tmp_path / "x").nc == 3
    with pytest.raises(SystemExit, match="no checkpoint file"):
        main(["convert", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "y")])


def _levels(out: str):
    """``[(max_abs, max_ref, rel)]`` parsed from the level table."""
    return [tuple(map(float, m.groups())) for m in re.finditer(r"^\s+\d+\s+\d+\s+\S+\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)]


def test_compare_random_images(checkpoints, capsys):
    assert main(["compare", "--weights", str(checkpoints / "yolov5n.pt"), "--img-size", "64", "--tol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "yolov5n (yolov5, nc=2), 2 random images, 64x64, eval mode" in out
    levels = _levels(out)
    assert len(levels) == 3 and all(0 <= rel <= 1e-4 and ref > 0 for _, ref, rel in levels)
    assert "loss" not in out


def test_compare_end_to_end(checkpoints, capsys):
    """An end-to-end model (the name read from the .pt): both branches, each level within 1e-4."""
    assert main(["compare", "--weights", str(checkpoints / "yolo26n.pt"), "--img-size", "64", "--tol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "yolo26n (ultralytics, nc=5), 2 random images, 64x64, eval mode" in out
    rows = re.findall(r"^\s*(one2many|one2one)\s+\d+\s+\d+\s+\S+\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)
    assert [r[0] for r in rows] == ["one2many"] * 3 + ["one2one"] * 3
    assert all(float(ref) > 0 and 0 <= float(rel) <= 1e-4 for _, _, ref, rel in rows), rows


def _assert_no_near_tie(weights, images, *, name):
    """The case compared below has no assignment decided by float32 rounding
    (issue 25, ``_margins``): the upstream model's eval-mode outputs and its own
    loss, as ``compare`` runs them, replayed in float64."""
    from jaxyolo import compare
    from jaxyolo.models import upstream
    from jaxyolo.models.registry import get_spec
    from jaxyolo.targets import Targets

    t = upstream.torch()
    module, name = upstream.load_module(weights, name=name)
    family = get_spec(name).family
    x, rows, _ = compare.read_images(images, img_size=64)
    targets = Targets.from_rows(rows, batch_size=len(x), max_boxes=int(np.bincount(rows[:, 0].astype(int)).max()))

    def run(m, dtype):
        m.eval()
        xt = upstream.torch_images(x, family).to(dtype)
        with t.no_grad():
            raw = upstream.raw_outputs(m, family, xt)
        compare._upstream_loss(m, family, xt, raw, rows, targets, x.shape[1:3])

    replay = _margins.replay(module, run, pools=False)
    replay.check()
    return replay


@pytest.mark.parametrize("ckpt,extra", [("yolov8n.pt", []), ("yolov5n.pt", []), ("yolox_nano.pth", ["--name", "yolox-nano"])])
def test_compare_labelled(checkpoints, labelled, capsys, ckpt, extra):
    _assert_no_near_tie(checkpoints / ckpt, labelled / "images", name=extra[-1] if extra else None)
    argv = ["compare", "--weights", str(checkpoints / ckpt), *extra, "--images", str(labelled / "images"), "--img-size", "64"]
    assert main([*argv, "--tol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert f"3 images from {labelled / 'images'}, 64x64" in out
    assert len(_levels(out)) == 3
    m = re.search(r"loss \(6 boxes\): jaxyolo (\S+)  upstream (\S+)  rel (\S+)", out)
    assert m and float(m.group(1)) > 0 and float(m.group(3)) <= 1e-4
    parts = re.findall(r"^\s+(\w+): jaxyolo (\S+)  upstream (\S+)$", out, re.M)
    assert [p[0] for p in parts] == {"yolov8n.pt": ["box", "cls", "dfl"], "yolov5n.pt": ["box", "obj", "cls"],
                                     "yolox_nano.pth": ["iou", "conf", "cls", "l1"]}[ckpt]
    for _, ours, theirs in parts:
        np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-4, atol=1e-6)


def test_compare_errors(checkpoints, labelled, tmp_path):
    with pytest.raises(SystemExit, match="name is required"):
        main(["compare", "--weights", str(checkpoints / "yolox_nano.pth")])
    with pytest.raises(SystemExit, match="--labels needs --images"):
        main(["compare", "--weights", str(checkpoints / "yolov5n.pt"), "--labels", str(labelled / "labels")])
    with pytest.raises(SystemExit, match="no images"):
        main(["compare", "--weights", str(checkpoints / "yolov5n.pt"), "--images", str(labelled / "labels")])
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    shutil.copy(labelled / "images" / "0.png", tmp_path / "images" / "0.png")
    (tmp_path / "labels" / "0.txt").write_text("1 0.5 0.5 0.2 0.2\n0 0.5 oops 0.1\n")
    with pytest.raises(SystemExit, match=r"0\.txt:2: expected 'class cx cy w h', got '0 0\.5 oops 0\.1'"):
        main(["compare", "--weights", str(checkpoints / "yolov5n.pt"), "--images", str(tmp_path / "images"), "--img-size", "64"])


@pytest.mark.slow
def test_convert_train_eval_predict_end_to_end(checkpoints, tmp_path, capsys):
    """An upstream checkpoint -> `convert` -> `train --weights` (a few steps on
    a user's data.yaml) -> `eval` -> `predict`; and the converted weights
    evaluated and run directly."""
    import json

    from _datasets import make_yaml_dataset

    yaml3, _ = make_yaml_dataset(tmp_path / "d3", n_train=8, n_val=3, names=("a", "b", "c"))
    w = tmp_path / "w"
    assert main(["convert", str(checkpoints / "yolov8n.pt"), "--out", str(w)]) == 0
    tiny = ["--img-size", "64", "--batch", "4", "--epochs", "1", "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", "--weights", str(w), "--data", str(yaml3), *tiny, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["model"], cfg["loss"]) == ("yolov8n", "yolov8")  # the architecture and loss follow the weights
    from flax import nnx

    n_tensors = len(nnx.to_flat_state(nnx.state(load_weights(w))))  # parameters + BatchNorm statistics
    assert f"weights: {n_tensors}/{n_tensors} tensors from {w}" in out
    assert "val mAP50 " in out
    assert main(["eval", "--checkpoint", str(run)]) == 0
    assert "val mAP50 " in capsys.readouterr().out
    img = next((tmp_path / "d3" / "images" / "val").iterdir())
    assert main(["predict", str(img), "--checkpoint", str(run), "--out", str(tmp_path / "p"), "--conf", "0.001", "--save-txt"]) == 0
    assert (tmp_path / "p" / img.name).is_file() and (tmp_path / "p" / "labels" / f"{img.stem}.txt").is_file()
    # The converted weights themselves: evaluated on a dataset, run on an image.
    assert main(["eval", "--checkpoint", str(w), "--data", str(yaml3)]) == 0
    assert f"{w} (converted weights, 640 px): val mAP50 " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="converted weights, not a run"):
        main(["eval", "--checkpoint", str(w)])
    assert main(["predict", str(img), "--checkpoint", str(w), "--out", str(tmp_path / "pw"), "--img-size", "64"]) == 0
    # Fine-tuning on other classes: everything but the class predictions is loaded.
    # (The model the trainer builds; training it is the same step as above.)
    from jaxyolo.train import TrainConfig
    from jaxyolo.train.step import build_train_model

    said = []
    build_train_model(TrainConfig(model="yolov8n", weights=str(checkpoints / "yolov8n.pt")), nc=2, log=said.append)
    line = next(ln for ln in said if ln.startswith("weights: "))
    copied, total = map(int, re.search(r"(\d+)/(\d+) tensors", line).groups())
    assert total == n_tensors and total - copied == 6 and "(3 classes -> 2)" in line  # cv3.{0,1,2}.2 weight + bias
    with pytest.raises(SystemExit, match="error: .*holds a yolov8n, not the model='yolov8s'"):
        main(["train", "--model", "yolov8s", "--weights", str(w), "--data", str(yaml3), *tiny, "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="error: loss='yolox' does not fit model='yolov8n'"):
        main(["train", "--model", "yolov8n", "--loss", "yolox", *tiny, "--out", str(tmp_path / "bad")])
