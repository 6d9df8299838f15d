"""Checks shared by the methods' head tests."""
import pytest
from torch import nn


def assert_bert_transform(transform: nn.Module, activation: type, eps: float, std: float, rel: float) -> None:
    """A ``BertPredictionHeadTransform`` built from a BERT config: its activation class, LayerNorm ε and the
    spread of its dense weights (drawn N(0, ``std``); ``rel`` sized to the number of draws)."""
    assert isinstance(transform.transform_act_fn, activation), type(transform.transform_act_fn)
    assert transform.LayerNorm.eps == eps
    assert transform.dense.weight.std().item() == pytest.approx(std, rel=rel)
