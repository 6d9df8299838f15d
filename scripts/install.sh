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
# --- detectron2 for the region feature extractor (feature_extraction/, extra "extract") -------------
# No detectron2 wheel on the registry installs on Python 3.11; the pb1-detectron2 0.6 sdist carries
# detectron2's Python sources but not its C++ sources. We fetch that sdist by name, drop the C++
# extension from its setup.py and install the pure-Python package (Faster R-CNN C4 runs on
# torchvision's ROIAlign/NMS; mmf_multilevel/compat/detectron2.py covers the missing detectron2._C).
# pip >= 25 refuses this sdist's metadata (a direct-URL extra), so a pinned pip 24.3.1 does the fetch.
# Skipped when a detectron2 is already importable (e.g. one built from source).
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('detectron2') is None)" 2>/dev/null; then
  D2_TMP=$(mktemp -d)
  PIP_MAJOR=$("$VENV/bin/python" -c "import pip; print(pip.__version__.split('.')[0])")
  if [ "$PIP_MAJOR" -ge 25 ]; then
    pip_install --target "$D2_TMP/pip" "pip==24.3.1"
    D2_PIP=(env PYTHONPATH="$D2_TMP/pip" "$VENV/bin/python" -m pip)
  else
    D2_PIP=("$VENV/bin/python" -m pip)
  fi
  "${D2_PIP[@]}" download --disable-pip-version-check -q --no-deps --no-build-isolation -d "$D2_TMP" "pb1-detectron2==0.6"
  tar -xzf "$D2_TMP/pb1-detectron2-0.6.tar.gz" -C "$D2_TMP"
  "$VENV/bin/python" - "$D2_TMP/pb1-detectron2-0.6/setup.py" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
old = "ext_modules=get_extensions(),"
if old not in text:
    sys.exit(f"{path}: expected '{old}' in pb1-detectron2's setup.py; cannot install it without its C++ extension")
text = text.replace(old, "ext_modules=[],")
# formatting/caffe2-export tools the extractor never imports (keeps `pip check` clean)
for dev_only in ('"black==21.4b2",', '"future",  # used by caffe2', '"pydot",  # used to save caffe2 SVGs'):
    text = text.replace(dev_only, "")
open(path, "w").write(text)
PY
  pip_install --no-deps --no-build-isolation "$D2_TMP/pb1-detectron2-0.6"
  rm -rf "$D2_TMP"
fi
# -----------------------------------------------------------------------------------------------------
if ! "$VENV/bin/python" -m pip show -q mmf >/dev/null 2>&1; then
  pip_install --no-deps "mmf==1.0.0rc10"
fi
# The DALL·E package: the reference SIMLA's dVAE tokenizer is tested against (tests/methods/test_simla_vision.py).
# --no-deps: it declares mypy, pytest and blobfile, none of which dall_e.encoder imports (attrs comes with [test]).
if ! "$VENV/bin/python" -m pip show -q dall-e >/dev/null 2>&1; then
  pip_install --no-deps "dall-e==0.1"
fi
# Debian's chromium and its chromedriver: the headless browser the web page's end-to-end test drives
# (tests/predict/test_serve.py, through selenium). Installed with apt when missing and apt can run here
# (root, or sudo without a password); otherwise that one test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then APT=(apt-get); elif sudo -n true 2>/dev/null; then APT=(sudo -n apt-get); else APT=(); fi
  if [ ${#APT[@]} -gt 0 ]; then
    "${APT[@]}" update -q >/dev/null || true
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
      || echo "install.sh: apt could not install chromium; the browser test will be skipped" >&2
  else
    echo "install.sh: chromium is missing and apt needs root; the browser test will be skipped" >&2
  fi
fi
# MMF imports through the compatibility layer, with the import hook installed
"$VENV/bin/mmf_ml_doctor" >/dev/null
echo "mmf-multilevel installed in $VENV"
