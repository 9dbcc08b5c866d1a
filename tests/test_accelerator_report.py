"""experiments/accelerator_report.py: its plan, its goal verdicts and its tables,
on synthetic records (the parts themselves are the benchmarks, not run here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("accelerator_report", EXPERIMENTS / "accelerator_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["accelerator_report"] = module
    spec.loader.exec_module(module)
    return module


def loss_rows(ms=2.0, ratio=12.0, device="cuda", batches=(16, 64)):
    return [dict(family=f, batch=b, jax_ms=ms, torch_ms=ms * ratio, ratio=ratio, compile_s=1.0, floor_ms=0.2,
                 paths={"accelerator path": ms, "cpu path": 3 * ms}, torch_device=device)
            for b in batches for f in ("yolov5", "yolox", "yolov8", "yolov9")]


def train_row(efficiency, stream=False):
    return dict(model="yolov8n", img_size=640, batch=64, train_size=2000 if stream else 512, stream=stream,
                workers=8 if stream else None, warmup=50, steps=100, step_ms=50.0, loop_ms=50.0 / efficiency,
                pipeline_batches_per_s=30.0, efficiency=efficiency)


def record(name, data, status="ok", seconds=30.0, reason=None):
    return dict(name=name, what=name, status=status, reason=reason, seconds=seconds, cap_s=100.0, commands=[],
                tail=[], data=data)


def records(main_s=35.0, efficiency=0.97, **losses):
    header = dict(jax_backend="gpu", auto_path="accelerator path", torch_device="cuda", img=640, nc=80, max_gt=32, repeats=10)
    final = dict(map50=0.85, map50_95=0.65, steps=2244, seconds=main_s - 10)
    return {r["name"]: r for r in [
        record("losses", dict(header, rows=loss_rows(**losses))),
        record("main", dict(wall_s=main_s, first_steps_s=[9.5, 7.0], final=final), seconds=main_s),
        record("train-yolov8n", train_row(efficiency)),
        record("train-stream", train_row(efficiency, stream=True)),
    ]}


def verdicts(goals):
    return [g["verdict"] for g in goals]


def test_every_goal_met_on_a_gpu(report):
    assert verdicts(report.goals(records(), backend="gpu", quick=False)) == ["PASS"] * 5


def test_each_goal_fails_on_its_own_figure(report):
    assert verdicts(report.goals(records(main_s=41.0), backend="gpu", quick=False)) == ["FAIL"] + ["PASS"] * 4
    assert verdicts(report.goals(records(efficiency=0.9), backend="gpu", quick=False)) == ["PASS", "FAIL", "FAIL", "PASS", "PASS"]
    assert verdicts(report.goals(records(ratio=9.0), backend="gpu", quick=False)) == ["PASS"] * 3 + ["FAIL", "PASS"]
    assert verdicts(report.goals(records(ms=5.5), backend="gpu", quick=False)) == ["PASS"] * 4 + ["FAIL"]


def test_what_is_not_judged(report):
    goals = report.goals(records(), backend="cpu", quick=False)
    assert verdicts(goals) == ["n/a"] * 5 and all(g["why"] == "not applicable on cpu" and g["measured"] for g in goals)
    assert verdicts(report.goals(records(), backend="gpu", quick=True)) == ["n/a"] * 5
    # Upstream on the CPU says nothing about a CUDA speed-up, high or low.
    for ratio in (5.0, 50.0):
        g = report.goals(records(ratio=ratio, device="cpu"), backend="gpu", quick=False)[3]
        assert g["verdict"] == "not judged" and "CPU" in g["why"]
    # Rows missing: a low row still fails, high rows are not enough to pass.
    assert report.goals(records(batches=(16,)), backend="gpu", quick=False)[3]["verdict"] == "not judged"
    assert report.goals(records(batches=(16,), ratio=3.0), backend="gpu", quick=False)[3]["verdict"] == "FAIL"
    assert report.goals(records(batches=(16,)), backend="gpu", quick=False)[4]["verdict"] == "not measured"


def test_a_part_that_stopped(report):
    recs = records()
    recs["main"] = record("main", dict(wall_s=90.0, first_steps_s=[9.5]), status="timeout", seconds=90.0,
                          reason="stopped at its cap of 90 s")
    recs["losses"] = record("losses", None, status="skipped", reason="torch is not installed (the upstream side)")
    del recs["train-stream"]
    goals = report.goals(recs, backend="gpu", quick=False)
    assert verdicts(goals) == ["FAIL", "PASS", "not measured", "not measured", "not measured"]
    assert goals[2]["why"] == "the part did not run" and "torch is not installed" in goals[3]["why"]


def test_plan_and_names(report):
    full, quick = report.plan(quick=False), report.plan(quick=True)
    assert [p.name for p in full] == [p.name for p in quick]
    assert sum(p.cap_s for p in full) > report.TOTAL_S  # the total budget, not the caps, bounds a full run
    assert report.TOTAL_S <= 8 * 60 - 10
    for part in full + quick:
        for argv in part.commands:
            assert argv[0] in ("-m", "-c") or (EXPERIMENTS.parent / argv[0]).is_file()
    thin = report.plan(quick=False, modules=dict(torch=True, ultralytics=True, yolov5=False, yolox=True, yolo9=False, cv2=False))
    by_name = {p.name: p for p in thin}
    assert "yolov5 (yolov5)" in by_name["losses"].what and "yolov9" not in by_name["losses"].commands[0]
    assert "yolov5n" not in by_name["models"].commands[0][2] and by_name["models"].skip is None
    assert by_name["train-stream"].skip and by_name["main"].skip is None
    assert report.plan(quick=False, modules=dict(torch=False))[0].skip
    assert report.file_name("gpu", "NVIDIA H100 80GB HBM3", False) == "gpu-NVIDIA_H100_80GB_HBM3.json"
    assert report.file_name("tpu", "TPU v5 lite", True) == "tpu-TPU_v5_lite-quick.json"


def test_tables(report):
    recs = records()
    doc = dict(parts=list(recs.values()), backend="gpu", device_kind="NVIDIA H100", devices=1, jax="0.11", torch="2.11",
               torch_cuda=True, cpu="x", date="2026-12-07", quick=False, wall_s=400.0, total_budget_s=465.0,
               load_before="quiet", goals=report.goals(recs, backend="gpu", quick=False))
    text = report.report_text(doc)
    assert "| YOLOX | 64 | 2.00 | 24.00 | 12.0× | 0.20 |" in text
    assert "| yolov8n, 640 px, B 64, 512 images in RAM, 50 + 100 steps | 50.00 ms | 51.55 ms | 30.0 batches/s | 0.970 |" in text
    assert "| 35.0 s (25.0 s training + eval; first steps 9.5 + 7 s) | 0.8500 | 0.6500 |" in text
    assert text.count("\nPASS ") == 5 and text.rstrip().endswith("nothing: every part ran to its end")
