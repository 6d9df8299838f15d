#!/usr/bin/env bash
# The main job in one command: install (if needed), generate the demo data set, pre-train a tiny
# SemVLP on the demo captions (MLM, masked objects, image-text matching), fine-tune it with
# `mmf_run config=projects/semvlp/demo/vqa.yaml` and print the official VQA accuracy.
#   bash scripts/demo.sh
#   DATA=../shared_data SAVE=../runs bash scripts/demo.sh training.bf16=True   # extra args go to both runs
# The four figures (SemVLP and MMF's VisualBERT, with and without pre-training): bash projects/semvlp/demo_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if ! "$VENV/bin/python" -c "import mmf_multilevel.register" >/dev/null 2>&1; then
  bash scripts/install.sh
fi
export VENV
exec bash projects/semvlp/demo.sh "$@"
