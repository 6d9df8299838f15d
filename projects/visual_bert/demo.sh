#!/usr/bin/env bash
# The reference demo with MMF's own VisualBERT: generate the demo data set (region features,
# captions, VQA questions with 10 human answers), pre-train a tiny VisualBERT on the captions
# (masked LM), fine-tune it on VQA and print the official VQA accuracy on the demo's val split.
#   bash projects/visual_bert/demo.sh          # installs into .venv first if needed
#   DATA=../shared_data SAVE=../runs bash projects/visual_bert/demo.sh training.bf16=True   # extra args go to both runs
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
DATA=$(realpath -m "${DATA:-data}")
SAVE=$(realpath -m "${SAVE:-save/visual_bert_demo}")
if ! "$VENV/bin/python" -c "import mmf_multilevel.register" >/dev/null 2>&1; then
  bash scripts/install.sh
fi
"$VENV/bin/python" -m mmf_multilevel.datasets.generate --out "$DATA/demo" --num-images 1200
echo "== pre-training (masked LM on the demo captions) -> $SAVE/pretrain"
"$VENV/bin/mmf_run" config=projects/visual_bert/demo_pretrain.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/pretrain" training.progress_bar=False "$@"
echo "== VQA fine-tuning and evaluation -> $SAVE/vqa2"
"$VENV/bin/mmf_run" config=projects/visual_bert/demo_vqa2.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/vqa2" training.progress_bar=False \
  checkpoint.resume_file="$SAVE/pretrain/visual_bert_final.pth" checkpoint.resume_pretrained=True "$@"
"$VENV/bin/python" - "$SAVE/vqa2/train.log" <<'PY'
import re, sys
found = re.findall(r"val/vqa2/vqa_official_accuracy: ([0-9.]+)", open(sys.argv[1]).read())
if not found:
    sys.exit(f"no VQA accuracy in {sys.argv[1]}")
print(f"VQA accuracy (official metric, demo val split, best checkpoint): {100 * float(found[-1]):.2f} %")
PY
