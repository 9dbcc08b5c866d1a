"""The CLI end to end with a tiny config, and its error messages."""

import json

import pytest

from jaxyolo.cli import build_parser, main

TINY = ["--epochs", "1", "--img-size", "64", "--batch", "4", "--train-size", "16", "--val-size", "8", "--no-progress"]


@pytest.mark.slow
def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "val mAP@0.5 = " in printed and "mAP@0.5:0.95 = " in printed
    for f in ("metrics.csv", "steps.csv", "results.png", "config.json", "final.json"):
        assert (out / f).is_file(), f
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["map50"] <= 1.0 and final["steps"] == 4
    header, row = (out / "metrics.csv").read_text().splitlines()
    assert header.startswith("epoch,step,loss,box,cls,dfl,lr,map50,map50_95")
    assert row.startswith("1,4,")
    assert (out / "checkpoints" / "4").is_dir()

    assert main(["eval", "--checkpoint", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"val mAP@0.5 = {final['map50']:.4f}" in printed  # eval reproduces the training's final numbers

    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", *TINY, "--out", str(out)])


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"dataset path .*nowhere does not exist"):
        main(["train", *TINY, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="multiple of 32"):
        main(["train", "--img-size", "100", "--out", str(tmp_path / "r2")])
    with pytest.raises(SystemExit, match="no checkpoints"):
        main(["eval", "--checkpoint", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["train", "--loss", "yolov7"])


def test_parser_defaults():
    args = build_parser().parse_args(["train"])
    assert (args.loss, args.data, args.resume) == ("yolov8", "embedded", False)
