#!/usr/bin/env bash
# Installs mmf-multilevel, MMF and every dependency into a virtual environment.
#   bash scripts/install.sh            # -> .venv (VENV=path to choose another, PYTHON=python3.11 ...)
# MMF 1.0.0rc10 (the registry's only release) pins torch 1.5, so it is installed
# with --no-deps after our own pinned stack; the compatibility layer adapts it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
# torch first, pinned: an unpinned torch would resolve a multi-GB build from the registry
pip_install -c requirements/constraints.txt "torch==2.14.1" "torchvision==0.29.1"
pip_install -c requirements/constraints.txt -e ".[all]"
if ! "$VENV/bin/python" -m pip show -q mmf >/dev/null 2>&1; then
  pip_install --no-deps "mmf==1.0.0rc10"
fi
# MMF imports through the compatibility layer, with the import hook installed
"$VENV/bin/mmf_ml_doctor" >/dev/null
echo "mmf-multilevel installed in $VENV"
