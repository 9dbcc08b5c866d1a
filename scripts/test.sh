#!/usr/bin/env bash
# The test command: builds everything from nothing (venv, pinned jaxyolo, the
# PyTorch oracles) and runs the suite.  Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_env.sh" test oracles
# An oracle that cannot be imported is a failure, never a skip.
python -m jaxyolo.testing.oracles --check
python -m pytest -n "${JAXYOLO_TEST_WORKERS:-2}" --durations=30 "$@"
