"""SOHO's projects end to end through the stock mmf_run: the tiny configs of projects/soho/demo/ on
generated raw images (pre-training on soho_coco_captions: four texts per image), CPU, a few updates -
the model's optimizer, the ResNet freeze, the learning-rate
steps and the dictionary update through the real trainer; a checkpoint written, VQA fine-tuned from it
with the official metric reported; two gloo ranks holding the same parameters and dictionary."""
import math
import re

import pytest
import torch

from helpers.mmf import ROOT, TEST_PLUGIN, run_mmf
from mmf_multilevel.datasets import generate as gen

pytestmark = pytest.mark.slow

SHORT = ["training.max_updates=4", "training.evaluation_interval=4", "training.checkpoint_interval=4",
         "training.log_interval=1", "training.batch_size=4", "training.progress_bar=False"]
#: frozen for the first 2 updates, learning rates / 10 after update 3
SCHEDULE = ["model_config.soho.freeze_resnet_updates=2", "model_config.soho.optimization.lr_steps=[3]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("soho_e2e")
    gen.generate(root / "demo", num_images=24, progress=False)
    return root


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    work = tmp_path_factory.mktemp("soho_pretrain")
    save = work / "save"
    result = run_mmf(work, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, *SCHEDULE,
                     config=f"{ROOT}/projects/soho/demo/pretrain.yaml")
    return save, result


def _assert_finished(save, result):
    assert (save / "current.ckpt").is_file() and (save / "soho_final.pth").is_file()
    assert "Finished run" in result.stdout + result.stderr


def test_pretraining_freezes_steps_and_moves_the_dictionary(pretrained):
    save, result = pretrained
    _assert_finished(save, result)
    log = (save / "train.log").read_text()
    assert "Optimizer: CompositeOptimizer (the model's configure_optimizer)" in log
    states = re.findall(r"soho visual dictionary: last update used (\d+) of 64 entries .*; ResNet (frozen|training)", log)
    assert [state for _, state in states] == ["frozen", "frozen", "training", "training"], states
    assert all(int(used) >= 1 for used, _ in states)
    # vd_init: feature_statistics - the random network's cells do not all fall on one or two entries
    assert int(states[0][0]) > 2, states
    rates = [float(x) for x in re.findall(r"progress: \d/4, train/total_loss.* lr: ([0-9.e-]+),", log)]
    assert rates == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3]), rates  # the SGD part's rate, stepped after update 3
    for loss in ("mlm", "mvm", "itm"):
        assert re.search(rf"train/soho_coco_captions/{loss}: [0-9.]+", log) and re.search(
            rf"val/soho_coco_captions/{loss}: [0-9.]+", log), loss
    state = torch.load(save / "soho_final.pth", weights_only=True)
    assert "backbone.dictionary.embedding" in state and state["backbone.dictionary.usage"].sum() > 0


def test_vqa_fine_tunes_from_the_pretrained_network(data, pretrained, tmp_path):
    pre_save, _ = pretrained
    save = tmp_path / "save"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT,
                     f"checkpoint.resume_file={pre_save / 'soho_final.pth'}", "checkpoint.resume_pretrained=True",
                     config=f"{ROOT}/projects/soho/demo/vqa.yaml")
    _assert_finished(save, result)
    log = (save / "train.log").read_text()
    assert re.search(r"val/vqa2_images/vqa_official_accuracy: [0-9.]+", log), log[-3000:]
    assert "Copying backbone.encoder.resnet.conv1.0.weight from backbone.encoder.resnet.conv1.0.weight" in log
    assert "Copying backbone.dictionary.embedding" in log
    pre = torch.load(pre_save / "soho_final.pth", weights_only=True)
    tuned = torch.load(save / "soho_final.pth", weights_only=True)
    # fine-tuning reads the features before the dictionary and leaves it as pre-training left it
    assert torch.equal(tuned["backbone.dictionary.embedding"], pre["backbone.dictionary.embedding"])


