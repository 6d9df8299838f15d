"""MVPTR's losses (mmf_multilevel/methods/mvptr/losses.py), each against an independent computation on a
tiny batch written with loops and explicit formulas, and a few optimisation steps on a fixed batch
lowering each."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmf_multilevel.methods.mvptr.losses import (
    LOGIT_SCALE_MAX,
    hard_negatives,
    itm_loss,
    masked_token_loss,
    split_negatives,
    vsc_loss,
    wpg_loss,
    wpg_scores,
)

IGNORE = -100


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_masked_token_loss_is_the_mean_over_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1], labels[1, 3], labels[1, 4] = 2, 6, 0
    want = 0.0
    for (b, t), y in [((0, 1), 2), ((1, 3), 6), ((1, 4), 0)]:
        row = logits[b, t]
        want += math.log(sum(math.exp(v) for v in row.tolist())) - float(row[y])
    assert masked_token_loss(logits, labels).item() == pytest.approx(want / 3, rel=1e-5)
    none = masked_token_loss(logits.requires_grad_(), torch.full((2, 5), IGNORE))
    assert none.item() == 0.0 and none.requires_grad


def test_vsc_is_symmetric_infonce_with_the_clamped_scale():
    g = torch.Generator().manual_seed(1)
    text, image = _unit(torch.randn(4, 6, generator=g)), _unit(torch.randn(4, 6, generator=g))
    for log_scale, used in ((math.log(1 / 0.07), 1 / 0.07), (6.0, 100.0)):
        loss, sim = vsc_loss(text, image, torch.tensor(log_scale))
        want = 0.0
        for i in range(4):
            row = [used * float(text[i] @ image[k]) for k in range(4)]
            col = [used * float(text[k] @ image[i]) for k in range(4)]
            want += (math.log(sum(map(math.exp, row))) - row[i]) + (math.log(sum(map(math.exp, col))) - col[i])
        assert loss.item() == pytest.approx(want / 8, rel=1e-5)
        assert sim[1, 2].item() == pytest.approx(float(text[1] @ image[2]), abs=1e-6)
    unclamped, _ = vsc_loss(text, image, torch.tensor(6.0), max_log=None)
    assert unclamped.item() != pytest.approx(vsc_loss(text, image, torch.tensor(LOGIT_SCALE_MAX))[0].item())


def test_hardest_negatives_are_the_most_similar_other_image_and_text():
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.3],
                        [0.2, 0.9, 0.1, 0.7],
                        [0.6, 0.5, 0.9, 0.1],
                        [0.1, 0.4, 0.2, 0.9]])
    hard_image, hard_text = hard_negatives(sim, "hardest")
    assert hard_image.tolist() == [2, 3, 0, 1]  # per text (row), off the diagonal
    assert hard_text.tolist() == [2, 2, 0, 1]  # per image (column): column 1 -> 0.5 at text 2, ...
    # texts 0 and 2 show the same image: neither is the other's negative
    hard_image, hard_text = hard_negatives(sim, "hardest", image_ids=torch.tensor([7, 8, 7, 9]))
    assert hard_image.tolist() == [3, 3, 1, 1] and hard_text.tolist() == [1, 2, 3, 1]
    # one image in the whole batch: no negative at all
    hard_image, hard_text = hard_negatives(sim, "hardest", image_ids=torch.zeros(4, dtype=torch.long))
    assert hard_image.tolist() == [-1] * 4 and hard_text.tolist() == [-1] * 4


def test_sampled_negatives_follow_the_softmax_of_the_scaled_similarities():
    sim = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.0, 0.4], [0.3, 0.1, 1.0]])
    scale = torch.tensor(3.0)
    g = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.zeros(3, 3)
    for _ in range(draws // 50):
        for _ in range(50):
            image, _ = hard_negatives(sim, "sampled", scale=scale, generator=g)
            counts[torch.arange(3), image] += 1
    assert counts.diagonal().sum() == 0
    for i in range(3):
        others = [k for k in range(3) if k != i]
        weights = [math.exp(3.0 * float(sim[i, k])) for k in others]
        p = weights[0] / sum(weights)
        observed = counts[i, others[0]].item() / counts[i].sum().item()
        se = math.sqrt(p * (1 - p) / counts[i].sum().item())
        assert abs(observed - p) < 4 * se, (i, observed, p)


def test_random_negatives_are_uniform_over_the_other_images():
    sim = torch.tensor([[1.0, 0.9, -0.9], [0.2, 1.0, 0.4], [0.3, 0.1, 1.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        image, _ = hard_negatives(sim, "random", scale=torch.tensor(50.0), generator=g)
        counts[image[0]] += 1
    assert counts[0] == 0 and abs(counts[1].item() / 3000 - 0.5) < 4 * math.sqrt(0.25 / 3000)


def test_split_negatives_take_half_hard_images_half_hard_texts():
    hard_image = torch.tensor([3, 2, 1, 0, 5, 4])
    hard_text = torch.tensor([1, 0, 3, 2, 4, 5])
    text_index, image_index, anchored = split_negatives(hard_image, hard_text,
                                                        generator=torch.Generator().manual_seed(0))
    assert anchored.tolist() == [True] * 3 + [False] * 3
    assert text_index.numel() == 6
    pairs = list(zip(text_index.tolist(), image_index.tolist()))
    # the first half: texts with their hard image; the second: images with their hard text
    assert all(k == int(hard_image[t]) for t, k in pairs[:3])
    assert all(t == int(hard_text[k]) for t, k in pairs[3:])
    # every sample index is the anchor of exactly one negative
    anchors = [t for t, _ in pairs[:3]] + [k for _, k in pairs[3:]]
    assert sorted(anchors) == list(range(6))
    # another permutation, another split
    other, _, _ = split_negatives(hard_image, hard_text, generator=torch.Generator().manual_seed(5))
    assert other.tolist() != text_index.tolist()
    # a partner of -1 (no negative exists) leaves that pair out
    text_index, image_index, anchored = split_negatives(torch.tensor([1, -1, 3, 0]), torch.full((4,), -1),
                                                        generator=torch.Generator().manual_seed(0))
    assert (text_index >= 0).all() and (image_index >= 0).all() and anchored.all()
    assert text_index.numel() <= 2


def _wpg_reference(phrases, phrase_mask, regions, region_mask, pick):
    scores = []
    for p in range(phrases.size(0)):
        values = []
        for t in range(phrases.size(1)):
            if not phrase_mask[p, t]:
                continue
            sims = sorted((float(_unit(phrases[p, t]) @ _unit(regions[p, k])) for k in range(regions.size(1))
                           if region_mask[p, k]), reverse=True)
            values.append(pick(sims))
        scores.append(sum(values) / len(values) if values else 0.0)
    return scores


def test_wpg_score_is_the_mean_over_phrases_of_the_best_region():
    g = torch.Generator().manual_seed(2)
    phrases, regions = torch.randn(3, 6, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    phrase_mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0]])
    region_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    scores, has = wpg_scores(phrases, phrase_mask, regions, region_mask, "max")
    want = _wpg_reference(phrases, phrase_mask, regions, region_mask, lambda s: s[0])
    assert scores.tolist() == pytest.approx(want, abs=1e-5)
    assert has.tolist() == [True, False, True]


def test_wpg_rand_top3_picks_among_the_best_three_real_regions():
    g = torch.Generator().manual_seed(3)
    phrases, regions = torch.randn(2, 2, 5, generator=g), torch.randn(2, 5, 5, generator=g)
    phrase_mask = torch.ones(2, 2, dtype=torch.long)
    region_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # the second pair has only 2 regions
    seen = [set(), set()]
    for seed in range(60):
        scores, _ = wpg_scores(phrases[:, :1], phrase_mask[:, :1], regions, region_mask, "rand_top3",
                               generator=torch.Generator().manual_seed(seed))
        for p in range(2):
            seen[p].add(round(scores[p].item(), 5))
    top = [sorted((float(_unit(phrases[p, 0]) @ _unit(regions[p, k])) for k in range(5) if region_mask[p, k]),
                  reverse=True) for p in range(2)]
    assert seen[0] == {round(v, 5) for v in top[0][:3]}
    assert seen[1] == {round(v, 5) for v in top[1][:2]}


def test_wpg_loss_is_the_hinge_over_texts_with_phrases():
    positive = torch.tensor([0.5, 0.1, 0.9, 0.3])
    negative = torch.tensor([0.4, 0.6, 0.1, 0.0])
    valid = torch.tensor([True, True, True, False])
    want = (max(0, 0.2 + 0.4 - 0.5) + max(0, 0.2 + 0.6 - 0.1) + max(0, 0.2 + 0.1 - 0.9)) / 3
    assert wpg_loss(positive, negative, valid).item() == pytest.approx(want)
    assert wpg_loss(positive, negative, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_itm_loss_reads_index_one_as_matched():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    want = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-2.0))) / 2
    assert itm_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(want, rel=1e-5)


def test_a_few_steps_lower_vsc_and_wpg():
    torch.manual_seed(0)
    text_in, image_in = torch.randn(6, 8), torch.randn(6, 8)
    proj_t, proj_v = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.Adam([*proj_t.parameters(), *proj_v.parameters(), scale], lr=0.05)
    first = None
    for _ in range(30):
        loss, _ = vsc_loss(F.normalize(proj_t(text_in), dim=-1), F.normalize(proj_v(image_in), dim=-1), scale)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first

    phrases, regions = torch.randn(4, 3, 8), torch.randn(4, 5, 8)
    layer = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    mask_p, mask_r = torch.ones(4, 3), torch.ones(4, 5)
    first = None
    for _ in range(30):
        pos, valid = wpg_scores(layer(phrases), mask_p, regions, mask_r)
        neg, _ = wpg_scores(layer(phrases), mask_p, regions.roll(1, 0), mask_r)
        loss = wpg_loss(pos, neg, valid)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_draws_follow_the_given_generator_only():
    """Sampled negatives, the half/half split and rand_top3 depend on their generator alone (reproducible
    whatever the global RNG did), and a sampled negative is the multinomial draw of softmax(scale · sim)
    over the allowed entries (scale 1 when none is given)."""
    g = torch.Generator().manual_seed(4)
    sim = torch.randn(30, 30, generator=g) * 2
    outs = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # the global RNG differs between the two calls
        image, text = hard_negatives(sim, "sampled", generator=torch.Generator().manual_seed(7))
        order = split_negatives(image, text, generator=torch.Generator().manual_seed(7))
        scores, _ = wpg_scores(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)), torch.ones(2, 3),
                               torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(2)), torch.ones(2, 6),
                               "rand_top3", generator=torch.Generator().manual_seed(7))
        outs.append((image, text, order, scores))
    for a, b in zip(*outs):
        if isinstance(a, tuple):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
        else:
            assert torch.equal(a, b)
    image, text = outs[0][:2]
    assert image.dtype == torch.long and text.dtype == torch.long
    probs = torch.softmax(sim.masked_fill(torch.eye(30, dtype=torch.bool), float("-inf")), dim=1)
    want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).view(-1)
    assert torch.equal(image, want)


def test_wpg_edge_pairs_one_region_one_phrase_no_region():
    g = torch.Generator().manual_seed(5)
    phrases, regions = torch.randn(3, 4, 6, generator=g), torch.randn(3, 3, 6, generator=g)
    phrase_mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0]])
    region_mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]])  # one region; three; none
    for agg in ("max", "rand_top3"):
        scores, has = wpg_scores(phrases, phrase_mask, regions, region_mask, agg, generator=torch.Generator().manual_seed(0))
        only = [float(_unit(phrases[0, t]) @ _unit(regions[0, 0])) for t in range(2)]
        assert scores[0].item() == pytest.approx(sum(only) / 2, abs=1e-5)  # one region: it is the best of 1 and of 3
        assert has.tolist() == [True, True, False]  # one phrase counts; no region: no score
        assert scores[2].item() == 0.0
    # rand_top3 over two phrases picks per phrase among its own best three
    scores, _ = wpg_scores(phrases[1:2, :2], torch.ones(1, 2), regions[1:2], torch.ones(1, 3), "rand_top3",
                           generator=torch.Generator().manual_seed(3))
    options = [sorted(float(_unit(phrases[1, t]) @ _unit(regions[1, k])) for k in range(3)) for t in range(2)]
    assert any(abs(scores.item() - (a + b) / 2) < 1e-5 for a in options[0] for b in options[1])
