# Shared by scripts/test.sh and scripts/train.sh: make (or reuse) the venv and
# install the pinned package.  Idempotent: a stamp of the inputs skips the
# install when nothing changed.  Usage: . scripts/_env.sh EXTRAS [oracles]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${JAXYOLO_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[set-up] creating the virtual environment $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
extras="$1"; with_oracles="${2:-}"
stamp="$VENV/.jaxyolo-stamp-$extras${with_oracles:+-oracles}"
want="$(cat pyproject.toml requirements/*.txt scripts/_env.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # pip runs quietly: say what it is doing (the test venv, 2.1 GB, took 2 min 9 s
  # to build on the project's 2-core machine).
  started=$SECONDS
  echo "[set-up] installing jaxyolo[$extras] with its pinned dependencies (jax, flax, optax, ...)"
  python -m pip --disable-pip-version-check -q install -c requirements/lock.txt -e ".[$extras]"
  if [ -n "$with_oracles" ]; then
    echo "[set-up] installing the PyTorch oracles: torch 2.13.0 (CPU), ultralytics, yolov5, yolo9, yolox"
    # torch first: the CPU wheel the machine provides (yolox's sdist builds against it).
    python -m pip --disable-pip-version-check -q install "torch==2.13.0" -c requirements/lock.txt
    python -m pip --disable-pip-version-check -q install -c requirements/lock.txt -r requirements/oracle-runtime.txt
    python -m pip --disable-pip-version-check -q install --no-deps -r requirements/oracles.txt
    python -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation "yolox==0.3.0"
  fi
  echo "$want" > "$stamp"
  echo "[set-up] done in $((SECONDS - started)) s; later runs reuse $VENV until pyproject.toml or requirements/ change"
fi
export YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$VENV/ultralytics-config}"