def test_pretraining_over_two_gloo_ranks(data, pretrained, tmp_path):
    """MMF's distributed path (2 CPU processes, gloo): the frozen ResNet leaves parameters without
    gradients (find_unused_parameters), the dictionary's statistics are all-reduced in synchronize: each
    update counts the cells of the whole global batch (2 images per rank), as one process does with the
    same global batch (4 images) - rank 0's own cells alone would count half."""
    save = tmp_path / "save"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, *SCHEDULE,
                     "distributed.world_size=2",
                     "training.trainer=test_rank_dump", f"env.user_dir={TEST_PLUGIN}",
                     config=f"{ROOT}/projects/soho/demo/pretrain.yaml", timeout=400)
    _assert_finished(save, result)
    ranks = [torch.load(save / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    single = torch.load(pretrained[0] / "soho_final.pth", weights_only=True)
    for key in ("backbone.dictionary.usage", "backbone.dictionary.last_counts"):
        assert ranks[0][key].sum() == single[key].sum() > 0, key


#: downstream project: (dataset, metrics with their upper bound, the copy of the pre-trained head it inherits)
DOWNSTREAM = {
    "nlvr2": ("nlvr2_images", {"accuracy": 1.0}, None),
    "snli_ve": ("snli_ve_images", {"accuracy": 1.0}, None),
    "retrieval_coco": ("coco_retrieval_images", {"retrieval_tr_r1": 100.0, "retrieval_ir_r10": 100.0,
                                                 "retrieval_rsum": 600.0}, r"Copying itm_head\.\S+ from heads\.itm\."),
    "retrieval_flickr": ("flickr30k_retrieval_images", {"retrieval_ir_r1": 100.0, "retrieval_rsum": 600.0},
                         r"Copying itm_head\.\S+ from heads\.itm\."),
}
#: smaller images than the demo's for the downstream runs (one update each is a full 16-image batch)
SMALL_IMAGES = ["size=96", "max_size=128"]


@pytest.mark.parametrize("project", sorted(DOWNSTREAM))
def test_downstream_project_fine_tunes_from_the_pretrained_network(project, data, pretrained, tmp_path):
    """projects/soho/demo/<project>.yaml (including projects/soho/<project>.yaml) through mmf_run from the
    pre-training checkpoint: 3 updates, evaluated with the task's metric, a finite value in its range."""
    dataset, metrics, copied = DOWNSTREAM[project]
    pre_save, _ = pretrained
    save = tmp_path / "save"
    images = [f"dataset_config.{dataset}.processors.image_processor.params.{split}.{opt}"
              for split in ("train", "eval") for opt in SMALL_IMAGES]
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, "training.max_updates=3",
                     "training.evaluation_interval=3", "training.checkpoint_interval=3", *images,
                     f"checkpoint.resume_file={pre_save / 'soho_final.pth'}", "checkpoint.resume_pretrained=True",
                     config=f"{ROOT}/projects/soho/demo/{project}.yaml")
    _assert_finished(save, result)
    log = (save / "train.log").read_text()
    assert "Copying backbone.encoder.resnet.conv1.0.weight from backbone.encoder.resnet.conv1.0.weight" in log
    if copied:
        assert re.search(copied, log), log[-3000:]
    # retrieval trains on the batch's t² pairs (the model's own loss, retrieval_in_batch), the others with MMF's loss
    train_loss = "itm" if project.startswith("retrieval") else "cross_entropy"
    assert re.search(rf"train/{dataset}/{train_loss}: [0-9.]+", log), log[-3000:]
    for metric, top in metrics.items():
        values = re.findall(rf"val/{dataset}/{metric}: ([-0-9.naife+]+)", log)
        assert values, (metric, log[-3000:])
        value = float(values[-1])
        assert math.isfinite(value) and 0.0 <= value <= top, (metric, value)


def test_vqa_fine_tunes_from_a_converted_official_checkpoint(data, tmp_path, capsys):
    """A checkpoint in the official release's key layout (sized as the demo model, ResNet-18) through
    the converter's CLI (``convert``), then the demo VQA project from it with the
    official network's options (pool_before_conv, no visual token type)."""
    from mmf_multilevel.methods.soho.checkpoints import main
    from mmf_multilevel.methods.soho.testing import official_layout_state

    state = official_layout_state(hidden=64, vd_size=64, vocab_size=128, intermediate=128, max_positions=64)
    torch.save({"meta": {"epoch": 40}, "state_dict": state}, tmp_path / "official.pth")
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "soho.pth")]) == 0
    assert "model_config.soho.pool_before_conv=true model_config.soho.visual_token_type=false" in capsys.readouterr().out
    save = tmp_path / "save"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, "training.max_updates=2",
                     "training.evaluation_interval=2", "training.checkpoint_interval=2",
                     "model_config.soho.backbone=resnet18", "model_config.soho.pool_before_conv=true",
                     "model_config.soho.visual_token_type=false",
                     *[f"dataset_config.vqa2_images.processors.image_processor.params.{split}.{opt}"
                       for split in ("train", "eval") for opt in SMALL_IMAGES],
                     f"checkpoint.resume_file={tmp_path / 'soho.pth'}", "checkpoint.resume_pretrained=True",
                     config=f"{ROOT}/projects/soho/demo/vqa.yaml")
    _assert_finished(save, result)
    log = (save / "train.log").read_text()
    assert "Copying backbone.encoder.resnet.layer4.1.conv2.weight from backbone.encoder.resnet.layer4.1.conv2.weight" in log
    assert "Copying backbone.encoder.proj.bias from backbone.encoder.proj.bias" in log
    assert re.search(r"val/vqa2_images/vqa_official_accuracy: [0-9.]+", log), log[-3000:]
    tuned = torch.load(save / "soho_final.pth", weights_only=True)
    assert torch.equal(tuned["backbone.dictionary.embedding"], state["neck.vq.embed"])
