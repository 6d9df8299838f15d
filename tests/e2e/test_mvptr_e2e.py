"""MVPTR's pre-training end to end through the stock mmf_run: the generated demo set, the real concept tool over
its training captions (as projects/mvptr/demo/pretrain.yaml documents), the tiny model of
projects/mvptr/demo/model.yaml, CPU, a few updates; every loss logged in training and validation, the
concept rows of the word table sized from id2phrase.json, a checkpoint written."""
import json
import re
import subprocess
import sys

import pytest
import torch

from helpers.mmf import ROOT, run_mmf
from mmf_multilevel.datasets import generate as gen

pytestmark = pytest.mark.slow

SHORT = ["training.max_updates=6", "training.evaluation_interval=6", "training.checkpoint_interval=6",
         "training.log_interval=3", "training.batch_size=8", "training.progress_bar=False"]
LOSSES = ("mcr", "vsc", "itm", "mlm", "wpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvptr_e2e")
    demo = root / "demo"
    gen.generate(demo, num_images=40, progress=False, images=False)
    subprocess.run([sys.executable, "-m", "mmf_multilevel.methods.mvptr.concepts", "--captions",
                    str(demo / "annotations" / "captions_train.jsonl"), "--vocab", str(demo / "vocab" / "vocab.txt"),
                    "--out", str(demo / "concepts"), "--min-count", "2"], check=True, capture_output=True, timeout=300)
    return root


def test_pretraining_logs_every_loss_and_writes_the_concept_table(data, tmp_path):
    save = tmp_path / "save"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT,
                     config=f"{ROOT}/projects/mvptr/demo/pretrain.yaml")
    assert "Finished run" in result.stdout + result.stderr
    log = (save / "train.log").read_text()
    for split in ("train", "val"):
        for loss in LOSSES:
            assert re.search(rf"{split}/mvptr_captions/{loss}: [0-9.]+", log), (split, loss, log[-3000:])
    # training captions carry phrases: WPG is a real hinge there (the val captions have none: 0)
    wpg = [float(v) for v in re.findall(r"train/mvptr_captions/wpg: ([0-9.]+)", log)]
    assert wpg and all(v > 0 for v in wpg)
    state = torch.load(save / "mvptr_final.pth", weights_only=True)
    table = state["backbone.bert.bert.embeddings.word_embeddings.weight"]
    concepts = json.loads((data / "demo" / "concepts" / "id2phrase.json").read_text())
    assert table.size(0) == max(74, max(int(k) for k in concepts) + 1)
    assert "heads.itm.classifier.weight" in state and "backbone.visual_layers.0.attention.self.query.weight" in state
