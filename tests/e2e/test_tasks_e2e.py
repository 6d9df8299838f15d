"""Every downstream task through the stock mmf_run with a reference model, on generated data."""
import re

import pytest

from helpers.mmf import ROOT, run_mmf
from mmf_multilevel.datasets import generate as gen

TASKS = {
    "nlvr2": r"val/nlvr2/accuracy: [0-9.]+",
    "snli_ve": r"val/snli_ve/accuracy: [0-9.]+",
    "gqa": r"val/gqa/gqa_accuracy: [0-9.]+",
    "retrieval_coco": r"val/coco_retrieval/retrieval_rsum: [0-9.]+",
    "refcoco_plus": r"val/refcoco_plus/refcoco_accuracy: [0-9.]+",
    # LXMERT's QA mix: one classifier over VQA v2 + GQA + VG-QA
    "qa_pretrain": r"val/vqa2/logit_bce: [0-9.]+, val/gqa/logit_bce: [0-9.]+, val/vgqa/logit_bce: [0-9.]+",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks_e2e")
    gen.generate(root / "demo", num_images=40, progress=False, images=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_trains_and_evaluates_through_mmf_run(task, data, tmp_path):
    save = tmp_path / "save"
    result = run_mmf(
        tmp_path,
        f"env.data_dir={data}",
        f"env.save_dir={save}",
        "training.max_updates=6",
        "training.evaluation_interval=6",
        "training.checkpoint_interval=6",
        "training.log_interval=3",
        "training.batch_size=8",
        "training.progress_bar=False",
        config=f"{ROOT}/projects/visual_bert/demo/{task}.yaml",
    )
    log = (save / "train.log").read_text()
    assert re.search(TASKS[task], log), log[-3000:]
    assert (save / "current.ckpt").is_file() and (save / "best.ckpt").is_file()
    assert "Finished run" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, fmt, first_keys",
    [
        ("demo/nlvr2.yaml", "csv", "identifier,prediction"),
        ("demo/gqa.yaml", "json", ["questionId", "prediction"]),
        ("demo_vqa2.yaml", "json", ["question_id", "answer"]),
    ],
)
def test_prediction_files_in_the_official_formats(config, fmt, first_keys, data, tmp_path):
    import glob
    import json

    save = tmp_path / "save"
    run_mmf(
        tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", "training.max_updates=2", "training.batch_size=8",
        "run_type=train_inference", "evaluation.predict=True", f"evaluation.predict_file_format={fmt}",
        "training.progress_bar=False", config=f"{ROOT}/projects/visual_bert/{config}",
    )
    files = glob.glob(str(save / "**" / "reports" / f"*.{fmt}"), recursive=True)
    assert len(files) == 1, files
    text = open(files[0]).read()
    if fmt == "csv":
        rows = text.splitlines()
        assert rows[0] == first_keys and len(rows) > 1
        assert all(row.split(",")[1] in ("True", "False") for row in rows[1:])
    else:
        items = json.loads(text)
        assert items and sorted(items[0]) == sorted(first_keys)


@pytest.mark.slow
def test_retrieval_evaluation_over_two_ranks_equals_one(data, tmp_path):
    """The gallery's pairs are split over 2 gloo ranks; the metric gathers them: same recalls."""
    common = [f"env.data_dir={data}", "training.batch_size=8", "training.progress_bar=False"]
    config = f"{ROOT}/projects/visual_bert/demo/retrieval_coco.yaml"
    run_mmf(tmp_path, *common, f"env.save_dir={tmp_path / 'train'}", "training.max_updates=4",
            "training.evaluation_interval=4", "training.checkpoint_interval=4", config=config)
    values = {}
    for world in (1, 2):
        save = tmp_path / f"val{world}"
        run_mmf(tmp_path, *common, f"env.save_dir={save}", "run_type=val", f"distributed.world_size={world}",
                f"checkpoint.resume_file={tmp_path / 'train' / 'current.ckpt'}", config=config)
        found = re.findall(r"val/coco_retrieval/(retrieval_\w+): ([0-9.]+)", (save / "train.log").read_text())
        values[world] = dict(found)
    assert len(values[1]) == 7 and values[1] == values[2]
