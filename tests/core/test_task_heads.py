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


def _layer_norm(x, norm):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps) * norm.weight + norm.bias


def _mlp(x, classifier):
    lin1, _, norm, lin2 = classifier
    return _layer_norm(torch.nn.functional.gelu(x @ lin1.weight.t() + lin1.bias), norm) @ lin2.weight.t() + lin2.bias


def _cross_attention(query, keys, key_mask, attention):
    """Multi-head attention written out from the module's projections (no nn.MultiheadAttention)."""
    hidden, heads = query.shape[-1], attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.split(hidden)
    b_q, b_k, b_v = attention.in_proj_bias.split(hidden)

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, hidden // heads).transpose(1, 2)

    q, k, v = split(query @ w_q.t() + b_q), split(keys @ w_k.t() + b_k), split(keys @ w_v.t() + b_v)
    scores = q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5
    scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(query.shape)
    return out @ attention.out_proj.weight.t() + attention.out_proj.bias


def test_paired_attention_head_equals_a_hand_computation_with_padding_on_both_sides():
    """Each pair attends to the other's real tokens only; the attended sequences are mean-pooled over
    the pair's own real tokens (a row with one real token included); [left ; right] goes through the MLP."""
    torch.manual_seed(2)
    head = NLVR2PairedAttentionHead(8, num_heads=2, dropout=0.0).eval()
    left, right = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    lm = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    rm = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    att_left = _cross_attention(left, right, rm, head.attention)
    att_right = _cross_attention(right, left, lm, head.attention)

    def pool(states, mask):
        return torch.stack([states[i, mask[i].bool()].mean(0) for i in range(states.shape[0])])

    expected = _mlp(torch.cat([pool(att_left, lm), pool(att_right, rm)], dim=-1), head.classifier)
    torch.testing.assert_close(head(left, right, lm, rm), expected, atol=1e-5, rtol=1e-4)
    # padding of the left pair is invisible to the right pair's attention too
    changed = left.clone()
    changed[0, 4] += 100.0
    changed[1, 1:] -= 50.0
    torch.testing.assert_close(head(changed, right, lm, rm), head(left, right, lm, rm))


def test_task_head_defaults_are_bert_base_and_uniter():
    """Defaults: 12 attention heads, dropout 0.1 (in the attention and before the MLP), LayerNorm eps
    1e-12, N(0, 0.02) initialisation, two labels, the MLP's hidden width 2H (UNITER's paired heads)."""
    torch.manual_seed(0)
    paired = NLVR2PairedHead(96)
    attn = NLVR2PairedAttentionHead(96)
    scorer = RegionScoringHead(96)
    assert attn.attention.num_heads == 12 and attn.attention.dropout == 0.1 and attn.dropout.p == 0.1
    assert paired.dropout.p == 0.1
    for head in (paired, attn):
        lin1, _, norm, lin2 = head.classifier
        assert (lin1.in_features, lin1.out_features, lin2.out_features) == (192, 192, 2)
        assert norm.eps == 1e-12
    assert scorer.transform[2].eps == 1e-12
    for module in (paired, attn.classifier, scorer):
        weights = torch.cat([m.weight.flatten() for m in module.modules() if isinstance(m, torch.nn.Linear)])
        assert weights.std().item() == pytest.approx(0.02, rel=0.1)


def test_hard_negative_draws_follow_the_generator_and_refuse_unanswerable_queries():
    sim = torch.randn(64, 64)
    first = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(5))
    again = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(5))
    other = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(6))
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"non-square similarity \(2, 3\) needs image_ids"):
        sample_hard_negatives(torch.zeros(2, 3))
    # an image whose every candidate text is its own, or a text whose every candidate image is its own
    with pytest.raises(ValueError, match="no non-matching candidate"):
        sample_hard_negatives(torch.zeros(2, 2), torch.tensor([1, 2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="no non-matching candidate"):
        sample_hard_negatives(torch.zeros(2, 2), torch.tensor([1, 1]), torch.tensor([1, 2]))
    # a non-square batch with ids: two texts for each of three images
    ids, text_ids = torch.tensor([4, 5, 6]), torch.tensor([4, 4, 5, 5, 6, 6])
    neg_t, neg_i = sample_hard_negatives(torch.zeros(3, 6), ids, text_ids, generator=torch.Generator().manual_seed(0))
    assert neg_t.shape == (3,) and neg_i.shape == (6,)
    assert (text_ids[neg_t] != ids).all() and (ids[neg_i] != text_ids).all()
