#!/usr/bin/env bash
# The documentation site (mkdocs-material; the API reference from the
# docstrings, the CLI reference from the argparse parsers):
#   bash scripts/docs.sh            build it strictly into site/ (non-zero exit on any warning)
#   bash scripts/docs.sh --serve    serve it at http://127.0.0.1:8000, rebuilt on every edit
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_env.sh" train,docs
export NO_MKDOCS_2_WARNING=1  # mkdocs-material's banner about its successor, printed on every build
if [ "${1:-}" = "--serve" ]; then
  shift
  exec mkdocs serve --strict "$@"
fi
exec mkdocs build --strict -d site "$@"
