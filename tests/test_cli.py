"""The CLI end to end with a tiny config, and its error messages."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxyolo.cli import build_parser, main

TINY = ["--epochs", "1", "--img-size", "64", "--batch", "4", "--train-size", "16", "--val-size", "8", "--no-progress"]


@pytest.mark.slow
def test_train_then_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", "run"]) == 0  # relative: the messages name the absolute folder
    captured = capsys.readouterr()
    printed = captured.out
    assert "val mAP50 " in printed and "mAP50-95 " in printed and "(yolo val)   COCO mAP@0.5 " in printed
    assert printed.startswith(f"jaxyolo train: {out}  (model=pico, ")
    tb = ", tb/" if (out / "tb").is_dir() else ""  # with tensorboardX installed
    assert printed.splitlines()[-1] == f"run folder: {out}  (checkpoints/, config.json, final.json, metrics.csv, results.png, steps.csv{tb})"
    assert not (out / ".lock").exists()
    # --no-progress: the compile line, but no bar and no per-log-point lines.
    assert "compiling the train step..." in printed
    assert "it/s" not in captured.err and "step " not in captured.err
    for f in ("metrics.csv", "steps.csv", "results.png", "config.json", "final.json"):
        assert (out / f).is_file(), f
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["map50"] <= 1.0 and final["steps"] == 4
    header, row = (out / "metrics.csv").read_text().splitlines()
    assert header == "epoch,step,loss,box,cls,dfl,lr,grad_norm,boxes_cut,map50,map50_95,precision,recall,coco_map50,coco_map50_95,epoch_s"
    assert row.startswith("1,4,")
    assert (out / "checkpoints" / "4").is_dir()

    assert main(["eval", "--checkpoint", str(out), "--no-rect"]) == 0  # square frames, as the trainer evaluates
    printed = capsys.readouterr().out
    assert f"{out} (step 4, 64 px): val mAP50 {final['map50']:.4f}" in printed  # eval reproduces the training's final numbers
    table = printed.splitlines()
    head = table.index(next(x for x in table if x.split()[:3] == ["Class", "Images", "Instances"]))
    assert table[head + 1].split()[:3] == ["all", "8", str(final["instances"])]  # yolo val's table: all, then each class
    assert final["coco_map50"] is not None and final["per_class"] and len(table[head + 2].split()) == 7
    assert main(["eval", "--checkpoint", str(out), "--img-size", "128"]) == 0  # the val images letterboxed to 128 px
    assert f"{out} (step 4, 128 px): val mAP50 " in capsys.readouterr().out

    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", *TINY, "--out", str(out)])


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"dataset path .*nowhere does not exist"):
        main(["train", *TINY, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="multiple of 32"):
        main(["train", "--img-size", "100", "--out", str(tmp_path / "r2")])
    with pytest.raises(SystemExit, match="no checkpoints"):
        main(["eval", "--checkpoint", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^error: .*bst\.pt does not exist \(a run folder, or converted weights"):
        main(["eval", "--checkpoint", str(tmp_path / "bst.pt"), "--data", "embedded"])  # a typo
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "im.png")
    for bad in ("100", "0", "-64"):  # eval and predict: one check, before anything loads
        for argv in (["eval", "--checkpoint", str(tmp_path)], ["predict", str(tmp_path / "im.png"), "--checkpoint", str(tmp_path)]):
            with pytest.raises(SystemExit, match=rf"^error: --img-size must be a positive multiple of 32, got {bad}$"):
                main([*argv, "--img-size", bad])
    with pytest.raises(SystemExit):
        main(["train", "--loss", "yolov7"])


def test_parser_defaults_and_help(capsys):
    args = build_parser().parse_args(["train"])
    assert (args.model, args.loss, args.data, args.resume) == (None, None, "embedded", False)  # pico + yolov8 loss (TrainConfig)
    for cmd in ("train", "eval", "predict"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        # Every option says its default once (none twice, none contradicting).
        for block in text.split("\n  -")[1:]:
            assert block.count("default") <= 1, block
        if cmd == "train":
            assert "(default: 0.5)" in text and "(default: runs/<loss>" in text



def test_optimizer_choices_are_the_configs(capsys):
    """``--optimizer`` offers TrainConfig's optimizers (musgd included) and no other."""
    from jaxyolo.train.config import OPTIMIZERS

    assert "musgd" in OPTIMIZERS
    for name in OPTIMIZERS:
        assert build_parser().parse_args(["train", "--optimizer", name]).optimizer == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--optimizer", "muon"])
    assert re.search(r"invalid choice: 'muon' \(choose from '?sgd'?, '?adamw'?, '?musgd'?, '?auto'?\)", capsys.readouterr().err)


