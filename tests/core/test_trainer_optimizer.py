"""The trainer's fused Adam/AdamW: the same updates as torch's loop implementation, and left alone when asked."""
import mmf  # noqa: F401
import pytest
import torch
from omegaconf import OmegaConf

from mmf_multilevel.trainers.multilevel_trainer import fused_optimizer


def config(**params):
    return OmegaConf.create({"optimizer": {"type": "adam_w", "params": {"lr": 1e-3, **params}}})


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))


def groups(m):
    decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in m.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_fused_rebuild_keeps_groups_and_matches_the_loop_updates(cls):
    loop_model, fused_model = model(), model()
    loop = cls(groups(loop_model), lr=1e-3, eps=1e-6, foreach=False)
    fused = fused_optimizer(cls(groups(fused_model), lr=1e-3, eps=1e-6), config())
    assert type(fused) is cls and fused.defaults["fused"] is True
    assert [g["weight_decay"] for g in fused.param_groups] == [0.01, 0.0]
    assert all(g["eps"] == 1e-6 and g["lr"] == 1e-3 for g in fused.param_groups)
    torch.manual_seed(1)
    batches = [torch.randn(4, 6) for _ in range(5)]
    for x in batches:
        for m, opt in ((loop_model, loop), (fused_model, fused)):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = False
    for a, b, start in zip(loop_model.parameters(), fused_model.parameters(), model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved |= not torch.allclose(a, start)
    assert moved


def test_explicit_fused_or_foreach_setting_and_other_optimizers_are_left_alone():
    m = model()
    for params in ({"fused": False}, {"foreach": True}):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, **params)
        assert fused_optimizer(opt, config(**params)) is opt
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    assert fused_optimizer(sgd, config()) is sgd
    on_meta = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, device="meta"))], lr=1e-3)
    assert fused_optimizer(on_meta, config()) is on_meta  # no fused kernel for that device
