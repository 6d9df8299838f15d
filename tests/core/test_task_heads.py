"""Shared task heads and in-batch hard-negative sampling, against independent computations."""
import pytest
import torch

from mmf_multilevel.modules.task_heads import (
    NLVR2PairedAttentionHead,
    NLVR2PairedHead,
    RegionScoringHead,
    sample_hard_negatives,
)


def test_paired_head_is_the_mlp_over_the_concatenation():
    torch.manual_seed(0)
    head = NLVR2PairedHead(8, dropout=0.0).eval()
    left, right = torch.randn(3, 8), torch.randn(3, 8)
    lin1, _, norm, lin2 = head.classifier
    x = torch.cat([left, right], dim=1) @ lin1.weight.t() + lin1.bias
    x = torch.nn.functional.gelu(x)
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(head(left, right), x @ lin2.weight.t() + lin2.bias)
    # the order of the images matters (left/right statements)
    assert not torch.allclose(head(left, right), head(right, left))
    with pytest.raises(ValueError, match="differ in shape"):
        head(left, right[:2])


def test_paired_attention_head_ignores_padding():
    torch.manual_seed(1)
    head = NLVR2PairedAttentionHead(8, num_heads=2, dropout=0.0).eval()
    left, right = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    lm, rm = torch.ones(2, 5, dtype=torch.long), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = head(left, right, lm, rm)
    changed = right.clone()
    changed[0, 3] += 100.0
    changed[1, 2:] -= 50.0
    torch.testing.assert_close(head(left, changed, lm, rm), out)
    assert out.shape == (2, 2)


def test_region_scoring_masks_padding():
    head = RegionScoringHead(6)
    scores = head(torch.randn(2, 4, 6), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert (scores[0, 2:] == -1e4).all() and (scores[1] > -1e4).all()


def test_hard_negatives_follow_the_softmax_and_skip_positives():
    sim = torch.tensor([[5.0, 4.0, 0.0, -9.0], [0.0, 5.0, 3.0, 0.0], [1.0, 1.0, 5.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(4000):
        neg_t, _ = sample_hard_negatives(sim, generator=g)
        counts[torch.arange(4), neg_t] += 1
    assert (counts.diagonal() == 0).all()
    expected = torch.softmax(sim.masked_fill(torch.eye(4, dtype=torch.bool), float("-inf")), dim=1)
    torch.testing.assert_close(counts / 4000, expected, atol=0.03, rtol=0)
    # two captions of image 7: never each other's negative
    ids = torch.tensor([7, 7, 8])
    for _ in range(50):
        neg_t, neg_i = sample_hard_negatives(torch.zeros(3, 3), ids, ids, generator=g)
        assert (ids[neg_t] != ids).all() and (ids[neg_i] != ids).all()
    with pytest.raises(ValueError, match="no non-matching candidate"):
        sample_hard_negatives(torch.zeros(2, 2), torch.tensor([1, 1]), torch.tensor([1, 1]))


def test_task_heads_are_bert_initialised():
    """N(0, initializer_range) weights, zero biases, unit LayerNorms, as every other head of the package."""
    torch.manual_seed(0)
    for head in (NLVR2PairedHead(64, initializer_range=0.02), RegionScoringHead(64, initializer_range=0.02),
                 NLVR2PairedAttentionHead(64, num_heads=2, initializer_range=0.02).classifier):
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                assert module.weight.std().item() == pytest.approx(0.02, rel=0.2) and (module.bias == 0).all()
            if isinstance(module, torch.nn.LayerNorm):
                assert (module.weight == 1).all() and (module.bias == 0).all()