# ------------------------------------------------ users' own datasets


def _tiny(out):
    return ["--epochs", "1", "--img-size", "64", "--batch", "4", "--no-progress", "--out", str(out)]


@pytest.mark.slow
def test_train_eval_predict_on_each_layout(tmp_path, capsys):
    """data.yaml, a COCO folder, a COCO .json + --images and a plain folder
    (mixed JPEG/PNG/BMP/WebP/grayscale sizes, a background image, a crowd
    box, non-contiguous category ids) train, evaluate and predict unchanged."""
    from _datasets import make_coco_dataset, make_plain_dataset, make_yaml_dataset

    yaml_path, _ = make_yaml_dataset(tmp_path / "yolo", n_train=8, n_val=3)
    plain, _ = make_plain_dataset(tmp_path / "plain", n_train=8, n_val=3)
    coco = tmp_path / "coco"
    make_coco_dataset(coco, n=9, split="train2017", seed=1)
    val_json, (_, _, coco_names) = make_coco_dataset(coco, n=4, split="val2017", seed=2)
    # Each layout with another way in for its images (auto picks ram for these few).
    layouts = {
        "yaml": ["--data", str(yaml_path)],
        "coco": ["--data", str(coco), "--cache", "none", "--workers", "2"],
        "coco-json": ["--data", str(val_json), "--images", str(coco / "val2017"), "--cache", "disk", "--cache-dir", str(tmp_path / "cache")],
        "plain": ["--data", str(plain), "--workers", "0"],
    }
    said = {"yaml": "cache=ram (auto: 0.00 GB decoded fits 50% of", "coco": "cache=none, 2 decode workers",
            "coco-json": f"cache=disk ({tmp_path / 'cache'}, decoded up front)", "plain": "cache=ram (auto: "}
    for name, data in layouts.items():
        out = tmp_path / f"run-{name}"
        assert main(["train", *data, *_tiny(out)]) == 0, name
        printed = capsys.readouterr().out
        assert printed.splitlines()[0].startswith(f"jaxyolo train: {out}") and f"  data: {said[name]}" in printed.splitlines()[0], printed[:400]
        assert "val mAP50 " in printed and f"run folder: {out}" in printed, name
        final = json.loads((out / "final.json").read_text())
        assert final["steps"] >= 1 and 0.0 <= final["map50"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train-64.meta.npz", "train-64.npy", "val-64.meta.npz", "val-64.npy"]
    meta_names = json.loads((tmp_path / "run-coco" / "config.json").read_text())
    assert meta_names["data"] == str(coco)
    # eval on another dataset's val split (same classes: the COCO json).
    assert main(["eval", "--checkpoint", str(tmp_path / "run-coco"), "--data", str(val_json), "--images", str(coco / "val2017")]) == 0
    assert "val mAP50 " in capsys.readouterr().out
    # ...and one with other classes is refused.
    with pytest.raises(SystemExit, match="error: the checkpoint's 3 classes .*differ"):
        main(["eval", "--checkpoint", str(tmp_path / "run-coco"), "--data", str(yaml_path)])
    # predict on the real photos that ship with ultralytics, with txt files.
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    pred = tmp_path / "pred"
    assert main(["predict", str(assets), "--checkpoint", str(tmp_path / "run-coco"), "--out", str(pred), "--conf", "0.001", "--save-txt"]) == 0
    assert f"-> {pred}" in capsys.readouterr().out
    from PIL import Image

    for photo in ("bus.jpg", "zidane.jpg"):
        with Image.open(assets / photo) as src, Image.open(pred / photo) as drawn:
            assert drawn.size == src.size
        lines = (pred / "labels" / photo.replace(".jpg", ".txt")).read_text().splitlines()
        assert 1 <= len(lines) <= 300
        rows = np.array([[float(v) for v in ln.split()] for ln in lines])
        assert rows.shape[1] == 6 and set(rows[:, 0].astype(int)) <= {0, 1, 2}
        assert np.all((rows[:, 1:5] >= 0) & (rows[:, 1:5] <= 1)) and np.all(rows[:, 5] >= 0.001)
        assert np.all(np.diff(rows[:, 5]) <= 0)  # by descending score, as upstream


def test_user_errors_are_one_line_and_write_nothing(tmp_path):
    from _datasets import make_yaml_dataset

    yaml_path, _ = make_yaml_dataset(tmp_path / "yolo", n_train=3, n_val=2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: the training set has 4 images, fewer than batch=16"):
        main(["train", "--data", str(yaml_path), "--out", str(out), "--no-progress"])
    with pytest.raises(SystemExit, match=r"^error: .*nc"):
        main(["train", "--data", str(yaml_path), "--nc", "5", "--out", str(out), "--no-progress"])
    bad = tmp_path / "yolo" / "nosplit.yaml"
    bad.write_text(yaml_path.read_text().replace("val: val.txt", "val: missing/"))
    with pytest.raises(SystemExit, match=r"^error: .*missing"):
        main(["train", "--data", str(bad), "--batch", "2", "--out", str(out), "--no-progress"])
    assert not out.exists()  # nothing written before the inputs validated
    with pytest.raises(SystemExit, match=r"^error: .*does not exist"):
        main(["predict", str(tmp_path / "none.jpg"), "--checkpoint", str(tmp_path)])


@pytest.mark.slow
def test_train_recipe_ultralytics(tmp_path, capsys):
    """``--recipe ultralytics`` end to end on the embedded set: 2 epochs of 4
    batches, optimizer auto (AdamW, lr0 round(0.002 * 5 / (4 + 6), 6) = 1e-3),
    warmup over epoch 1 (nw = round(min(3, 2 - 1) * 4) = 4), accumulation
    round(64 / 4) = 16 capped at the run's 8 batches, mosaic closed (close_mosaic 10)."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--eval-every", "1", "--recipe", "ultralytics", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"jaxyolo train: {out}  (model=pico, recipe=ultralytics, loss=yolov8, ") and "optimizer=auto" in printed
    assert "val mAP50 " in printed
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["recipe"], cfg["optimizer"], cfg["lr0"], cfg["close_mosaic"], cfg["warmup_epochs"], cfg["ema_tau"]) == ("ultralytics", "auto", 0.01, 10, 3.0, 2000.0)
    final = json.loads((out / "final.json").read_text())
    assert final["steps"] == 8 and 0.0 <= final["map50"] <= 1.0
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lr = [float(r.split(",")[header.index("lr")]) for r in rows[1:]]
    # both epochs evaluated; pycocotools' mAP at the last one only (the console line too)
    cells = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert [c["map50"] != "" for c in cells] == [True, True] and [c["coco_map50"] != "" for c in cells] == [False, True]
    assert float(cells[1]["coco_map50"]) == final["coco_map50"]
    from jaxyolo.train.loop import map_line

    assert map_line({"map50": 0.5, "map50_95": 0.25, "coco_map50": None}) == "mAP50 0.5000  mAP50-95 0.2500 (yolo val)"
    assert map_line(final).endswith(f"COCO mAP@0.5 {final['coco_map50']:.4f}  mAP@0.5:0.95 {final['coco_map50_95']:.4f}")
    # epoch 1: the warmup 0 -> lr0 * lf(0) over its 4 batches (mean 1e-3 * (0 + 1/4 + 2/4 + 3/4) / 4);
    # epoch 2: the LambdaLR's lr0 * lf(1) = 1e-3 * (0.5 * 0.99 + 0.01)
    np.testing.assert_allclose(lr, [1e-3 * 1.5 / 4, 1e-3 * 0.505], rtol=1e-5)
    # the recipe's fields can still be given
    with pytest.raises(SystemExit, match="optimizer='auto' is ultralytics' rule"):
        main(["train", *TINY, "--optimizer", "auto", "--out", str(tmp_path / "r2")])
