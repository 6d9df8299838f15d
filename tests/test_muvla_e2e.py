"""μ-VLA projects through the stock mmf_run on generated data: a few updates on CPU, a checkpoint
written and the evaluation metric reported."""
import re

import pytest

from conftest import ROOT, run_mmf
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
    gen.generate(root / "demo", num_images=40, progress=False, images=False)
    return root


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
