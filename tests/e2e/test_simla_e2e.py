"""SIMLA's demo pre-training end to end through the stock mmf_run: projects/simla/demo/pretrain.yaml on
generated raw images (coco_captions_images, the masked_token processor, 64x64 random resized crops), CPU, a few
updates - the model's AdamW without the momentum copies, the EMA and α ramp pushed by the trainer, every loss
in the log for training and validation, a checkpoint carrying the momentum model and the filled queues."""
import json
import re
import subprocess
import sys

import pytest
import torch

from helpers.mmf import ROOT, TEST_PLUGIN, kill_when, run_mmf
from mmf_multilevel.datasets import generate as gen

pytestmark = pytest.mark.slow

UPDATES, BATCH = 4, 4
SHORT = [f"training.max_updates={UPDATES}", f"training.evaluation_interval={UPDATES}",
         f"training.checkpoint_interval={UPDATES}", "training.log_interval=1", f"training.batch_size={BATCH}",
         "training.progress_bar=False", "model_config.simla.queue_size=32", "model_config.simla.alpha_ramp_updates=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("simla_e2e")
    gen.generate(root / "demo", num_images=24, progress=False)
    return root


def test_demo_pretraining_logs_every_loss_and_checkpoints_the_momentum_model(data, tmp_path):
    save = tmp_path / "save"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT,
                     config=f"{ROOT}/projects/simla/demo/pretrain.yaml")
    assert "Finished run" in result.stdout + result.stderr
    assert (save / "current.ckpt").is_file() and (save / "simla_final.pth").is_file()
    log = (save / "train.log").read_text()
    assert "Optimizer: AdamW (the model's configure_optimizer)" in log
    for loss in ("itc", "itm", "mlm", "mim", "psl"):
        for split in ("train", "val"):
            values = re.findall(rf"{split}/coco_captions_images/{loss}: ([0-9.]+)", log)
            assert values and all(0.0 <= float(v) < 100.0 for v in values), (split, loss, log[-3000:])
    # α of each update (0-based index i: 0.4 · min(1, i / 2)); the queue advances by the batch every update
    lines = re.findall(r"simla: alpha ([0-9.]+), temp ([0-9.]+), queue pointer (\d+) of 32", log)
    assert [float(a) for a, _, _ in lines] == pytest.approx([0.0, 0.2, 0.4, 0.4]), lines
    assert [int(p) for _, _, p in lines] == [BATCH * (i + 1) for i in range(UPDATES)]
    state = torch.load(save / "simla_final.pth", weights_only=True)
    assert any(k.startswith("momentum.copies.visual_encoder.") for k in state)
    assert int(state["queues.queue_ptr"]) == UPDATES * BATCH
    assert not any("dvae" in k for k in state)
    # the momentum copy moved towards the online weights but is not equal to them (EMA 0.995)
    online, copy = state["heads.vision_proj.weight"], state["momentum.copies.vision_proj.weight"]
    assert not torch.equal(online, copy)


def test_a_run_killed_with_sigkill_resumes_where_an_uninterrupted_one_ends(data, tmp_path):
    """Killed with SIGKILL once its update-2 checkpoint exists and resumed with ``checkpoint.resume=True``: the
    momentum model, the queues, the online weights and the optimizer after update 6 equal those of one
    uninterrupted run (the EMA, α and the learning rate follow the pushed update; the checkpoint carries the copies
    and the queues)."""
    updates = 6
    common = [f"env.data_dir={data}", *SHORT, f"training.max_updates={updates}", "training.evaluation_interval=100",
              "training.checkpoint_interval=2", "training.trainer=test_rank_dump", f"env.user_dir={TEST_PLUGIN}"]
    config = f"{ROOT}/projects/simla/demo/pretrain.yaml"
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_mmf(tmp_path, f"env.save_dir={full}", *common, config=config)
    kill_when(tmp_path, killed / "models" / "model_2.ckpt", f"env.save_dir={killed}", *common, config=config,
              batch_sleep=0.5)
    assert not (killed / "models" / f"model_{updates}.ckpt").exists()
    run_mmf(tmp_path, f"env.save_dir={killed}", *common, "checkpoint.resume=True", config=config)
    ours = torch.load(full / "models" / f"model_{updates}.ckpt", weights_only=False)
    theirs = torch.load(killed / "models" / f"model_{updates}.ckpt", weights_only=False)
    assert int(theirs["model"]["queues.queue_ptr"]) == (updates * BATCH) % 32
    for key, value in ours["model"].items():
        assert torch.equal(theirs["model"][key], value), key
    first = ours["optimizer"]["state"]
    assert first and all(torch.equal(theirs["optimizer"]["state"][k]["exp_avg"], v["exp_avg"]) for k, v in first.items())


