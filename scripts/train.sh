#!/usr/bin/env bash
# The main command: builds the venv if needed, then trains (defaults: the
# embedded shapes dataset, the YOLOv8 loss) and prints the val mAP@0.5 and
# mAP@0.5:0.95.  Arguments go to `jaxyolo train` (see `jaxyolo train --help`).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_env.sh" train
jaxyolo train "$@"
