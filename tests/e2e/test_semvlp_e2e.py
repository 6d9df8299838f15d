"""SemVLP's projects end to end through the stock mmf_run: tiny configs (projects/semvlp/demo/),
generated data, CPU, a few updates, checkpoint written, metric reported."""
import concurrent.futures
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from helpers.mmf import ROOT, clean_env, run_mmf
from mmf_multilevel.datasets import generate as gen

TASKS = {
    "vqa": r"val/vqa2/vqa_official_accuracy: [0-9.]+",
    "gqa": r"val/gqa/gqa_accuracy: [0-9.]+",
    "nlvr2": r"val/nlvr2/accuracy: [0-9.]+",
    "snli_ve": r"val/snli_ve/accuracy: [0-9.]+",
    "retrieval_flickr": r"val/flickr30k_retrieval/retrieval_rsum: [0-9.]+",
    "retrieval_coco": r"val/coco_retrieval/retrieval_rsum: [0-9.]+",
}
#: the paper's whole mix on the demo set (demo/pretrain.yaml itself pre-trains on captions, single-stream):
#: captions and questions, both modes, questions in image-text matching too
FULL_MIX = ["datasets=coco_captions,vqa2", "model_config.semvlp.mode_schedule=random", "dataset_config.vqa2.itm_probability=0.5"]
SHORT = ["training.max_updates=6", "training.evaluation_interval=6", "training.checkpoint_interval=6",
         "training.log_interval=2", "training.batch_size=8", "training.progress_bar=False"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("semvlp_e2e")
    gen.generate(root / "demo", num_images=40, progress=False, images=False)
    return root


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """One short demo pre-training run, shared by the fine-tuning tests."""
    work = tmp_path_factory.mktemp("semvlp_pretrain")
    save = work / "save"
    # both datasets drawn alike, so 6 updates see captions and questions in both modes; every update
    # logged (MMF's meter records only the batches at log points)
    result = run_mmf(work, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, *FULL_MIX,
                     "training.dataset_size_proportional_sampling=False", "training.log_interval=1",
                     config=f"{ROOT}/projects/semvlp/demo/pretrain.yaml")
    return save, result


def _assert_finished(save, result):
    assert (save / "current.ckpt").is_file() and (save / "best.ckpt").is_file()
    assert (save / "semvlp_final.pth").is_file()
    assert "Finished run" in result.stdout + result.stderr


@pytest.mark.slow
def test_pretraining_runs_both_modes_and_logs_every_loss(pretrained):
    save, result = pretrained
    _assert_finished(save, result)
    log = (save / "train.log").read_text()
    assert re.search(r"semvlp network parameters: single-stream mode [0-9,]+, two-stream mode [0-9,]+", log)
    tallies = re.findall(r"semvlp modes: update (\d+) ran (single|two)-stream; updates so far: single (\d+), two (\d+)", log)
    assert tallies, log[-3000:]
    update, _, single, two = tallies[-1]
    assert int(update) == 6 and int(single) + int(two) == 6 and int(single) > 0 and int(two) > 0
    logged = set(re.findall(r"train/(\w+)/(single|two)/(\w+): ", log))
    # both modes ran and every loss of both datasets appears (not a subset: a mode or loss gone missing fails)
    assert {mode for _, mode, _ in logged} == {"single", "two"}, logged
    assert {(dataset, loss) for dataset, _, loss in logged} == {("coco_captions", k) for k in ("mlm", "mrfr", "mrc", "itm")} | {
        ("vqa2", k) for k in ("mlm", "mrfr", "mrc", "qa", "itm")}, logged
    # val losses are reported for both pre-training datasets
    assert re.search(r"val/coco_captions/single/itm: [0-9.]+", log) and re.search(r"val/vqa2/single/qa: [0-9.]+", log)
    state = torch.load(save / "semvlp_final.pth", weights_only=True)
    assert any(k.startswith("backbone.cross_attention.") for k in state) and any(k.startswith("heads.qa.") for k in state)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_fine_tunes_from_the_pretrained_network_and_evaluates(task, data, pretrained, tmp_path):
    pre_save, _ = pretrained
    save = tmp_path / "save"
    # GQA and NLVR2 fine-tune in two-stream mode (pooled o_IMG), the others single-stream (h_CLS)
    mode = "two" if task in ("gqa", "nlvr2") else "single"
    result = run_mmf(
        tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, f"model_config.semvlp.mode={mode}",
        f"checkpoint.resume_file={pre_save / 'semvlp_final.pth'}", "checkpoint.resume_pretrained=True",
        config=f"{ROOT}/projects/semvlp/demo/{task}.yaml",
    )
    log = (save / "train.log").read_text()
    assert re.search(TASKS[task], log), log[-3000:]
    _assert_finished(save, result)
    # the whole pre-trained network came along (and the ITM head for retrieval)
    assert "Copying backbone.text.bert.encoder.layer.0.attention.self.query.weight" in log
    assert "Copying backbone.cross_attention.2.self.query.weight" in log
    if task.startswith("retrieval"):
        assert "Copying itm_head.classifier.weight from heads.itm.classifier.weight" in log


@pytest.mark.slow
def test_pretraining_over_two_gloo_ranks(data, tmp_path):
    """MMF's distributed path (2 CPU processes, gloo): single-stream updates leave the cross-attention
    unused, which DDP accepts with find_unused_parameters (pretrain.yaml); both modes run."""
    import json

    from helpers.mmf import TEST_PLUGIN
    from mmf_multilevel.methods.semvlp import ModeSchedule

    save = tmp_path / "save"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, *FULL_MIX, "distributed.world_size=2",
                     "training.trainer=test_rank_dump", f"env.user_dir={TEST_PLUGIN}",
                     config=f"{ROOT}/projects/semvlp/demo/pretrain.yaml")
    _assert_finished(save, result)
    tallies = re.findall(r"updates so far: single (\d+), two (\d+)", (save / "train.log").read_text())
    assert tallies and sum(map(int, tallies[-1])) == 6
    # each rank recorded the mode it ran at every update: the two real processes agree, and both follow
    # the schedule of the pushed update index
    ranks = [json.loads((save / f"rank{r}_modes.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 6
    schedule = ModeSchedule("random", 0.5, 0)
    assert [mode for _, mode in ranks[0]] == schedule.modes(6) and {m for _, m in ranks[0]} == {"single", "two"}


@pytest.mark.slow
def test_demo_script_pretrains_finetunes_and_prints_the_vqa_accuracy(tmp_path):
    env = clean_env(tmp_path, VENV=os.path.dirname(os.path.dirname(sys.executable)), DATA=tmp_path / "data",
                    SAVE=tmp_path / "save", NUM_IMAGES=40)
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "demo.sh"), *SHORT],  # the README main job: projects/semvlp/demo.sh
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"pre-training updates: single-stream 6, two-stream 0", result.stdout)  # the demo: single-stream
    assert re.search(r"pre-training image-text matching loss \(val\): [0-9.]+ \(chance: ln 2 = 0.693\)", result.stdout)
    match = re.search(r"SemVLP VQA accuracy \(official metric, demo val split, best checkpoint\): ([0-9.]+) %", result.stdout)
    assert match, result.stdout[-3000:]
    assert 0.0 <= float(match.group(1)) <= 100.0
    # the main job ends with one prediction on a demo val question and its alignment picture
    first = json.loads((tmp_path / "data" / "demo" / "annotations" / "vqa_val.jsonl").read_text().splitlines()[0])
    assert f"question: {first['question']}" in result.stdout
    assert re.search(r"^answer: \S.* \(score -?[0-9.]+\)$", result.stdout, re.M)
    picture = re.search(r"^alignment picture: (.+)$", result.stdout, re.M).group(1)
    assert os.path.getsize(picture) > 1000 and picture.endswith("alignment.png")
    assert "Copying backbone.text.bert.encoder.layer.0" in (tmp_path / "save" / "vqa" / "train.log").read_text()


