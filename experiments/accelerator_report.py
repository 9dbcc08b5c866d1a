"""Every figure an accelerator slot should bring back, in one command.

    python experiments/accelerator_report.py                  # full sizes: fits 8 min on one H100/H200
    python experiments/accelerator_report.py --quick          # CPU sizes (the 2-core CPU: see docs/speed.md)
    python experiments/accelerator_report.py --only losses main --dry-run
    python experiments/accelerator_report.py --tables experiments/results/gpu-NVIDIA_H100_80GB_HBM3.json

Runs on JAX's default backend, whatever it is, the parts below one after the
other, each as its own process (``XLA_PYTHON_CLIENT_PREALLOCATE=false``,
``YOLO_OFFLINE=1``, this checkout first on ``PYTHONPATH``) under its own time
cap and all of them inside a total budget.  A part that fails or runs out of
time is recorded with its reason and the tail of its console, keeps the rows
it finished, and the report goes on; a part that needs a package that is
absent is skipped and says which.  It reads no network and installs nothing
(the JPEG folder of ``train-stream`` is drawn locally by ``bench_data.py``).

Parts, in order of priority (full sizes; ``--quick`` in brackets):

* ``losses``: ``bench_losses.py``, the four losses at B 16 and 64, 640 px,
  both assignment paths, median of 10 [B 16, 320 px, median of 5].
* ``main``: the main command (``bash scripts/train.sh`` without its
  venv set-up: ``jaxyolo train`` with every default) into a temporary
  ``--out``, timed from the process start to its exit; mAP from its
  ``final.json`` [2 epochs, the second without mosaic, 320 train / 80 val
  images].
* ``train-yolov8n``: ``bench_train.py``, yolov8n, 640 px, B 64, 512 embedded
  images in RAM (8 steps an epoch), 50 warm-up + 100 timed steps [160 px,
  B 8, 64 images, 5 + 10 steps].
* ``train-default``: ``bench_train.py``, the default ``jaxyolo train``
  config (pico, 128 px, B 16), 50 + 200 steps [``--tiny``].
* ``models``: ``bench_models.py``, yolov8n, yolo11n, yolov5n and yolox-nano,
  640 px, B 16, median of 5 [160 px, B 4, median of 3].
* ``train-stream``: as ``train-yolov8n``, the images decoded from
  ``bench_data.py``'s 2000-JPEG folder (made once, by a process without JAX)
  by the trainer's default number of decode workers, 25 + 50 steps
  [5 + 10 steps].

The goals, judged on a GPU or TPU at full sizes (on the CPU their measured
values are printed as not applicable; with ``--quick`` as not judged):
the main command in at most 40 s end to end; a loop efficiency of at least
0.95 for yolov8n/640/B 64 (in RAM, and streamed); every loss at least 10x
upstream on CUDA at B 16 and 64; the YOLOX loss at B 64 in at most 5 ms.

Writes ``experiments/results/<backend>-<device kind>.json`` (``-quick``
before ``.json`` with ``--quick``; ``--out FILE``) after every part, each
part's whole console to ``runs/accelerator_report/<that name>/<part>.log``,
and at the end prints the tables of docs/speed.md, the goal verdicts and what it
skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

#: The goals of issue 22.
GOAL_MAIN_S = 40.0
GOAL_EFFICIENCY = 0.95
GOAL_LOSS_SPEEDUP = 10.0
GOAL_YOLOX_B64_MS = 5.0
GOAL_LOSS_BATCHES = (16, 64)

#: The total budget: 8 minutes less a margin for the probe and the tables.
TOTAL_S = 465.0
QUICK_TOTAL_S = 1800.0
#: A part left less than this (of its cap or of the total) is skipped, not started.
MIN_PART_S = 20.0

#: The upstream package each loss family and model needs (besides torch).
LOSS_PACKAGES = {"yolov5": "yolov5", "yolox": "yolox", "yolov8": "ultralytics", "yolov9": "yolo9"}
MODEL_PACKAGES = {"yolov8n": "ultralytics", "yolo11n": "ultralytics", "yolov5n": "yolov5", "yolox-nano": "yolox"}
PACKAGES = ("torch", *sorted(set(LOSS_PACKAGES.values())), "cv2")

STREAM_IMAGES = 2000
MAKE_FOLDER = ('import sys; from pathlib import Path; sys.path.insert(0, "experiments"); '
               f'from bench_data import make_folder; make_folder(Path("experiments/.bench-data").resolve(), {STREAM_IMAGES})')


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the report: its commands (``python`` arguments; ``{json}``
    and ``{out}`` stand for the part's JSON file and a temporary folder), run
    one after the other under ``cap_s`` seconds in all."""

    name: str
    kind: str  # "losses" | "models" | "train" | "main"
    what: str
    cap_s: float
    commands: tuple[tuple[str, ...], ...]
    skip: str | None = None