RECALLS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A tiny demo pre-training checkpoint (4 updates, queue of 32)."""
    save = tmp_path_factory.mktemp("simla_pre") / "save"
    run_mmf(save.parent, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT,
            config=f"{ROOT}/projects/simla/demo/pretrain.yaml")
    return save / "simla_final.pth"


def test_retrieval_fine_tuning_and_two_stage_ranking_agree_with_mmf_run(data, pretrained, tmp_path):
    """A few updates of projects/simla/demo/retrieval_coco.yaml from the pre-training checkpoint (the whole model
    copied in: encoders, heads, momentum model, queues); the val gallery ranked by mmf_run with eval_pairs=all
    equals the command's --all-pairs, and two-stage with k covering the gallery equals both."""
    save = tmp_path / "save"
    config = f"{ROOT}/projects/simla/demo/retrieval_coco.yaml"
    metrics = repr([f"retrieval_{k}" for k in RECALLS])  # MMF decodes overrides with literal_eval
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, "training.batch_size=8",
                     f"checkpoint.resume_file={pretrained}", "checkpoint.resume_pretrained=True",
                     "dataset_config.coco_retrieval_images.eval_pairs=all", f"evaluation.metrics={metrics}",
                     "training.early_stop.criteria=val/coco_retrieval_images/retrieval_rsum",
                     "training.early_stop.minimize=false", config=config)
    assert "Finished run" in result.stdout + result.stderr
    log = (save / "train.log").read_text()
    for loss in ("itc", "itm"):
        values = re.findall(rf"train/coco_retrieval_images/{loss}: ([0-9.]+)", log)
        assert values and all(0.0 < float(v) < 100.0 for v in values), (loss, log[-3000:])
    assert not re.search(r"train/coco_retrieval_images/(mlm|mim|psl)", log)
    for key in ("heads.itm_head.weight", "momentum.copies.text_proj.weight", "queues.image_queue"):
        assert f"Copying {key} from {key}" in log, key
    found = re.findall(r"val/coco_retrieval_images/retrieval_rsum: ([0-9.]+)", log)
    assert found, log[-3000:]
    checkpoint = save / "simla_final.pth"
    state = torch.load(checkpoint, weights_only=True)
    assert int(state["queues.queue_ptr"]) == (UPDATES * 8 + UPDATES * BATCH) % 32  # pre-training's 16, then 4 x 8
    outputs = {}
    for mode, extra in (("all_pairs", ["--all-pairs"]), ("two_stage", ["--k", "1000"]), ("itc", ["--itc-only"]),
                        ("two_stage_k1", ["--k", "1"])):
        out = tmp_path / f"{mode}.json"
        done = subprocess.run([sys.executable, "-m", "mmf_multilevel.methods.simla.retrieval", "--config", config,
                               "--checkpoint", str(checkpoint), "--split", "val", *extra, "--out", str(out),
                               f"env.data_dir={data}", "model_config.simla.queue_size=32"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[mode] = json.loads(out.read_text())
    assert outputs["all_pairs"]["rsum"] == pytest.approx(float(found[-1]), abs=0.01)
    for key in RECALLS:
        assert outputs["two_stage"][key] == pytest.approx(outputs["all_pairs"][key])
    gallery = outputs["all_pairs"]["pairs_fused"]
    assert outputs["two_stage"]["pairs_fused"] == gallery and outputs["itc"]["pairs_fused"] == 0
    assert 0 < outputs["two_stage_k1"]["pairs_fused"] < gallery


def test_zero_shot_ranking_of_the_pre_training_checkpoint(data, pretrained, tmp_path):
    """projects/simla/demo/zero_shot_flickr.yaml ranks the Flickr30K test gallery with the pre-training checkpoint,
    built as a retrieval model or as the pre-training model itself: the same figures."""
    outputs = {}
    for head in ("retrieval", "pretraining"):
        out = tmp_path / f"{head}.json"
        done = subprocess.run([sys.executable, "-m", "mmf_multilevel.methods.simla.retrieval", "--config",
                               f"{ROOT}/projects/simla/demo/zero_shot_flickr.yaml", "--checkpoint", str(pretrained),
                               "--out", str(out), f"env.data_dir={data}", "model_config.simla.queue_size=32",
                               f"model_config.simla.training_head_type={head}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "two_stage (k 16) on" in done.stdout and "rsum" in done.stdout
        outputs[head] = json.loads(out.read_text())
    assert outputs["retrieval"]["pairs_fused"] > 0
    for key in RECALLS:
        assert 0.0 <= outputs["retrieval"][key] <= (600.0 if key == "rsum" else 100.0)
        assert outputs["pretraining"][key] == pytest.approx(outputs["retrieval"][key])


def _grounding_accuracy(config_path, checkpoint, split, opts):
    """refcoco_accuracy of ``split`` recomputed from the functions: the checkpoint loaded strictly, the split's
    expressions in one batch, their proposals scored by ``grounding_scores``, the best one's IoU with the gold box."""
    from mmf.common.registry import registry

    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.datasets.base import init_fresh_processors
    from mmf_multilevel.evaluation.grounding import grounding_hits
    from mmf_multilevel.methods.base import load_method_model
    from mmf_multilevel.methods.simla.grounding import grounding_scores

    config = load_run_config(config_path, opts)
    model = load_method_model(config, "simla", str(checkpoint))
    dataset = registry.get_builder_class("refcoco_plus_images").dataset_class(
        "refcoco_plus_images", config.dataset_config.refcoco_plus_images, split)
    init_fresh_processors(dataset)
    batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
    batch.dataset_name, batch.dataset_type = "refcoco_plus_images", split
    with torch.no_grad():
        scores = grounding_scores(model, batch)
    hits = grounding_hits(scores.cpu(), batch.proposal_boxes.float(), batch.num_proposals, batch.gold_box.float())
    return float(hits.double().mean()), len(dataset)


def test_weakly_supervised_grounding_reports_the_grad_cam_accuracy(data, pretrained, tmp_path):
    """A few updates of projects/simla/demo/refcoco_plus_weak.yaml from the pre-training checkpoint: ITC and ITM
    on (image, expression) pairs logged, no box in training; refcoco_accuracy on val and test (testA) from the
    Grad-CAM of layer 0, equal to a recomputation from the checkpoint with grounding_scores."""
    save = tmp_path / "save"
    config = f"{ROOT}/projects/simla/demo/refcoco_plus_weak.yaml"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT, "training.batch_size=8",
                     "run_type=train_val_test", f"checkpoint.resume_file={pretrained}",
                     "checkpoint.resume_pretrained=True", config=config)
    assert "Finished run" in result.stdout + result.stderr
    log = (save / "train.log").read_text()
    for loss in ("itc", "itm"):
        values = re.findall(rf"train/refcoco_plus_images/{loss}: ([0-9.]+)", log)
        assert len(values) == UPDATES and all(0.0 <= float(v) < 100.0 for v in values), (loss, log[-3000:])
    assert "Copying heads.itm_head.weight from heads.itm_head.weight" in log
    for split in ("val", "test"):
        found = re.findall(rf"{split}/refcoco_plus_images/refcoco_accuracy: ([0-9.]+)", log)
        assert found, (split, log[-3000:])
        accuracy, count = _grounding_accuracy(config, save / "simla_final.pth", split,
                                              [f"env.data_dir={data}", "model_config.simla.queue_size=32"])
        assert count > 0 and float(found[-1]) == pytest.approx(accuracy, abs=1e-4), (split, found, accuracy)


def test_albef_layout_pre_training_and_flickr_retrieval_fine_tuning(data, tmp_path):
    """ALBEF on the same code (projects/simla/demo/pretrain_albef.yaml: 1 text + 1 fusion layer, ITC + ITM + MLM)
    through the stock mmf_run, then projects/simla/demo/retrieval_flickr.yaml from its checkpoint with the ALBEF
    layout: the text layer holds no cross-attention in either checkpoint."""
    pre = tmp_path / "albef"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={pre}", *SHORT,
                     config=f"{ROOT}/projects/simla/demo/pretrain_albef.yaml")
    assert "Finished run" in result.stdout + result.stderr
    log = (pre / "train.log").read_text()
    for loss in ("itc", "itm", "mlm"):
        assert re.findall(rf"val/coco_captions_images/{loss}: ([0-9.]+)", log), loss
    assert not re.search(r"coco_captions_images/(mim|psl)", log)
    state = torch.load(pre / "simla_final.pth", weights_only=True)
    assert any(".cross_attention.1." in k for k in state) and not any(".cross_attention.0." in k for k in state)

    save = tmp_path / "flickr"
    result = run_mmf(tmp_path, f"env.data_dir={data}", f"env.save_dir={save}", *SHORT,
                     f"checkpoint.resume_file={pre / 'simla_final.pth'}", "checkpoint.resume_pretrained=True",
                     "model_config.simla.layout=albef", "model_config.simla.fusion_layer=1",
                     config=f"{ROOT}/projects/simla/demo/retrieval_flickr.yaml")
    assert "Finished run" in result.stdout + result.stderr
    log = (save / "train.log").read_text()
    for loss in ("itc", "itm"):
        assert re.findall(rf"val/flickr30k_retrieval_images/{loss}: ([0-9.]+)", log), loss
    assert "Copying backbone.text_encoder.cross_attention.1.self.query.weight" in log
