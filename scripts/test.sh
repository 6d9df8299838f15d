#!/usr/bin/env bash
# Installs everything (scripts/install.sh), runs the linter (ruff) and the whole test suite.
#   bash scripts/test.sh              # all tests, the slow end-to-end runs included
#   bash scripts/test.sh -m "not slow" tests/core/test_compat.py   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${VENV:-.venv}
# the linter first (ruff.toml): unused / undefined names, syntax errors, import order
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "$@"