FULL_SIZE = ["pretrain", "pretrain_cc_sbu", "vqa", "gqa", "nlvr2", "snli_ve", "retrieval_flickr", "retrieval_coco"]


@pytest.mark.parametrize("project", FULL_SIZE)
def test_full_size_projects_build_the_documented_base_model(project):
    """Each full-size yaml, merged over the model defaults, builds (on the meta device, with the
    configured BERT-base sizes) the model its task needs, with the paper's hyper-parameters."""
    from mmf_multilevel.methods.semvlp.model import SemVLP

    path = os.path.join(ROOT, "projects", "semvlp", f"{project}.yaml")
    project_config = OmegaConf.load(path)
    for include in project_config.get("includes", []):
        project_config = OmegaConf.merge(OmegaConf.load(os.path.join(os.path.dirname(path), include)), project_config)
    config = OmegaConf.merge(OmegaConf.load(SemVLP.config_path()).model_config.semvlp,
                             project_config.model_config.semvlp)
    assert config.bert_model_name == "bert-base-uncased" and config.hidden_size == 768 and config.num_hidden_layers == 12
    assert project_config.training.trainer == "mmf_multilevel"
    config.bert_model_name = None  # no hub here: the same sizes, random init
    with torch.device("meta"):
        model = SemVLP(config)
        model.build()
    assert model.backbone.num_parameters("single") == 111_061_248
    if project.startswith("pretrain"):
        assert model.backbone.num_parameters("two") == 125_244_672
        assert project_config.training.batch_size == 256 and project_config.optimizer.params.lr == 1.0e-4
        assert config.pretraining.num_qa_answers == 9500 and config.pretraining.num_object_labels == 1600
        for name in ("coco_captions", "vg_captions", "vqa2", "gqa", "vgqa"):
            assert name in project_config.datasets.split(",")
            node = project_config.dataset_config[name]
            assert node.max_features == 100 and node.processors.text_processor.params.max_seq_length == 20
    else:
        assert project_config.checkpoint.pretrained_state_mapping.backbone == "backbone"


