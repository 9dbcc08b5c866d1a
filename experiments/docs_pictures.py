"""The documentation's pictures of a trained run: its training curves and
``jaxyolo predict`` on validation images.

    python experiments/docs_pictures.py RUN [--images 6] [--img-size 128]

``RUN`` is a finished run folder (e.g. ``bash scripts/train.sh --out
runs/main``).  Writes ``docs/img/results.png`` (a copy of the run's
``results.png``: loss curves and mAP per epoch) and ``docs/img/predict.png``:
the first ``--images`` images of the embedded val split (never trained on),
written as PNG files and run through the real ``jaxyolo predict`` command
(its default ``--conf 0.25``), side by side at 2x (nearest neighbour, so
the drawn line widths and fonts are the ones a 128 px image gets).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--img-size", type=int, default=128)
    args = p.parse_args(argv)
    from PIL import Image

    from jaxyolo.data import load_embedded

    shutil.copyfile(args.run / "results.png", DOCS_IMG / "results.png")
    val = load_embedded("val", img_size=args.img_size, size=args.images)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "val", Path(tmp) / "predict"
        src.mkdir()
        for i in range(args.images):
            Image.fromarray(np.asarray(val.images[i])).save(src / f"{i:02d}.png")
        subprocess.run([sys.executable, "-m", "jaxyolo", "predict", str(src), "--checkpoint", str(args.run), "--out", str(out)], check=True)
        tiles = [Image.open(out / f"{i:02d}.png").convert("RGB") for i in range(args.images)]
    w, h = tiles[0].size
    sheet = Image.new("RGB", (2 * w * len(tiles) + 8 * (len(tiles) - 1), 2 * h), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t.resize((2 * w, 2 * h), Image.NEAREST), (i * (2 * w + 8), 0))
    sheet.save(DOCS_IMG / "predict.png", optimize=True)
    print(f"wrote {DOCS_IMG / 'results.png'} and {DOCS_IMG / 'predict.png'}")


if __name__ == "__main__":
    main()
