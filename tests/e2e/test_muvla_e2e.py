"""μ-VLA projects through the stock mmf_run on generated data: a few updates on CPU, a checkpoint
written and the evaluation metric reported."""
import json
import re
import subprocess
import sys

import pytest

from helpers.mmf import ROOT, run_mmf
from helpers.weak_corpus import offline_env, sbert_model_path
from mmf_multilevel.datasets import generate as gen

DOWNSTREAM = {
    "vqa": r"val/vqa2/vqa_official_accuracy: [0-9.]+",
    "nlvr2": r"val/nlvr2/accuracy: [0-9.]+",
    "snli_ve": r"val/snli_ve/accuracy: [0-9.]+",
    "refcoco_plus": r"val/refcoco_plus/refcoco_accuracy: [0-9.]+",
}

SHORT = ("training.max_updates=6", "training.evaluation_interval=6", "training.checkpoint_interval=6",
         "training.log_interval=3", "training.batch_size=8", "training.progress_bar=False")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("muvla_e2e")
    demo = root / "demo"
    gen.generate(demo, num_images=40, progress=False, images=False)
    return root


@pytest.fixture(scope="module")
def weak(data):
    """The demo's weak corpus from the real weak-corpus builder (all-MiniLM-L6-v2, spaCy), as the demo
    pre-training yaml documents it: the demo captions with their pairing dropped."""
    demo = data / "demo"
    with open(demo / "annotations" / "captions_train.jsonl") as f, open(demo / "corpus.txt", "w") as out:
        for line in f:
            out.write(json.loads(line)["caption"] + "\n")
    env = offline_env()
    subprocess.run([sys.executable, "-m", "mmf_multilevel.weak_corpus", "build", "--features",
                    str(demo / "features" / "regions.lmdb"), "--object-vocab", str(demo / "objects_vocab.txt"),
                    "--corpus", str(demo / "corpus.txt"), "--out", str(demo / "weak.jsonl"), "--sbert",
                    sbert_model_path(), "--device", "cpu"], check=True, env=env, capture_output=True, timeout=600)
    return data


def run(tmp_path, data, config, *extra):
    save = tmp_path / "save"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, *extra,
                     config=f"{ROOT}/projects/muvla/demo/{config}.yaml")
    return save, result


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(DOWNSTREAM))
def test_downstream_task_trains_and_evaluates_through_mmf_run(task, data, tmp_path):
    save, result = run(tmp_path, data, task)
    log = (save / "train.log").read_text()
    assert re.search(DOWNSTREAM[task], log), log[-3000:]
    assert (save / "current.ckpt").is_file() and (save / "best.ckpt").is_file()
    assert "Finished run" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("project", ["pretrain_cc", "pretrain_bc"])
def test_pretraining_on_the_weak_corpus_then_vqa_from_its_backbone(project, weak, tmp_path):
    pre_dir = tmp_path / "pre"
    pre_dir.mkdir()
    save, result = run(pre_dir, weak, project, "training.max_updates=8", "training.evaluation_interval=8",
                       "training.checkpoint_interval=8", "model_config.muvla.pretraining.itm_weight_start_update=4")
    log = (save / "train.log").read_text()
    for dataset, losses in (("muvla_region_tag", ("mlm", "mrc", "mrfr")), ("muvla_region_phrase", ("mlm", "mrtc")),
                            ("muvla_sentence_mlm", ("mlm",)), ("muvla_sentence_itm", ("itm",))):
        for loss in losses:
            assert re.search(rf"val/{dataset}/{loss}: [0-9.]+", log), (dataset, loss, log[-3000:])
    final = save / "muvla_final.pth"
    assert final.is_file() and "Finished run" in result.stdout + result.stderr
    # fine-tuning takes the backbone only
    vqa_dir = tmp_path / "vqa"
    vqa_dir.mkdir()
    save, result = run(vqa_dir, weak, "vqa", f"checkpoint.resume_file={final}", "checkpoint.resume_pretrained=True")
    out = result.stdout + result.stderr + (save / "train.log").read_text()
    assert "Copying backbone." in out and "Copying heads." not in out
    assert re.search(DOWNSTREAM["vqa"], out)


@pytest.mark.slow
@pytest.mark.parametrize("baseline,expected", [
    ("u_visualbert", ("val/muvla_region_tag/mrc", "val/muvla_text/mlm")),
    ("aligned_vlp", ("val/muvla_region_tag/mlm", "val/conceptual_captions/mlm", "val/conceptual_captions/itm")),
])
def test_baselines_pretrain_through_mmf_run(baseline, expected, weak, tmp_path):
    save, result = run(tmp_path, weak, baseline)
    log = (save / "train.log").read_text()
    for key in expected:
        assert re.search(rf"{key}: [0-9.]+", log), (key, log[-3000:])
    assert (save / "muvla_final.pth").is_file()


@pytest.mark.slow
def test_pretraining_over_two_gloo_processes(weak, tmp_path):
    """MMF's distributed path: each update's task differs in which heads it uses (find_unused_parameters)."""
    save, result = run(tmp_path, weak, "pretrain_cc", "distributed.world_size=2",
                       "model_config.muvla.pretraining.itm_weight_start_update=2")
    log = (save / "train.log").read_text()
    assert re.search(r"val/muvla_region_phrase/mrtc: [0-9.]+", log) and re.search(r"val/muvla_sentence_itm/itm: [0-9.]+", log)
    assert (save / "muvla_final.pth").is_file()