def test_ablation_configs_set_the_schedule_and_ls():
    folder = os.path.join(ROOT, "projects", "semvlp", "ablations")
    assert OmegaConf.load(os.path.join(folder, "pretrain_single_only.yaml")).model_config.semvlp.mode_schedule == "single"
    assert OmegaConf.load(os.path.join(folder, "pretrain_two_only.yaml")).model_config.semvlp.mode_schedule == "two"
    for ls in (0, 2, 4, 6, 8, 10, 12):
        node = OmegaConf.load(os.path.join(folder, f"pretrain_two_only_ls{ls}.yaml")).model_config.semvlp
        assert node.mode_schedule == "two" and node.cross_layer_start == ls


#: a 12-block model as narrow as possible, so every L_s of Figure 3 (0..12) exists on the demo
TINY_12 = {"num_hidden_layers": 12, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
ABLATIONS = os.path.join(ROOT, "projects", "semvlp", "ablations")


def _ablation_config(tmp_path, name, base, ablation):
    """``base`` (a demo config) with the model settings of the shipped ablation config ``ablation`` on
    the 12-block tiny model."""
    settings = OmegaConf.to_container(OmegaConf.load(os.path.join(ABLATIONS, ablation)).model_config.semvlp) if ablation else {}
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create({"includes": [os.path.join(ROOT, "projects", "semvlp", "demo", base)],
                                     "model_config": {"semvlp": {**settings, **TINY_12}}}), path)
    return path


@pytest.mark.slow
def test_every_ablation_pretrains_and_fine_tunes_with_its_own_ls(data, tmp_path):
    """Table 4 / Figure 3 on the demo: each ablation's pre-training config, then its fine-tuning config
    (two-stream-only with L_s = k: finetune_two_only_ls<k>_vqa.yaml; the others: vqa.yaml), end to end;
    the fine-tune takes every pre-trained cross-attention module, and the wrong L_s is refused."""
    quick = ["training.max_updates=1", "training.evaluation_interval=1", "training.checkpoint_interval=1",
             "training.batch_size=4", "training.progress_bar=False", f"env.data_dir={data}"]
    runs = [("pretrain_single_only.yaml", None), ("pretrain_two_only.yaml", None)] + [
        (f"pretrain_two_only_ls{k}.yaml", f"finetune_two_only_ls{k}_vqa.yaml") for k in (0, 2, 4, 6, 8, 10, 12)]

    def chain(pretrain, finetune):
        name = pretrain[:-5]
        pre_save, ft_save = tmp_path / name / "pre", tmp_path / name / "ft"
        run_mmf(tmp_path, f"env.save_dir={pre_save}", *quick, config=_ablation_config(tmp_path, f"{name}_pre", "pretrain.yaml", pretrain))
        run_mmf(tmp_path, f"env.save_dir={ft_save}", *quick, f"checkpoint.resume_file={pre_save / 'semvlp_final.pth'}",
                "checkpoint.resume_pretrained=True", config=_ablation_config(tmp_path, f"{name}_ft", "vqa.yaml", finetune))
        return name, pre_save, ft_save

    # two chains side by side (one per core: most of a tiny run is the interpreter starting)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda run: chain(*run), runs))
    for (name, pre_save, ft_save), (_, finetune) in zip(done, runs):
        state = torch.load(pre_save / "semvlp_final.pth", weights_only=True)
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("backbone.cross_attention.")})
        log = (ft_save / "train.log").read_text()
        assert re.search(r"val/vqa2/vqa_official_accuracy: [0-9.]+", log), name
        copied = sorted({int(b) for b in re.findall(r"Copying backbone\.cross_attention\.(\d+)\.self\.query\.weight", log)})
        assert copied == blocks, (name, copied, blocks)
        if finetune:
            k = int(name.rsplit("ls", 1)[1])
            assert blocks == list(range(k, 12)), name
            used = OmegaConf.load(ft_save / "config.yaml").model_config.semvlp
            assert used.mode == "two" and used.cross_layer_start == k, name
    # fine-tuning the L_s = 2 checkpoint with the L_s = 4 configs is refused, naming both layouts
    wrong = run_mmf(tmp_path, f"env.save_dir={tmp_path / 'wrong'}", *quick,
                    f"checkpoint.resume_file={tmp_path / 'pretrain_two_only_ls2' / 'pre' / 'semvlp_final.pth'}",
                    "checkpoint.resume_pretrained=True", check=False,
                    config=_ablation_config(tmp_path, "wrong", "vqa.yaml", "finetune_two_only_ls4_vqa.yaml"))
    output = wrong.stdout + wrong.stderr
    assert wrong.returncode != 0
    assert "checkpoint's two-stream layout is cross-attention in blocks 3..12 (L_s = 2" in output, output[-3000:]
    assert "this model's is cross-attention in blocks 5..12 (L_s = 4" in output
