#!/usr/bin/env bash
# SOHO's demo in one command, on the generated demo set: pre-train a tiny, randomly initialised SOHO
# (timm resnet10t, a 64-entry visual dictionary, 2 BERT blocks of width 64) on the demo captions from the
# raw images (MLM, MVM over the dictionary ids, image-text matching), fine-tune it on VQA with
# `mmf_run config=projects/soho/demo/vqa.yaml`, print the pre-training val losses, the dictionary's
# usage, the official VQA accuracy next to the majority-answer level, and draw the dictionary ids of a
# few val images (python -m mmf_multilevel.methods.soho.picture).
#   bash projects/soho/demo.sh
#   DATA=../shared_data SAVE=../runs NUM_IMAGES=400 bash projects/soho/demo.sh training.max_updates=50
#   SCRATCH=1 bash projects/soho/demo.sh      # also fine-tune VQA from scratch with the same budget
# Extra arguments go to every mmf_run call (and, as config overrides, to the picture). About 9 1/2 minutes on
# 2 CPU cores at this size (README, SOHO section: the measured figures).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
DATA=$(realpath -m "${DATA:-data}")
SAVE=$(realpath -m "${SAVE:-save/soho_demo}")
NUM_IMAGES=${NUM_IMAGES:-1200}
SCRATCH=${SCRATCH:-0}
"$VENV/bin/python" -m mmf_multilevel.datasets.generate --out "$DATA/demo" --num-images "$NUM_IMAGES" --quiet
echo "== SOHO pre-training (MLM + MVM + ITM) -> $SAVE/pretrain"
"$VENV/bin/mmf_run" config=projects/soho/demo/pretrain.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/pretrain" training.progress_bar=False "$@"
echo "== VQA fine-tuning from the pre-trained network and evaluation -> $SAVE/vqa"
"$VENV/bin/mmf_run" config=projects/soho/demo/vqa.yaml \
  env.data_dir="$DATA" env.save_dir="$SAVE/vqa" training.progress_bar=False \
  checkpoint.resume_file="$SAVE/pretrain/soho_final.pth" checkpoint.resume_pretrained=True "$@"
if [[ "$SCRATCH" != 0 ]]; then
  echo "== VQA fine-tuning from scratch (same budget) -> $SAVE/vqa_scratch"
  "$VENV/bin/mmf_run" config=projects/soho/demo/vqa.yaml \
    env.data_dir="$DATA" env.save_dir="$SAVE/vqa_scratch" training.progress_bar=False "$@"
fi
"$VENV/bin/python" - "$SAVE" "$DATA/demo" <<'PY'
import os
import sys

from mmf_multilevel.evaluation.demo import blind_levels, dictionary_usage, final_vqa_accuracy, last_losses

save, data = sys.argv[1:]
losses = last_losses(os.path.join(save, "pretrain"))
shown = ", ".join(f"{name} {losses[f'soho_coco_captions/{name}']:.3f}" for name in ("mlm", "mvm", "itm")
                  if f"soho_coco_captions/{name}" in losses)
print(f"pre-training, last val losses: {shown} (itm at chance: ln 2 = 0.693)")
usage = dictionary_usage(os.path.join(save, "pretrain"))
if usage:
    print(f"visual dictionary, last update: {usage['used']} of {usage['size']} entries used (perplexity "
          f"{usage['perplexity']:.1f}), never used in the run {usage['never_used']}")
levels = blind_levels(data)
print(f"SOHO VQA accuracy (official metric, demo val split, best checkpoint): "
      f"{final_vqa_accuracy(os.path.join(save, 'vqa')):.2f} % after pre-training")
if os.path.isdir(os.path.join(save, "vqa_scratch")):
    print(f"  from scratch, same fine-tuning budget: {final_vqa_accuracy(os.path.join(save, 'vqa_scratch')):.2f} %")
print(f"  majority answer ({levels['majority']['answer']!r}): {levels['majority']['vqa_accuracy']:.2f} %; the most "
      f"frequent answer per question text (a blind model): {levels['question_prior']['vqa_accuracy']:.2f} %")
PY
echo "== the visual dictionary's ids on 4 val images -> $SAVE/dictionary.png"
"$VENV/bin/python" -m mmf_multilevel.methods.soho.picture --checkpoint "$SAVE/pretrain/soho_final.pth" \
  --config projects/soho/demo/pretrain.yaml --dataset-split val --count 4 --out "$SAVE/dictionary.png" \
  env.data_dir="$DATA" "$@"
