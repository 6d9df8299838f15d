#!/usr/bin/env bash
# Installs everything (scripts/install.sh) and runs the whole test suite.
#   bash scripts/test.sh              # all tests, the slow end-to-end runs included
#   bash scripts/test.sh -m "not slow" tests/test_compat.py   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest "$@"
