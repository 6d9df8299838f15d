"""SIMLA's VQA (answer generation) and SNLI-VE end to end through the stock mmf_run: the demo projects on generated
raw images, fine-tuned from a tiny demo pre-training checkpoint - the decoder started from the pre-trained
encoder's upper layer by the project's pretrained_state_mapping, the losses and the task metric in the log, the
accuracy above the majority-answer baseline."""
import collections
import json
import re

import pytest
import torch

from helpers.mmf import ROOT, run_mmf
from mmf_multilevel.datasets import generate as gen
from mmf_multilevel.processors.answers import accuracy_from_matches, comparison_forms

pytestmark = pytest.mark.slow

SHORT = ["training.log_interval=10", "training.progress_bar=False", "model_config.simla.queue_size=32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("simla_tasks_e2e")
    gen.generate(root / "demo", num_images=60, progress=False)
    return root


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A tiny demo pre-training checkpoint (4 updates, queue of 32)."""
    save = tmp_path_factory.mktemp("simla_tasks_pre") / "save"
    run_mmf(save.parent, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, "training.max_updates=4",
            "training.evaluation_interval=4", "training.checkpoint_interval=4", "training.batch_size=4",
            config=f"{ROOT}/projects/simla/demo/pretrain.yaml")
    return save / "simla_final.pth"


def majority_vqa_accuracy(path):
    """The official accuracy of answering every question with the most frequent annotator answer of the split."""
    records = [json.loads(line) for line in open(path)]
    counts = collections.Counter(a for r in records for a in r["answers"])
    best = counts.most_common(1)[0][0]
    total = 0.0
    for record in records:
        forms, _ = comparison_forms(record["answers"])
        total += accuracy_from_matches([form == comparison_forms([best])[0][0] for form in forms])
    return 100.0 * total / len(records)


def fine_tune(data, checkpoint, tmp_path, project, updates, batch=16, name="save"):
    """``updates`` updates of ``projects/simla/demo/<project>.yaml`` from ``checkpoint`` through the stock mmf_run,
    evaluated at the end; returns the run's log."""
    save = tmp_path / name
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT,
                     f"training.max_updates={updates}", f"training.evaluation_interval={updates}",
                     f"training.checkpoint_interval={updates}", f"training.batch_size={batch}",
                     f"checkpoint.resume_file={checkpoint}", "checkpoint.resume_pretrained=True",
                     config=f"{ROOT}/projects/simla/demo/{project}.yaml")
    assert "Finished run" in result.stdout + result.stderr
    return (save / "train.log").read_text()


def test_vqa_generation_fine_tuning_from_the_pre_training_checkpoint(data, pretrained, tmp_path):
    log = fine_tune(data, pretrained, tmp_path, "vqa", 60)
    # decoder layer 1 from the tiny encoder's layer 1, online and momentum; the LM head from the MLM head
    for own, source in (("classifier.layers.1.attention.self.query.weight",
                         "backbone.text_encoder.text.bert.encoder.layer.1.attention.self.query.weight"),
                        ("classifier.cross_attention.1.self.key.weight", "backbone.text_encoder.cross_attention.1.self.key.weight"),
                        ("momentum.copies.classifier.layers.1.output.dense.weight",
                         "momentum.copies.text_encoder.text.bert.encoder.layer.1.output.dense.weight"),
                        ("classifier.lm.transform.dense.weight", "heads.mlm.transform.dense.weight")):
        assert f"Copying {own} from {source}" in log, own
    losses = [float(v) for v in re.findall(r"train/vqa2_images/vqa: ([0-9.]+)", log)]
    assert losses and all(0.0 < v < 100.0 for v in losses)
    accuracy = re.findall(r"val/vqa2_images/vqa_official_accuracy: ([0-9.]+)", log)
    assert accuracy, log[-3000:]
    majority = majority_vqa_accuracy(data / "demo" / "annotations" / "vqa_val.jsonl")
    assert 100.0 * float(accuracy[-1]) > majority + 5.0, (accuracy, majority)
    state = torch.load(tmp_path / "save" / "simla_final.pth", weights_only=True)
    assert "classifier.layers.1.attention.self.query.weight" in state and not any(k.startswith("heads.") for k in state)


def test_snli_ve_fine_tuning_from_the_pre_training_checkpoint(data, pretrained, tmp_path):
    log = fine_tune(data, pretrained, tmp_path, "snli_ve", 40)
    assert "Copying momentum.copies.text_encoder.cross_attention.0.self.query.weight from" in log
    assert re.findall(r"train/snli_ve_images/snli_ve: ([0-9.]+)", log)
    accuracy = re.findall(r"val/snli_ve_images/accuracy: ([0-9.]+)", log)
    labels = collections.Counter(json.loads(line)["label"]
                                 for line in open(data / "demo" / "annotations" / "snli_ve_val.jsonl"))
    majority = max(labels.values()) / sum(labels.values())
    assert accuracy and float(accuracy[-1]) > majority + 0.1, (accuracy, majority)


def test_nlvr2_text_assignment_then_fine_tuning(data, pretrained, tmp_path):
    """The text-assignment step reads the 12-layer (here 2-layer) pre-training checkpoint in the two-image layout
    (layer 1 written as layers 1 and 2); NLVR2 fine-tuning starts from its checkpoint, the momentum model from
    the loaded weights."""
    ta = tmp_path / "ta"
    log = fine_tune(data, pretrained, tmp_path, "nlvr2_text_assignment", 4, batch=8, name="ta")
    for layer in (1, 2):
        assert (f"Copying backbone.text_encoder.cross_attention.{layer}.self.query.weight from "
                "backbone.text_encoder.cross_attention.1.self.query.weight") in log
    assert "Copying classifier.vision_proj.weight from heads.vision_proj.weight" in log
    assert re.findall(r"val/coco_captions_images/nlvr2_assignment: ([0-9.]+)", log)
    state = torch.load(ta / "simla_final.pth", weights_only=True)
    assert "backbone.text_encoder.text.bert.encoder.layer.2.output.dense.weight" in state
    assert not any(k.startswith("momentum.") for k in state)

    log = fine_tune(data, ta / "simla_final.pth", tmp_path, "nlvr2", 6, batch=8, name="nlvr2")
    assert ("Copying momentum.copies.text_encoder.cross_attention.2.self.key.weight from "
            "backbone.text_encoder.cross_attention.2.self.key.weight") in log
    assert re.findall(r"val/nlvr2_images/nlvr2: ([0-9.]+)", log)
    accuracy = re.findall(r"val/nlvr2_images/accuracy: ([0-9.]+)", log)
    assert accuracy and 0.0 <= float(accuracy[-1]) <= 1.0
