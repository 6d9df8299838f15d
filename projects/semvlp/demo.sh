#!/usr/bin/env bash
# SemVLP's main job in one command, on the generated demo set: pre-train a tiny, randomly initialised
# SemVLP on the demo captions (MLM, masked objects, image-text matching; single-stream updates, see
# projects/semvlp/demo/pretrain.yaml for why), fine-tune it on VQA with
# `mmf_run config=projects/semvlp/demo/vqa.yaml` and print the official VQA accuracy.
# With and without pre-training, next to MMF's VisualBERT: bash projects/semvlp/demo_compare.sh
#   bash projects/semvlp/demo.sh
#   DATA=../shared_data SAVE=../runs NUM_IMAGES=400 bash projects/semvlp/demo.sh training.max_updates=50
# Extra arguments go to both mmf_run calls.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
DATA=$(realpath -m "${DATA:-data}")
SAVE=$(realpath -m "${SAVE:-save/semvlp_demo}")
NUM_IMAGES=${NUM_IMAGES:-1200}
"$VENV/bin/python" -m mmf_multilevel.datasets.generate --out "$DATA/demo" --num-images "$NUM_IMAGES" --quiet
echo "== SemVLP pre-training (single-/two-stream 50/50) -> $SAVE/pretrain"
"$VENV/bin/mmf_run" config=projects/semvlp/demo/pretrain.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/pretrain" training.progress_bar=False "$@"
echo "== VQA fine-tuning and evaluation -> $SAVE/vqa"
"$VENV/bin/mmf_run" config=projects/semvlp/demo/vqa.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/vqa" training.progress_bar=False \
  checkpoint.resume_file="$SAVE/pretrain/semvlp_final.pth" checkpoint.resume_pretrained=True "$@"
"$VENV/bin/python" - "$SAVE/pretrain/train.log" "$SAVE/vqa/train.log" <<'PY'
import re, sys
modes = re.findall(r"semvlp modes: .*updates so far: single (\d+), two (\d+)", open(sys.argv[1]).read())
if modes:
    print(f"pre-training updates: single-stream {modes[-1][0]}, two-stream {modes[-1][1]}")
itm = re.findall(r"val/coco_captions/(?:single/|two/)?itm: ([0-9.]+)", open(sys.argv[1]).read())
if itm:
    print(f"pre-training image-text matching loss (val): {float(itm[-1]):.3f} (chance: ln 2 = 0.693)")
found = re.findall(r"val/vqa2/vqa_official_accuracy: ([0-9.]+)", open(sys.argv[2]).read())
if not found:
    sys.exit(f"no VQA accuracy in {sys.argv[2]}")
print(f"SemVLP VQA accuracy (official metric, demo val split, best checkpoint): {100 * float(found[-1]):.2f} %")
PY
echo "== one prediction on a demo val image (mmf_ml_predict), with its alignment picture"
read -r IMAGE_ID QUESTION < <("$VENV/bin/python" - "$DATA/demo/annotations/vqa_val.jsonl" <<'PY'
import json, sys
first = json.loads(open(sys.argv[1]).readline())
print(first["image_id"], first["question"])
PY
)
"$VENV/bin/mmf_ml_predict" --config projects/semvlp/demo/vqa.yaml --checkpoint "$SAVE/vqa/semvlp_final.pth" \
  --image "$DATA/demo/images/$IMAGE_ID.jpg" --image-id "$IMAGE_ID" --question "$QUESTION" \
  --picture "$SAVE/alignment.png" --html "$SAVE/alignment.html" env.data_dir="$DATA" > "$SAVE/prediction.json"
"$VENV/bin/python" - "$SAVE/prediction.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
print(f"question: {result['question']}")
print(f"answer: {result['answer']} (score {result['score']:.3f})")
print(f"alignment picture: {result['picture']}")
PY
