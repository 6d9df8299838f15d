#!/usr/bin/env bash
# MVPTR's demo in one command, on the generated demo set: phrase concepts from the demo captions (the concept
# tool), pre-training of a tiny, randomly initialised MVPTR (MCR, VSC, WPG, MLM with chain masking, ITM), COCO-style
# retrieval fine-tuning from it and from scratch with the same budget, then the test gallery ranked three ways:
# two-stage (VSC top-k re-ranked by ITM), MVPTR-Uni (VSC alone) and every pair by ITM; VQA from the pre-trained
# network and from scratch (official accuracy next to the majority answer); a grounding picture of a val caption.
#   bash projects/mvptr/demo.sh
#   DATA=../shared_data SAVE=../runs NUM_IMAGES=400 bash projects/mvptr/demo.sh training.max_updates=50
# Extra arguments go to every mmf_run call. About 12 minutes on 2 CPU cores (README, MVPTR section: the figures).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
DATA=$(realpath -m "${DATA:-data}")
SAVE=$(realpath -m "${SAVE:-save/mvptr_demo}")
NUM_IMAGES=${NUM_IMAGES:-1200}
PY="$VENV/bin/python"
"$PY" -m mmf_multilevel.datasets.generate --out "$DATA/demo" --num-images "$NUM_IMAGES" --quiet
echo "== phrase concepts (tuples in >= 2 training captions) -> $DATA/demo/concepts"
"$PY" -m mmf_multilevel.methods.mvptr.concepts --captions "$DATA/demo/annotations/captions_train.jsonl" \
  --vocab "$DATA/demo/vocab/vocab.txt" --out "$DATA/demo/concepts" --min-count 2 > /dev/null
for split in train val test; do
  "$PY" -m mmf_multilevel.methods.mvptr.concepts --captions "$DATA/demo/annotations/retrieval_$split.jsonl" \
    --vocab "$DATA/demo/vocab/vocab.txt" --concepts "$DATA/demo/concepts/id2phrase.json" \
    --out "$DATA/demo/concepts/retrieval_$split" > /dev/null
  "$PY" -m mmf_multilevel.methods.mvptr.concepts --task vqa2 --captions "$DATA/demo/annotations/vqa_$split.jsonl" \
    --vocab "$DATA/demo/vocab/vocab.txt" --concepts "$DATA/demo/concepts/id2phrase.json" \
    --out "$DATA/demo/concepts/vqa_$split" > /dev/null
done
echo "== MVPTR pre-training -> $SAVE/pretrain"
"$VENV/bin/mmf_run" config=projects/mvptr/demo/pretrain.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/pretrain" training.progress_bar=False "$@"
echo "== retrieval fine-tuning from the pre-trained network -> $SAVE/retrieval"
"$VENV/bin/mmf_run" config=projects/mvptr/demo/retrieval_coco.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/retrieval" training.progress_bar=False \
  checkpoint.resume_file="$SAVE/pretrain/mvptr_final.pth" checkpoint.resume_pretrained=True "$@"
echo "== retrieval fine-tuning from scratch (same budget) -> $SAVE/retrieval_scratch"
"$VENV/bin/mmf_run" config=projects/mvptr/demo/retrieval_coco.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/retrieval_scratch" training.progress_bar=False "$@"
for run in vqa vqa_scratch; do
  echo "== VQA fine-tuning ($run) -> $SAVE/$run"
  from=()
  [[ $run == vqa ]] && from=(checkpoint.resume_file="$SAVE/pretrain/mvptr_final.pth" checkpoint.resume_pretrained=True)
  "$VENV/bin/mmf_run" config=projects/mvptr/demo/vqa.yaml env.data_dir="$DATA" env.save_dir="$SAVE/$run" \
    training.progress_bar=False "${from[@]}" "$@"
done
echo "== grounding picture of a val caption -> $SAVE/grounding.png"
"$PY" -m mmf_multilevel.methods.mvptr.picture --config projects/mvptr/demo/pretrain.yaml \
  --checkpoint "$SAVE/pretrain/mvptr_final.pth" --split train --index 0 --out "$SAVE/grounding.png" \
  --html "$SAVE/grounding.html" env.data_dir="$DATA" "$@" > /dev/null
"$PY" - "$SAVE" "$DATA/demo" <<'PY'
import os
import sys

from mmf_multilevel.evaluation.demo import blind_levels, final_vqa_accuracy, last_losses

save, data = sys.argv[1:]
levels = blind_levels(data)
print(f"VQA accuracy (official metric, demo val split, best checkpoint): "
      f"{final_vqa_accuracy(os.path.join(save, 'vqa')):.2f} % after pre-training, "
      f"{final_vqa_accuracy(os.path.join(save, 'vqa_scratch')):.2f} % from scratch; majority answer "
      f"{levels['majority']['vqa_accuracy']:.2f} %, most frequent answer per question text "
      f"{levels['question_prior']['vqa_accuracy']:.2f} %")
losses = last_losses(os.path.join(save, "pretrain"))
shown = ", ".join(f"{name} {losses[f'mvptr_captions/{name}']:.3f}" for name in ("mcr", "vsc", "itm", "mlm", "wpg")
                  if f"mvptr_captions/{name}" in losses)
print(f"pre-training, last val losses: {shown} (itm at chance: ln 2 = 0.693)")
PY
for run in retrieval retrieval_scratch; do
  for mode in "" --uni --all-pairs; do
    echo "-- $run ${mode:-two-stage} (test gallery)"
    "$PY" -m mmf_multilevel.methods.mvptr.retrieval --config projects/mvptr/demo/retrieval_coco.yaml \
      --checkpoint "$SAVE/$run/mvptr_final.pth" --split test $mode env.data_dir="$DATA" "$@" 2>/dev/null | tail -2
  done
done
