"""The VisualBERT reference demo (projects/visual_bert/demo.sh) end to end through the stock mmf_run, shortened."""
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers.mmf import ROOT, clean_env


@pytest.mark.slow
def test_demo_script_pretrains_finetunes_and_reports_vqa_accuracy(tmp_path):
    env = clean_env(tmp_path, VENV=os.path.dirname(os.path.dirname(sys.executable)), DATA=tmp_path / "data", SAVE=tmp_path / "save")
    short = ["training.max_updates=12", "training.evaluation_interval=6", "training.checkpoint_interval=6", "training.log_interval=6"]
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "projects", "visual_bert", "demo.sh"), *short],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert (tmp_path / "data" / "demo" / "manifest.json").is_file()
    pretrain, vqa = tmp_path / "save" / "pretrain", tmp_path / "save" / "vqa2"
    for folder in (pretrain, vqa):
        assert (folder / "current.ckpt").is_file() and (folder / "best.ckpt").is_file()
        assert (folder / "visual_bert_final.pth").is_file()
    log = (vqa / "train.log").read_text()
    # the fine-tune started from the pre-trained encoder, not from scratch
    assert "Copying model.bert.encoder.layer.0.attention.self.query.weight" in log
    pre = torch.load(pretrain / "visual_bert_final.pth", weights_only=True)
    assert any(k.startswith("model.bert.") for k in pre) and any(k.startswith("model.cls.") for k in pre)
    assert "masked_lm_loss" in (pretrain / "train.log").read_text()
    match = re.search(r"VQA accuracy \(official metric, demo val split, best checkpoint\): ([0-9.]+) %", result.stdout)
    assert match, result.stdout[-3000:]
    assert 0.0 <= float(match.group(1)) <= 100.0
    assert re.search(r"val/vqa2/vqa_official_accuracy: [0-9.]+", log)
