"""SOHO's demo (projects/soho/demo.sh) at its default size: pre-training, VQA fine-tuning from it, the
figures it prints and the dictionary picture. About 10 minutes on 2 cores, so it is left out of the default
run:

    bash scripts/test.sh -m demo -k soho
"""
import os
import re
import subprocess
import sys

import pytest

from helpers.mmf import ROOT, clean_env
from mmf_multilevel.evaluation.demo import blind_levels, dictionary_usage, final_vqa_accuracy


@pytest.mark.slow
@pytest.mark.demo
def test_soho_demo_fine_tunes_vqa_above_the_majority_answer(tmp_path):
    env = clean_env(tmp_path, VENV=os.path.dirname(os.path.dirname(sys.executable)), DATA=tmp_path / "data",
                    SAVE=tmp_path / "save")
    result = subprocess.run(["bash", os.path.join(ROOT, "projects", "soho", "demo.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    save = tmp_path / "save"
    accuracy = final_vqa_accuracy(str(save / "vqa"))
    majority = blind_levels(str(tmp_path / "data" / "demo"))["majority"]["vqa_accuracy"]
    assert accuracy >= majority + 10.0, (accuracy, majority)
    assert f"{accuracy:.2f} % after pre-training" in result.stdout
    usage = dictionary_usage(str(save / "pretrain"))
    assert usage["size"] == 64 and usage["used"] > 2, usage  # the dictionary did not collapse onto an entry or two
    assert re.search(r"dictionary\.png: 4 images, \d+ of the dictionary's 64 entries", result.stdout), result.stdout[-3000:]
    assert (save / "dictionary.png").stat().st_size > 10_000


@pytest.mark.slow
def test_soho_demo_script_runs_short_and_prints_its_figures(tmp_path):
    """The same script on 24 images and a few updates (the default run): pre-training, fine-tuning from its
    checkpoint, the from-scratch run, every figure line and the picture."""
    short = ["training.max_updates=2", "training.evaluation_interval=2", "training.checkpoint_interval=2",
             "training.log_interval=1", "training.batch_size=4"]
    env = clean_env(tmp_path, VENV=os.path.dirname(os.path.dirname(sys.executable)), DATA=tmp_path / "data",
                    SAVE=tmp_path / "save", NUM_IMAGES="24", SCRATCH="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "projects", "soho", "demo.sh"), *short], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    out = result.stdout
    assert re.search(r"last val losses: mlm [0-9.]+, mvm [0-9.]+, itm [0-9.]+", out), out[-3000:]
    assert re.search(r"visual dictionary, last update: \d+ of 64 entries used", out), out[-3000:]
    accuracy = final_vqa_accuracy(str(tmp_path / "save" / "vqa"))
    assert f"{accuracy:.2f} % after pre-training" in out
    assert re.search(r"from scratch, same fine-tuning budget: [0-9.]+ %", out) and "majority answer" in out
    assert "Copying backbone" in (tmp_path / "save" / "vqa" / "train.log").read_text()  # the hand-over happened
    assert (tmp_path / "save" / "dictionary.png").stat().st_size > 1_000
