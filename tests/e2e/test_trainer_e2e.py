"""End-to-end runs of the stock ``mmf_run`` with MMF's own visual_bert on synthetic data."""
import glob
import os
import re
import subprocess

import pytest
import torch

from helpers.mmf import TEST_PLUGIN, TINY_CONFIG, clean_env, console_script, kill_when

pytestmark = pytest.mark.slow

NO_DROPOUT = (
    "model_config.visual_bert.hidden_dropout_prob=0.0",
    "model_config.visual_bert.attention_probs_dropout_prob=0.0",
)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, exact=True, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], atol=atol, rtol=1e-4), (key, (a[key] - b[key]).abs().max())


def test_single_process_train_val_writes_checkpoints_and_reports_metric(tmp_path, mmf_run):
    save = tmp_path / "save"
    result = mmf_run(f"env.save_dir={save}", "training.tensorboard=True")
    out = result.stdout + result.stderr
    assert "Finished run" in out
    assert "Optimizer: AdamW (fused)" in out  # MMF's adam_w, rebuilt fused by the trainer
    accuracy = re.findall(r"val/synthetic_vl/accuracy: ([0-9.]+)", out)
    assert accuracy, out[-2000:]
    for name in ("current.ckpt", "best.ckpt", "visual_bert_final.pth", "models/model_12.ckpt", "config.yaml"):
        assert (save / name).exists(), name
    ckpt = load(save / "current.ckpt")
    # MMF's checkpoint keys, plus what exact resume needs; weights_only loading works
    for key in ("model", "optimizer", "num_updates", "current_epoch", "config", "rng_states", "train_position"):
        assert key in ckpt
    assert ckpt["num_updates"] == 12
    assert not glob.glob(str(save / "**" / ".tmp-*"), recursive=True)
    events = glob.glob(str(save / "logs" / "**" / "events.out.tfevents*"), recursive=True)
    assert events, "tensorboard event file expected"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any("lr" in t for t in tags) and any("samples_per_s" in t for t in tags), tags


def test_ddp_two_cpu_processes_match_single_process_with_global_batch(tmp_path, mmf_run):
    common = ("training.trainer=test_rank_dump", f"env.user_dir={TEST_PLUGIN}", "training.max_updates=6") + NO_DROPOUT
    ddp = tmp_path / "ddp"
    out = mmf_run(f"env.save_dir={ddp}", "distributed.world_size=2", "training.batch_size=8", *common)
    assert "gloo" in out.stdout + out.stderr
    rank0, rank1 = load(ddp / "rank0.pt"), load(ddp / "rank1.pt")
    # gradients are all-reduced: both ranks hold the very same parameters
    assert_same_state(rank0, rank1, exact=True)

    # data parallelism over 2 x 4 samples == one process over the global batch of 8 ...
    single8 = tmp_path / "single8"
    mmf_run(f"env.save_dir={single8}", "training.batch_size=8", *common)
    assert_same_state(rank0, load(single8 / "rank0.pt"), exact=False)
    # ... and not one process over 4 samples (what an unsynchronised rank would see)
    single4 = tmp_path / "single4"
    mmf_run(f"env.save_dir={single4}", "training.batch_size=4", *common)
    diff = max((rank0[k] - v).abs().max().item() for k, v in load(single4 / "rank0.pt").items())
    assert diff > 1e-4


def test_gradient_accumulation_equals_large_batch(tmp_path, mmf_run):
    common = ("training.trainer=test_rank_dump", f"env.user_dir={TEST_PLUGIN}", "training.max_updates=6") + NO_DROPOUT
    acc = tmp_path / "acc"
    mmf_run(f"env.save_dir={acc}", "training.batch_size=4", "training.update_frequency=2", *common)
    big = tmp_path / "big"
    mmf_run(f"env.save_dir={big}", "training.batch_size=8", *common)
    assert_same_state(load(acc / "rank0.pt"), load(big / "rank0.pt"), exact=False)


def test_bf16_autocast_trains_on_cpu(tmp_path, mmf_run):
    save = tmp_path / "bf16"
    result = mmf_run(f"env.save_dir={save}", "training.bf16=True", "training.max_updates=24", "training.log_interval=2")
    losses = [float(x) for x in re.findall(r"train/total_loss: ([0-9.]+)", result.stdout + result.stderr)]
    assert len(losses) >= 6
    assert min(losses[-3:]) < losses[0]
    assert load(save / "current.ckpt")["num_updates"] == 24


def test_killed_run_resumes_to_identical_parameters(tmp_path, mmf_run):
    # dropout stays on: the resumed run must also continue the random streams exactly
    common = (
        "training.trainer=test_rank_dump",
        f"env.user_dir={TEST_PLUGIN}",
        "training.max_updates=14",
        "training.checkpoint_interval=4",
        "training.evaluation_interval=5",
        "training.lr_scheduler=True",
        "scheduler.type=warmup_linear",
        "scheduler.params.num_warmup_steps=3",
        "scheduler.params.num_training_steps=14",
    )
    full = tmp_path / "full"
    mmf_run(f"env.save_dir={full}", *common)

    killed = tmp_path / "killed"
    kill_when(tmp_path, killed / "models" / "model_8.ckpt", f"env.save_dir={killed}", *common, batch_sleep=0.15)
    assert not (killed / "models" / "model_14.ckpt").exists()
    position = load(killed / "current.ckpt")["train_position"]
    assert position["batch"] not in (0,), position  # killed in the middle of an epoch

    mmf_run(f"env.save_dir={killed}", "checkpoint.resume=True", *common)
    assert_same_state(load(full / "models" / "model_14.ckpt")["model"], load(killed / "models" / "model_14.ckpt")["model"])
    assert_same_state(load(full / "rank0.pt"), load(killed / "rank0.pt"))


def test_torchrun_starts_one_process_per_rank(tmp_path):
    save = tmp_path / "torchrun"
    args = [
        console_script("torchrun"),
        "--nproc_per_node=2",
        "--standalone",
        console_script("mmf_run"),
        f"config={TINY_CONFIG}",
        f"env.save_dir={save}",
        "training.trainer=test_rank_dump",
        f"env.user_dir={TEST_PLUGIN}",
        "training.max_updates=4",
    ]
    result = subprocess.run(args, cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_state(load(save / "rank0.pt"), load(save / "rank1.pt"))


def test_early_stopping_stops_every_rank_together(tmp_path, mmf_run):
    save = tmp_path / "early"
    # maximising the validation loss: it falls while training, so patience runs out early
    result = mmf_run(
        f"env.save_dir={save}",
        "distributed.world_size=2",
        "training.trainer=test_rank_dump",
        f"env.user_dir={TEST_PLUGIN}",
        "training.max_updates=60",
        "training.evaluation_interval=2",
        "training.early_stop.enabled=True",
        "training.early_stop.patience=1",
        "training.early_stop.criteria=total_loss",
        "training.early_stop.minimize=False",
        timeout=300,
    )
    assert "Early stopping activated" in result.stdout + result.stderr
    assert load(save / "current.ckpt")["num_updates"] < 60
    assert_same_state(load(save / "rank0.pt"), load(save / "rank1.pt"))