def decode_workers() -> int:
    """The trainer's default number of decode processes: the usable CPUs minus one, 1 to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def plan(*, quick: bool, modules: dict[str, bool] | None = None) -> list[Part]:
    """The parts in order of priority, at full or ``quick`` sizes.  ``modules``
    (package -> importable; None: all) decides what is skipped for lack of a
    package: a loss family or model whose upstream is absent is left out of
    its part, and the part is skipped when nothing is left."""
    have = (lambda m: True) if modules is None else (lambda m: bool(modules.get(m)))
    parts = []

    families = [f for f, m in LOSS_PACKAGES.items() if have(m)]
    missing = [f"{f} ({m})" for f, m in LOSS_PACKAGES.items() if not have(m)]
    sizes = ("--batch", "16", "--img", "320", "--repeats", "5") if quick else ("--batch", "16", "64")
    what = "B 16, 320 px, median of 5" if quick else "B 16 and 64, 640 px, median of 10"
    parts.append(Part(
        "losses", "losses", what + (f"; without {', '.join(missing)}: not installed" if missing else ""),
        480 if quick else 110,
        (("experiments/bench_losses.py", "--family", *families, *sizes, "--json", "{json}"),),
        skip=_skip_reason(have, families, "every upstream loss package")))

    quick_main = ("--epochs", "2", "--close-mosaic", "1", "--train-size", "320", "--val-size", "80")
    parts.append(Part(
        "main", "main",
        "jaxyolo train, 2 epochs (mosaic, then none), 320 train / 80 val images" if quick
        else "jaxyolo train with the defaults (scripts/train.sh without the venv set-up)",
        420 if quick else 90,
        (("-m", "jaxyolo", "train", "--out", "{out}/run", *(quick_main if quick else ())),)))

    v8n = (("--model", "yolov8n", "--img-size", "160", "--batch", "8") if quick
           else ("--model", "yolov8n", "--img-size", "640", "--batch", "64"))
    v8n_what = "yolov8n, 160 px, B 8" if quick else "yolov8n, 640 px, B 64"
    steps = ("--steps", "10", "--warmup", "5", "--log-every", "5")
    parts.append(Part(
        "train-yolov8n", "train",
        v8n_what + (", 64 images in RAM, 5 + 10 steps" if quick else ", 512 images in RAM, 50 + 100 steps"),
        300 if quick else 120,
        (("experiments/bench_train.py", *v8n, "--train-size", "64" if quick else "512",
          *(steps if quick else ("--steps", "100", "--warmup", "50", "--log-every", "50")), "--json", "{json}"),)))

    parts.append(Part(
        "train-default", "train",
        "--tiny (pico, 64 px, B 8), 50 + 200 steps" if quick else "the default config (pico, 128 px, B 16), 50 + 200 steps",
        300 if quick else 60,
        (("experiments/bench_train.py", *(("--tiny",) if quick else ()), "--json", "{json}"),)))

    models = [m for m, pkg in MODEL_PACKAGES.items() if have(pkg)]
    missing = [f"{m} ({pkg})" for m, pkg in MODEL_PACKAGES.items() if not have(pkg)]
    sizes = ("--img", "160", "--batch", "4", "--repeats", "3") if quick else ()
    what = ", ".join(models) + (", 160 px, B 4, median of 3" if quick else ", 640 px, B 16, median of 5")
    parts.append(Part(
        "models", "models", what + (f"; without {', '.join(missing)}: not installed" if missing else ""),
        600 if quick else 150,
        (("experiments/bench_models.py", "--models", ",".join(models), *sizes, "--json", "{json}"),),
        skip=_skip_reason(have, models, "every upstream model package")))

    workers = decode_workers()
    parts.append(Part(
        "train-stream", "train",
        f"{v8n_what}, {STREAM_IMAGES} streamed JPEGs, {workers} decode worker{'s' * (workers > 1)}, "
        + ("5 + 10 steps" if quick else "25 + 50 steps"),
        420 if quick else 75,
        (("-c", MAKE_FOLDER),
         ("experiments/bench_train.py", *v8n, "--stream", "--workers", str(workers),
          *(steps if quick else ("--steps", "50", "--warmup", "25", "--log-every", "25")), "--json", "{json}")),
        skip=None if have("cv2") else "OpenCV (cv2) is not installed: no JPEG folder"))
    return parts


def _skip_reason(have, kept, what) -> str | None:
    if not have("torch"):
        return "torch is not installed (the upstream side)"
    return None if kept else f"none of {what} is installed"


# ---------------------------------------------------------------- running


def child_env() -> dict[str, str]:
    """The children's environment: no GPU memory preallocated (one process
    after another, and the probe's, share the device), ultralytics offline,
    this checkout's ``jaxyolo`` first, unbuffered output."""
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env.setdefault("YOLO_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


PROBE = """
import importlib.util, json, sys
out = dict(modules={m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]})
import jax
d = jax.devices()
out.update(jax=jax.__version__, backend=jax.default_backend(), device_kind=getattr(d[0], "device_kind", d[0].platform),
           devices=len(d))
if out["modules"]["torch"]:
    try:
        import torch
        out.update(torch=torch.__version__, torch_cuda=bool(torch.cuda.is_available()))
    except Exception as e:  # a torch that cannot load: the upstream parts fail and say why
        out.update(torch=f"unusable ({type(e).__name__}: {e})", torch_cuda=False)
print("PROBE " + json.dumps(out))
"""


def probe(env) -> dict:
    """Backend, device kind, versions and the importable packages, asked of a
    child process (the report itself never holds the device)."""
    cmd = [sys.executable, "-c", PROBE, *PACKAGES]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    for line in done.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    raise SystemExit(f"error: could not start JAX here (exit status {done.returncode}):\n{done.stderr[-3000:]}")


def _stop(proc):
    """End ``proc`` and its process group (the report started it in a session of its own)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def run_logged(argv, *, timeout, env, lines, log, prefix) -> int | None:
    """Run ``argv`` with its console copied to ``lines``, ``log`` and ours
    (each line after ``prefix``); its exit status, or None when ``timeout``
    ran out (it is then stopped, with everything it started)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n").split("\r")[-1]
            lines.append(line)
            log.write(line + "\n")
            log.flush()
            print(prefix + line, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            _stop(proc)
    reader.join(timeout=10)
    return rc


def run_part(part: Part, *, timeout: float, env, log_dir: Path) -> dict:
    """Run one part under ``timeout`` seconds: its record (status ``ok``,
    ``failed`` or ``timeout``, the reason, seconds, the tail of its console
    and what it measured, also when it stopped half way)."""
    t0 = time.perf_counter()
    lines: list[str] = []
    status, reason = "ok", None
    with tempfile.TemporaryDirectory(prefix=f"report-{part.name}-") as tmp, open(log_dir / f"{part.name}.log", "w") as log:
        json_path = os.path.join(tmp, "rows.json")
        commands = [[sys.executable, *(a.replace("{json}", json_path).replace("{out}", tmp) for a in argv)]
                    for argv in part.commands]
        for i, argv in enumerate(commands):
            log.write(f"$ {shlex.join(argv)}\n")
            rc = run_logged(argv, timeout=timeout - (time.perf_counter() - t0), env=env, lines=lines, log=log,
                            prefix=f"  [{part.name}] ")
            step = f" in command {i + 1} of {len(commands)}" if len(commands) > 1 else ""
            if rc is None:
                status, reason = "timeout", f"stopped at its cap of {timeout:.0f} s{step}"
                break
            if rc != 0:
                status, reason = "failed", f"exit status {rc}{step}"
                break
        seconds = time.perf_counter() - t0
        data = collect(part, json_path=json_path, out=tmp, lines=lines, seconds=seconds)
    return dict(name=part.name, what=part.what, status=status, reason=reason, seconds=round(seconds, 1),
                cap_s=round(timeout, 1), commands=[shlex.join(c) for c in commands],
                tail=lines[-(8 if status == "ok" else 30):], data=data)


def collect(part: Part, *, json_path, out, lines, seconds) -> dict | None:
    """What a part measured: its bench's JSON, or for ``main`` the run's
    ``final.json``, its wall time and its compile lines."""
    if part.kind == "main":
        final = os.path.join(out, "run", "final.json")
        compiles = [float(s) for s in re.findall(r"first step done in ([\d.]+) s", "\n".join(lines))]
        data = dict(wall_s=round(seconds, 1), first_steps_s=compiles)
        if os.path.exists(final):
            with open(final) as f:
                data["final"] = json.load(f)
        return data
    if not os.path.exists(json_path):
        return None
    with open(json_path) as f:
        return json.load(f)


# ---------------------------------------------------------------- goals


def goals(records: dict[str, dict], *, backend: str, quick: bool) -> list[dict]:
    """The verdict on each goal: ``PASS``, ``FAIL``, ``n/a`` (on the CPU, or
    at ``--quick`` sizes: the measured value without a verdict), ``not
    judged`` (measured, but not what the goal is about) or ``not measured``."""
    losses = {(r["family"], r["batch"]): r for r in _rows(records.get("losses"))}
    measures = [
        (f"the default `jaxyolo train` in ≤ {GOAL_MAIN_S:g} s end to end", _main_measure(records.get("main"))),
        *((f"yolov8n/640/B 64 loop efficiency ≥ {GOAL_EFFICIENCY:g} ({label})", _efficiency_measure(records.get(name)))
          for name, label in (("train-yolov8n", "in RAM"), ("train-stream", "streamed JPEGs"))),
        (f"every loss ≥ {GOAL_LOSS_SPEEDUP:g}× upstream on CUDA at B {' and '.join(map(str, GOAL_LOSS_BATCHES))}",
         _speedup_measure(losses, records.get("losses"))),
        (f"the YOLOX loss at B 64 in ≤ {GOAL_YOLOX_B64_MS:g} ms", _yolox_measure(losses, records.get("losses"))),
    ]
    return [verdict(goal, backend=backend, quick=quick, **m) for goal, m in measures]


def verdict(goal, *, backend, quick, measured, passed=None, why_not=None, missing=None) -> dict:
    """One goal's line: ``measured`` (text, None when nothing was) judged by
    ``passed`` unless on the CPU, at --quick sizes or ``why_not``; a False
    ``passed`` fails the goal whatever ``why_not`` says."""
    if measured is None:
        return dict(goal=goal, measured=None, verdict="not measured", why=missing or "the part did not run")
    if backend == "cpu":
        return dict(goal=goal, measured=measured, verdict="n/a", why="not applicable on cpu")
    if quick:
        return dict(goal=goal, measured=measured, verdict="n/a", why="not judged at --quick sizes")
    if passed is None or (why_not and passed):
        return dict(goal=goal, measured=measured, verdict="not judged", why=why_not)
    return dict(goal=goal, measured=measured, verdict="PASS" if passed else "FAIL", why=None)


def _rows(record) -> list[dict]:
    return list(((record or {}).get("data") or {}).get("rows") or [])


def _why_missing(record, what) -> str:
    """Why a goal has no measurement: the part's state, or ``what`` of a part that ran."""
    if record is None:
        return "the part did not run"
    if record["status"] == "ok":
        return what
    return f"{record['status']}: {record['reason']}"


def _main_measure(record) -> dict:
    """The main command's wall time (a run stopped at its cap fails the goal)."""
    if record is None or record["status"] in ("skipped", "failed"):
        return dict(measured=None, missing=_why_missing(record, ""))
    if record["status"] == "timeout":
        return dict(measured=f"more than {record['seconds']:.0f} s (stopped at its cap)", passed=False)
    d = record["data"]
    final = d.get("final", {})
    detail = (f"; final.json: {final['seconds']:.1f} s in the loop, mAP50 {final['map50']:.4f}, "
              f"mAP50-95 {final['map50_95']:.4f}" if "map50" in final else "")
    return dict(measured=f"{d['wall_s']:.1f} s{detail}", passed=d["wall_s"] <= GOAL_MAIN_S)


def _efficiency_measure(record) -> dict:
    d = (record or {}).get("data")
    if not d or "efficiency" not in d:
        return dict(measured=None, missing=_why_missing(record, "no figures"))
    return dict(measured=f"{d['efficiency']:.3f} (step {d['step_ms']:.2f} ms, loop {d['loop_ms']:.2f} ms)",
                passed=d["efficiency"] >= GOAL_EFFICIENCY)


LOSS_NAMES = {"yolov5": "YOLOv5", "yolox": "YOLOX", "yolov8": "YOLOv8", "yolov9": "YOLOv9"}


def _speedup_measure(rows, record) -> dict:
    """The loss speed-ups; a row under the goal fails it even when others are
    missing, a CPU upstream leaves it unjudged either way."""
    if not rows:
        return dict(measured=None, missing=_why_missing(record, "no rows"))
    order = sorted(rows, key=lambda fb: (fb[1], list(LOSS_NAMES).index(fb[0]) if fb[0] in LOSS_NAMES else 9))
    measured = ", ".join(f"{LOSS_NAMES.get(f, f)} B {b} {rows[f, b]['ratio']:.1f}×" for f, b in order)
    if any(r.get("torch_device") != "cuda" for r in rows.values()):
        return dict(measured=measured, why_not="upstream ran on the CPU (torch without CUDA here)")
    missing = sorted({(f, b) for f in LOSS_NAMES for b in GOAL_LOSS_BATCHES} - rows.keys())
    return dict(measured=measured, passed=all(r["ratio"] >= GOAL_LOSS_SPEEDUP for r in rows.values()),
                why_not=("missing " + ", ".join(f"{LOSS_NAMES[f]} B {b}" for f, b in missing)) if missing else None)


def _yolox_measure(rows, record) -> dict:
    r = rows.get(("yolox", 64))
    if r is None:
        return dict(measured=None, missing=_why_missing(record, "no YOLOX B 64 row"))
    return dict(measured=f"{r['jax_ms']:.2f} ms", passed=r["jax_ms"] <= GOAL_YOLOX_B64_MS)


# ---------------------------------------------------------------- tables


def fmt_s(seconds: float) -> str:
    """``7 min 14 s`` or ``35.2 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s"


def parts_table(records: list[dict]) -> str:
    lines = ["| part | what ran | status | time | cap |", "| --- | --- | --- | --- | --- |"]
    for r in records:
        status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
        time_ = fmt_s(r["seconds"]) if r["status"] != "skipped" else "—"
        lines.append(f"| {r['name']} | {r['what']} | {status} | {time_} | {fmt_s(r['cap_s']) if r['cap_s'] else '—'} |")
    return "\n".join(lines)


def train_table(records: list[dict]) -> str | None:
    """The README's bench_train table: config | (a) bare step | (b) real loop | (c) pipeline | efficiency."""
    order = ("train-default", "train-yolov8n", "train-stream")
    rows = [r["data"] for r in sorted(records, key=lambda r: order.index(r["name"]) if r["name"] in order else 9)
            if r["name"] in order and r.get("data")]
    if not rows:
        return None
    lines = ["| config | (a) bare step | (b) real loop | (c) pipeline | efficiency |", "| --- | --- | --- | --- | --- |"]
    for d in rows:
        data = (f"{d['train_size']} streamed JPEGs, {d['workers']} decode worker{'s' * (d['workers'] != 1)}" if d["stream"]
                else f"{d['train_size']} images in RAM")
        config = f"{d['model']}, {d['img_size']} px, B {d['batch']}, {data}, {d['warmup']} + {d['steps']} steps"
        lines.append(f"| {config} | {d['step_ms']:.2f} ms | {d['loop_ms']:.2f} ms | "
                     f"{d['pipeline_batches_per_s']:.1f} batches/s | {d['efficiency']:.3f} |")
    return "\n".join(lines)


def main_table(record: dict | None, device: str) -> str | None:
    d = (record or {}).get("data") or {}
    final = d.get("final")
    if not final:
        return None
    compiles = " + ".join(f"{s:g}" for s in d["first_steps_s"]) or "?"
    return "\n".join([
        f"| run | wall time ({device}) | val mAP@0.5 | val mAP@0.5:0.95 |", "| --- | --- | --- | --- |",
        f"| {record['what']} | {fmt_s(d['wall_s'])} ({final['seconds']:.1f} s training + eval; first steps {compiles} s) | "
        f"{final['map50']:.4f} | {final['map50_95']:.4f} |"])


def goal_lines(verdicts: list[dict]) -> str:
    out = []
    for g in verdicts:
        tag = {"PASS": "PASS", "FAIL": "FAIL"}.get(g["verdict"], g["verdict"])
        measured = g["measured"] if g["measured"] is not None else "—"
        out.append(f"{tag:<12} {g['goal']}: {measured}" + (f"  ({g['why']})" if g["why"] else ""))
    return "\n".join(out)


def report_text(doc: dict) -> str:
    """Everything printed at the end: the parts, the README tables, the goals, what was skipped."""
    import bench_losses
    import bench_models

    records = doc["parts"]
    by_name = {r["name"]: r for r in records}
    device = f"{doc['backend']}, {doc['device_kind']}"
    out = [f"## accelerator report: jax {doc['jax']} on {device} ({doc['devices']} device(s)); "
           f"torch {doc.get('torch', 'absent')}{' with CUDA' if doc.get('torch_cuda') else ''}; {doc['cpu']}",
           f"{doc['date']}; {'--quick sizes' if doc['quick'] else 'full sizes'}; {fmt_s(doc['wall_s'])} in all "
           f"(budget {fmt_s(doc['total_budget_s'])}); machine before the run: {doc['load_before']}", "",
           "### Parts", parts_table(records)]
    losses = _rows(by_name.get("losses"))
    if losses:
        head = by_name["losses"]["data"]
        out += ["", f"### Losses (jax on {head['jax_backend']}, auto = {head['auto_path']}; upstream on {head['torch_device']}; "
                    f"{head['img']} px, nc {head['nc']}, 0–{head['max_gt']} GTs per image, median of {head['repeats']})",
                bench_losses.table(losses)]
    models = _rows(by_name.get("models"))
    if models:
        head = by_name["models"]["data"]
        out += ["", f"### Models (B {head['batch']}, {head['img']} px, median of {head['repeats']}; upstream on {head['torch_device']})",
                bench_models.table(models)]
    train = train_table(records)
    if train:
        out += ["", "### The training loop (bench_train.py)", train]
    main = main_table(by_name.get("main"), device)
    if main:
        out += ["", "### The main command", main]
    out += ["", "### Goals", goal_lines(doc["goals"]), "", "### Skipped or incomplete"]
    gaps = [f"- {r['name']}: {r['status']} ({r['reason']})" for r in records if r["status"] != "ok"]
    out += gaps or ["nothing: every part ran to its end"]
    return "\n".join(out)


# ---------------------------------------------------------------- main


def file_name(backend: str, device_kind: str, quick: bool) -> str:
    """``<backend>-<device kind>[-quick].json`` with every run of other characters as one ``_``."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9.]+", "_", s).strip("_") or "unknown"  # noqa: E731
    return f"{clean(backend)}-{clean(device_kind)}{'-quick' if quick else ''}.json"


def parse_caps(items) -> dict[str, float]:
    caps = {}
    for item in items or ():
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"error: --cap wants PART=SECONDS, got {item!r}")
        caps[name] = float(value)
    return caps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [part.name for part in plan(quick=False)]
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU (each part says which)")
    p.add_argument("--only", nargs="+", choices=names, metavar="PART", help=f"run these parts only ({', '.join(names)})")
    p.add_argument("--skip", nargs="+", choices=names, default=[], metavar="PART", help="leave these parts out")
    p.add_argument("--cap", nargs="+", metavar="PART=S", help="a part's time cap in seconds (before --budget-scale)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every cap and the total budget (a slower machine)")
    p.add_argument("--total", type=float, default=None,
                   help=f"total budget in seconds, parts included (default {TOTAL_S:g}; --quick {QUICK_TOTAL_S:g}; 0: none)")
    p.add_argument("--out", default=None, help="the JSON file (default experiments/results/<backend>-<device kind>[-quick].json)")
    p.add_argument("--dry-run", action="store_true", help="print the parts' commands and caps, run nothing")
    p.add_argument("--tables", metavar="JSON", help="print the tables and verdicts of a report already written, run nothing")
    args = p.parse_args(argv)
    if args.tables:
        print(report_text(json.loads(Path(args.tables).read_text())))
        return 0

    caps = parse_caps(args.cap)
    unknown = set(caps) - set(names)
    if unknown:
        raise SystemExit(f"error: --cap of unknown parts {sorted(unknown)} (parts: {', '.join(names)})")
    total = (args.total if args.total is not None else QUICK_TOTAL_S if args.quick else TOTAL_S) * args.budget_scale
    chosen = [n for n in (args.only or names) if n not in args.skip]
    if args.dry_run:
        for part in plan(quick=args.quick):
            cap = caps.get(part.name, part.cap_s) * args.budget_scale
            state = "run" if part.name in chosen else "left out"
            print(f"{part.name} ({state}, cap {cap:g} s): {part.what}")
            for c in part.commands:
                print(f"    python {shlex.join(c)}")
        print(f"total budget {total:g} s" if total else "no total budget")
        return 0

    from _bench_common import cpu_description, load_check

    t_start = time.perf_counter()
    load_text, warning = load_check()
    if warning:
        print(warning, flush=True)
    env = child_env()
    info = probe(env)
    if info["backend"] == "cpu" and any(os.path.exists(f"/dev/{d}") for d in ("nvidia0", "accel0")):
        print("WARNING: JAX runs on the CPU though this machine has an accelerator: is a jax[cuda]/jax[tpu] installed?", flush=True)
    out_path = Path(args.out) if args.out else HERE / "results" / file_name(info["backend"], info["device_kind"], args.quick)
    log_dir = ROOT / "runs" / "accelerator_report" / out_path.stem
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"jax {info['jax']} on {info['backend']} ({info['device_kind']}, {info['devices']} device(s)); "
          f"torch {info.get('torch', 'absent')} {'with' if info.get('torch_cuda') else 'without'} CUDA; {cpu_description()}; "
          f"{'--quick sizes' if args.quick else 'full sizes'}; total budget {fmt_s(total) if total else 'none'}; "
          f"JSON {out_path}, logs in {log_dir}", flush=True)

    doc = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=shlex.join([sys.executable, *sys.argv]), quick=args.quick, backend=info["backend"],
               device_kind=info["device_kind"], devices=info["devices"], jax=info["jax"], torch=info.get("torch"),
               torch_cuda=info.get("torch_cuda"), modules=info["modules"], cpu=cpu_description(), load_before=load_text,
               total_budget_s=total, parts=[], goals=[], wall_s=None)
    for part in plan(quick=args.quick, modules=info["modules"]):
        if part.name not in chosen:
            continue
        cap = caps.get(part.name, part.cap_s) * args.budget_scale
        left = total - (time.perf_counter() - t_start) if total else float("inf")
        timeout = min(cap, left)
        print(f"\n== {part.name}: {part.what} (cap {fmt_s(timeout)})", flush=True)
        if part.skip or timeout < MIN_PART_S:
            reason = part.skip or f"no time left in the total budget ({fmt_s(max(left, 0))} remained)"
            record = dict(name=part.name, what=part.what, status="skipped", reason=reason, seconds=0.0, cap_s=None,
                          commands=[], tail=[], data=None)
        else:
            record = run_part(part, timeout=timeout, env=env, log_dir=log_dir)
        print(f"== {part.name}: {record['status']}" + (f" ({record['reason']})" if record["reason"] else "")
              + (f" after {fmt_s(record['seconds'])}" if record["status"] != "skipped" else ""), flush=True)
        doc["parts"].append(record)
        finish(doc, out_path, t_start)
    finish(doc, out_path, t_start)
    print("\n" + report_text(doc))
    print(f"\nwrote {out_path}")
    return 0


def finish(doc: dict, path: Path, t_start: float):
    """Bring ``doc``'s goals and wall time up to date and write it (after every part)."""
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    doc["goals"] = goals({r["name"]: r for r in doc["parts"]}, backend=doc["backend"], quick=doc["quick"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
