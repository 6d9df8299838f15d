#!/usr/bin/env bash
# Four figures in one command, on the generated demo set: official VQA accuracy (demo val split, best
# checkpoint) of SemVLP and of MMF's VisualBERT, each fine-tuned from scratch and after its demo
# pre-training, with the same fine-tuning budget; plus the majority-answer level.
#   bash projects/semvlp/demo_compare.sh
#   DATA=../shared_data SAVE=../runs MODELS=semvlp bash projects/semvlp/demo_compare.sh training.batch_size=32
# Extra arguments go to every mmf_run call; MODELS picks the models (default: semvlp visual_bert). Runs
# are skipped when their final checkpoint exists. The table is also written to $SAVE/report.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
DATA=$(realpath -m "${DATA:-data}")
SAVE=$(realpath -m "${SAVE:-save/demo_compare}")
NUM_IMAGES=${NUM_IMAGES:-1200}
MODELS=${MODELS:-semvlp visual_bert}
RUN="$VENV/bin/mmf_run"
"$VENV/bin/python" -m mmf_multilevel.datasets.generate --out "$DATA/demo" --num-images "$NUM_IMAGES" --quiet
common=(env.data_dir="$DATA" training.progress_bar=False)

run() {  # run <name> <final checkpoint file> <config> [args...]
  local name=$1 final=$2 config=$3
  shift 3
  if [[ -f "$SAVE/$name/$final" ]]; then
    echo "== $name: done before ($SAVE/$name)"
    return
  fi
  echo "== $name -> $SAVE/$name"
  "$RUN" config="$config" env.save_dir="$SAVE/$name" "${common[@]}" "$@" > "$SAVE/$name.out" 2>&1 \
    || { tail -n 40 "$SAVE/$name.out"; exit 1; }
}
mkdir -p "$SAVE"
if [[ " $MODELS " == *" semvlp "* ]]; then
  run semvlp_pretrain semvlp_final.pth projects/semvlp/demo/pretrain.yaml "$@"
  run semvlp_vqa semvlp_final.pth projects/semvlp/demo/vqa.yaml \
    checkpoint.resume_file="$SAVE/semvlp_pretrain/semvlp_final.pth" checkpoint.resume_pretrained=True "$@"
  run semvlp_vqa_scratch semvlp_final.pth projects/semvlp/demo/vqa.yaml "$@"
fi
if [[ " $MODELS " == *" visual_bert "* ]]; then
  run visual_bert_pretrain visual_bert_final.pth projects/visual_bert/demo_pretrain.yaml "$@"
  run visual_bert_vqa visual_bert_final.pth projects/visual_bert/demo_vqa2.yaml \
    checkpoint.resume_file="$SAVE/visual_bert_pretrain/visual_bert_final.pth" checkpoint.resume_pretrained=True "$@"
  run visual_bert_vqa_scratch visual_bert_final.pth projects/visual_bert/demo_vqa2.yaml "$@"
fi
"$VENV/bin/python" -m mmf_multilevel.evaluation.demo --save "$SAVE" --data "$DATA/demo"
