"""Train the same detector with each of the three losses in the same budget.

    python experiments/compare_losses.py [--out runs/compare] [--epochs N] [--losses yolov8,yolov5,yolox]

Every run uses the default :class:`jaxyolo.train.TrainConfig` (embedded data,
pico backbone, same images, epochs, batches, optimiser and schedule) and
differs only in the head + loss.  Writes ``<out>/<loss>/`` (the usual run
directories), ``docs/img/compare_losses.png`` (val mAP per epoch and training
loss curves) and ``<out>/compare_losses.json`` / ``.md`` (final numbers).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

from jaxyolo.train import TrainConfig, train

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def plot(out: Path, losses):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, loss in enumerate(losses):
        color = f"C{i}"
        ep = [r for r in _read(out / loss / "metrics.csv") if r.get("map50")]
        a1.plot([int(r["epoch"]) for r in ep], [float(r["map50"]) for r in ep], "o-", color=color, label=f"{loss} mAP@0.5")
        a1.plot([int(r["epoch"]) for r in ep], [float(r["map50_95"]) for r in ep], "s--", color=color, label=f"{loss} mAP@0.5:0.95")
        st = _read(out / loss / "steps.csv")
        y = [float(r["loss"]) for r in st]
        first = sum(y[:20]) / max(len(y[:20]), 1)
        k = 25
        sm = [sum(y[max(0, i - k + 1) : i + 1]) / len(y[max(0, i - k + 1) : i + 1]) / first for i in range(len(y))]
        a2.plot([int(r["step"]) for r in st], sm, color=color, label=loss)
    a1.set_xlabel("epoch")
    a1.set_ylabel("val mAP (EMA model)")
    a1.set_ylim(0, 1)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xlabel("step")
    a2.set_ylabel("training loss / its initial value")
    a2.set_yscale("log")
    a2.grid(alpha=0.3)
    a2.legend()
    fig.tight_layout()
    fig.savefig(DOCS_IMG / "compare_losses.png", dpi=100)  # shown in docs/training.md
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--losses", default="yolov8,yolov5,yolox")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--reuse", nargs="*", default=[], metavar="LOSS=DIR",
                   help="take a finished run of the same config instead of training, e.g. yolov8=runs/yolov8")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    base = TrainConfig()
    if args.epochs is not None:
        base = dataclasses.replace(base, epochs=args.epochs)
    if args.train_size is not None:
        base = dataclasses.replace(base, train_size=args.train_size)
    reuse = dict(r.split("=", 1) for r in args.reuse)
    results = {}
    for loss in losses:
        if loss in reuse:
            src = Path(reuse[loss])
            saved = TrainConfig.from_json(json.loads((src / "config.json").read_text()))
            if dataclasses.replace(saved, eval_every=base.eval_every) != dataclasses.replace(base, loss=loss):
                raise SystemExit(f"--reuse {loss}={src}: its config differs from this comparison's")
            final = json.loads((src / "final.json").read_text())
            (out / loss).mkdir(exist_ok=True)
            for f in ("metrics.csv", "steps.csv", "config.json", "final.json"):
                (out / loss / f).write_text((src / f).read_text())
            results[loss] = {"map50": final["map50"], "map50_95": final["map50_95"], "steps": final["steps"], "wall_s": round(final["seconds"], 1)}
            continue
        t0 = time.perf_counter()
        r = train(dataclasses.replace(base, loss=loss), out / loss, progress=not args.no_progress)
        results[loss] = {"map50": r["map50"], "map50_95": r["map50_95"], "steps": r["steps"], "wall_s": round(time.perf_counter() - t0, 1)}
        (out / "compare_losses.json").write_text(json.dumps({"config": base.to_json(), "results": results}, indent=1))
    plot(out, losses)
    lines = ["| loss | mAP@0.5 | mAP@0.5:0.95 | steps | wall time (s) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['map50']:.3f} | {v['map50_95']:.3f} | {v['steps']} | {v['wall_s']:.0f} |" for k, v in results.items()]
    (out / "compare_losses.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
