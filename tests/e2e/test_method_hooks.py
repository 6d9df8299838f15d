"""The method-level training hooks through the real trainer (``hook_probe`` in the test plugin uses
all of them): the method's own optimizer, the per-update progress and its freeze schedule, buffers
all-reduced across 2 gloo ranks equal to the one-process computation, and an exact resume after kill -9."""
import os
import re

import pytest
import torch

from helpers.mmf import TEST_PLUGIN, kill_when

pytestmark = pytest.mark.slow

PROBE = os.path.join(TEST_PLUGIN, "probe.yaml")
COMMON = (f"env.user_dir={TEST_PLUGIN}",)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_hooks_in_one_process_and_over_two_gloo_ranks(tmp_path, mmf_run):
    one, two = tmp_path / "one", tmp_path / "two"
    result = mmf_run(f"env.save_dir={one}", *COMMON, config=PROBE)
    log = result.stdout + result.stderr
    assert "Optimizer: CompositeOptimizer (the model's configure_optimizer)" in log
    moved = dict(re.findall(r"hook_probe: update (\d+) epoch \d+ cnn_moved (True|False)", log))
    # frozen for the first 3 updates, moving from the 4th; progress pushed for every update
    assert [moved[str(u)] for u in range(1, 7)] == ["False", "False", "False", "True", "True", "True"], moved
    assert re.search(r"hook_probe: update 10 epoch 2 ", log), "48 samples / batch 8 = 6 updates per epoch"
    mmf_run(f"env.save_dir={two}", *COMMON, "distributed.world_size=2", config=PROBE, timeout=300)
    rank0, rank1, single = load(two / "rank0.pt"), load(two / "rank1.pt"), load(one / "rank0.pt")
    for key in rank0:  # every rank holds the same parameters and the same all-reduced buffer
        assert torch.equal(rank0[key], rank1[key]), key
    # the all-reduced statistics of 2 ranks x 4 samples equal one process's over the same 8 samples
    assert single["feature_sum"].abs().sum() > 0
    torch.testing.assert_close(rank0["feature_sum"], single["feature_sum"], rtol=1e-9, atol=1e-9)
    for key in single:
        torch.testing.assert_close(rank0[key].double(), single[key].double(), rtol=1e-4, atol=1e-5)


def test_hooks_resume_exactly_after_kill_9(tmp_path, mmf_run):
    full, killed = tmp_path / "full", tmp_path / "killed"
    mmf_run(f"env.save_dir={full}", *COMMON, config=PROBE)
    kill_when(tmp_path, killed / "models" / "model_4.ckpt", f"env.save_dir={killed}", *COMMON, config=PROBE)
    assert not (killed / "models" / "model_10.ckpt").exists()
    ckpt = load(killed / "current.ckpt")
    assert set(ckpt["optimizer"]["parts"]) == {"cnn", "transformer"}  # both parts of the method's optimizer
    mmf_run(f"env.save_dir={killed}", "checkpoint.resume=True", *COMMON, config=PROBE)
    a, b = load(full / "rank0.pt"), load(killed / "rank0.pt")
    assert a.keys() == b.keys() and "feature_sum" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = load(full / "current.ckpt")["optimizer"], load(killed / "current.ckpt")["optimizer"]
    for part in ("cnn", "transformer"):
        for pid, state in opt_a["parts"][part]["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["parts"][part]["state"][pid][name]))
