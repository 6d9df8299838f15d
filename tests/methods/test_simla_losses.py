"""SIMLA's pre-training losses against independent computations (explicit loops over tiny batches, CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmf_multilevel.methods.simla.losses import (
    distilled_token_loss,
    itc_loss,
    itm_labels,
    itm_loss,
    itm_pair_indices,
    mim_loss,
    mlm_loss,
    psl_loss,
    psl_targets,
    sample_hard_negatives,
)
from mmf_multilevel.methods.simla.momentum import FeatureQueues, MomentumCopies


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def log_softmax_row(values):
    top = max(values)
    log_z = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_z for v in values]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# ---------------------------------------------------------------------- ITC
def itc_by_the_papers_equations(img, txt, img_m, txt_m, q_img, q_txt, temp, alpha):
    """Eqs. 1-4 literally: (1 - α) L_itc + α L'_itc, with L_itc the one-hot cross-entropy and L'_itc the
    cross-entropy against the momentum distribution, each ½(i2t + t2i) averaged over the batch."""
    batch = len(img)
    text_candidates = txt_m + q_txt  # lists of vectors
    image_candidates = img_m + q_img
    hard = soft = 0.0
    for b in range(batch):
        for query, query_m, candidates in ((img[b], img_m[b], text_candidates), (txt[b], txt_m[b], image_candidates)):
            log_p = log_softmax_row([dot(query, c) / temp for c in candidates])
            p_m = [math.exp(v) for v in log_softmax_row([dot(query_m, c) / temp for c in candidates])]
            hard += -log_p[b] / 2
            soft += -sum(pm * lp for pm, lp in zip(p_m, log_p)) / 2
    return ((1 - alpha) * hard + alpha * soft) / batch


def test_itc_equals_equations_1_to_4():
    batch, dim, size = 3, 4, 5
    img, txt, img_m, txt_m = (unit(batch, dim, seed=s) for s in range(4))
    q_img, q_txt = unit(size, dim, seed=4).t(), unit(size, dim, seed=5).t()  # queues are (D, M)
    temp = torch.tensor(0.3, dtype=torch.float64)
    as_lists = [t.tolist() for t in (img, txt, img_m, txt_m, q_img.t(), q_txt.t())]
    for alpha in (0.0, 0.4, 1.0):
        out = itc_loss(img, txt, img_m, txt_m, q_img, q_txt, temp, alpha)
        expected = itc_by_the_papers_equations(*as_lists, 0.3, alpha)
        assert out.loss.item() == pytest.approx(expected, rel=1e-10)
        assert out.sim_i2t.shape == out.sim_t2i.shape == (batch, batch + size)
        torch.testing.assert_close(out.sim_i2t[:, :batch], img @ txt_m.t() / 0.3)
    # alpha = 0 is the plain cross-entropy with the pair on the diagonal of the batch block
    plain = itc_loss(img, txt, img_m, txt_m, q_img, q_txt, temp, 0.0)
    labels = torch.arange(batch)
    reference = (F.cross_entropy(plain.sim_i2t, labels) + F.cross_entropy(plain.sim_t2i, labels)) / 2
    torch.testing.assert_close(plain.loss, reference)


def test_itc_gradient_reaches_online_features_and_temperature_only():
    img, txt = unit(3, 4, seed=0).requires_grad_(), unit(3, 4, seed=1).requires_grad_()
    img_m, txt_m = unit(3, 4, seed=2).requires_grad_(), unit(3, 4, seed=3).requires_grad_()
    q = unit(6, 4, seed=4).t().clone().requires_grad_()
    temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    itc_loss(img, txt, img_m, txt_m, q, q, temp, 0.4).loss.backward()
    assert img.grad is not None and txt.grad is not None and temp.grad is not None
    assert img_m.grad is None and txt_m.grad is None and q.grad is None


def test_itc_with_image_ids_spreads_the_hard_target_over_same_image_candidates():
    img, txt, img_m, txt_m = (unit(3, 4, seed=s) for s in range(4))
    q = unit(2, 4, seed=4).t()
    ids, queue_ids = torch.tensor([7, 8, 7]), torch.tensor([8, 9])
    out = itc_loss(img, txt, img_m, txt_m, q, q, 0.5, 0.0, image_ids=ids, queue_ids=queue_ids)
    pool = [7, 8, 7, 8, 9]
    total = 0.0
    for b in range(3):
        positives = [j for j, i in enumerate(pool) if i == int(ids[b])]
        for sims in (out.sim_i2t, out.sim_t2i):
            log_p = log_softmax_row(sims[b].tolist())
            total += -sum(log_p[j] for j in positives) / len(positives) / 2
    assert out.loss.item() == pytest.approx(total / 3, rel=1e-10)
    with pytest.raises(ValueError, match=r"the queues must both be \(4, M\)"):
        itc_loss(img, txt, img_m, txt_m, q.t(), q.t(), 0.5, 0.0)
    with pytest.raises(ValueError, match="queue_ids"):
        itc_loss(img, txt, img_m, txt_m, q, q, 0.5, 0.0, image_ids=ids)


def test_a_few_steps_on_a_fixed_batch_lower_the_itc_loss():
    torch.manual_seed(0)
    images, texts = torch.randn(4, 6), torch.randn(4, 5)
    vision, text = nn.Linear(6, 8), nn.Linear(5, 8)
    momentum = MomentumCopies({"vision": vision, "text": text}, momentum=0.9)
    # a fixed queue of random negatives: enqueueing the same batch again and again would fill it with copies
    # of the positives
    queues = FeatureQueues(embed_dim=8, queue_size=16, generator=torch.Generator().manual_seed(0))
    temp = torch.tensor(0.1)
    optimizer = torch.optim.Adam([*vision.parameters(), *text.parameters()], lr=0.05)
    losses = []
    for _ in range(15):
        with torch.no_grad():
            momentum.update()
            img_m, txt_m = F.normalize(momentum["vision"](images), dim=-1), F.normalize(momentum["text"](texts), dim=-1)
        img, txt = F.normalize(vision(images), dim=-1), F.normalize(text(texts), dim=-1)
        loss = itc_loss(img, txt, img_m, txt_m, queues.image_queue, queues.text_queue, temp, 0.4).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5, losses


# ---------------------------------------------------------------------- ITM
def test_hard_negatives_are_never_the_pair_nor_the_same_image():
    sims = torch.randn(5, 9, generator=torch.Generator().manual_seed(0)) * 0.5
    ids = torch.tensor([0, 1, 0, 2, 3])
    g = torch.Generator().manual_seed(1)
    seen_text, seen_image = set(), set()
    for _ in range(200):
        neg_text, neg_image = sample_hard_negatives(sims, sims.flip(0), generator=g)
        assert neg_text.shape == neg_image.shape == (5,)
        for b in range(5):
            assert int(neg_text[b]) != b and int(neg_image[b]) != b
            seen_text.add((b, int(neg_text[b])))
            seen_image.add((b, int(neg_image[b])))
        neg_text, neg_image = sample_hard_negatives(sims, sims, image_ids=ids, generator=g)
        for b in range(5):
            assert int(ids[neg_text[b]]) != int(ids[b]) and int(ids[neg_image[b]]) != int(ids[b])
    assert len(seen_text) == len(seen_image) == 20  # every other item of the batch does get drawn
    with pytest.raises(ValueError, match="no allowed negative"):
        sample_hard_negatives(sims[:1], sims[:1])
    with pytest.raises(ValueError, match="no allowed negative"):
        sample_hard_negatives(sims[:2], sims[:2], image_ids=torch.tensor([4, 4]))


def test_hard_negatives_follow_softmax_of_the_batch_block_and_are_reproducible():
    sims = torch.tensor([[0.0, 1.0, 0.0, 50.0], [2.0, 0.0, 0.0, 50.0], [0.0, 0.0, 9.0, 50.0]])
    # the queue column (index 3) must never be drawn; row 0: p(1) = e / (e + 1), p(2) = 1 / (e + 1)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sims, sims, generator=g)[0] for _ in range(3000)])
    assert int(draws.max()) <= 2
    assert (draws[:, 0] == 1).float().mean().item() == pytest.approx(math.e / (math.e + 1), abs=0.03)
    assert (draws[:, 1] == 0).float().mean().item() == pytest.approx(math.exp(2) / (math.exp(2) + 1), abs=0.03)
    # a tiny temperature must not underflow the weights to an all-zero row
    tiny = torch.tensor([[1000.0, -1000.0], [-1000.0, 1000.0]])
    assert sample_hard_negatives(tiny, tiny)[0].tolist() == [1, 0]
    a = sample_hard_negatives(sims, sims, generator=torch.Generator().manual_seed(5))
    b = sample_hard_negatives(sims, sims, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_itm_pairs_labels_and_loss():
    neg_text, neg_image = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    text_index, image_index = itm_pair_indices(neg_text, neg_image)
    pairs = list(zip(text_index.tolist(), image_index.tolist()))
    assert pairs == [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0), (2, 0), (0, 1), (1, 2)]
    labels = itm_labels(3)
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert all((t == i) == bool(y) for (t, i), y in zip(pairs, labels.tolist()))
    logits = torch.randn(9, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = 0.0
    for row, matched in zip(logits.tolist(), [True] * 3 + [False] * 6):
        expected -= log_softmax_row(row)[1 if matched else 0]
    assert itm_loss(logits).item() == pytest.approx(expected / 9, rel=1e-10)
    with pytest.raises(ValueError, match=r"\(3B, 2\)"):
        itm_loss(torch.zeros(4, 2))


def test_a_few_steps_on_a_fixed_batch_lower_the_itm_loss():
    torch.manual_seed(0)
    images, texts = torch.randn(4, 6), torch.randn(4, 6)
    head = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2))
    sims = images @ texts.t()
    neg_text, neg_image = sample_hard_negatives(sims, sims.t(), generator=torch.Generator().manual_seed(0))
    text_index, image_index = itm_pair_indices(neg_text, neg_image)
    pairs = torch.cat([texts[text_index], images[image_index]], dim=1)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        loss = itm_loss(head(pairs))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.6, losses


# ---------------------------------------------------------------------- MLM / MIM
def distilled_by_loops(logits, labels, teacher, alpha):
    """(1 - α) mean(-log p[y]) + α mean(-Σ_v q_v log p_v) over labelled positions, position by position."""
    hard, soft, count = 0.0, 0.0, 0
    for b in range(logits.size(0)):
        for t in range(logits.size(1)):
            if int(labels[b, t]) == -100:
                continue
            log_p = log_softmax_row(logits[b, t].tolist())
            q = [math.exp(v) for v in log_softmax_row(teacher[b, t].tolist())]
            hard += -log_p[int(labels[b, t])]
            soft += -sum(qv * lv for qv, lv in zip(q, log_p))
            count += 1
    return (1 - alpha) * hard / count + alpha * soft / count


def test_mlm_distillation_equals_an_explicit_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 4], labels[1, 2] = 3, 6, 0
    for alpha in (0.0, 0.4):
        expected = distilled_by_loops(logits, labels, teacher, alpha)
        assert mlm_loss(logits, labels, teacher, alpha).item() == pytest.approx(expected, rel=1e-10)
    # unlabelled positions do not matter, and no labelled position gives 0, not NaN
    changed = logits.clone()
    changed[labels == -100] += 5.0
    assert mlm_loss(changed, labels, teacher, 0.4).item() == pytest.approx(mlm_loss(logits, labels, teacher, 0.4).item())
    none = mlm_loss(logits.requires_grad_(), torch.full((2, 5), -100), teacher, 0.4)
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="teacher_logits"):
        mlm_loss(logits, labels, None, 0.4)


def test_mim_distillation_over_masked_patches_only():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
    expected = distilled_by_loops(logits, labels, teacher, 0.4)
    assert mim_loss(logits, tokens, mask, teacher, 0.4).item() == pytest.approx(expected, rel=1e-10)
    other_tokens = tokens.masked_fill(~mask, 5 - 0)  # tokens at unmasked patches are not targets
    assert mim_loss(logits, other_tokens, mask, teacher, 0.4).item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="bool"):
        mim_loss(logits, tokens, mask.long(), teacher, 0.4)


@pytest.mark.parametrize("task", ["mlm", "mim"])
def test_a_few_steps_on_a_fixed_batch_lower_the_reconstruction_losses(task):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    head = nn.Linear(8, 11)
    momentum = MomentumCopies({"head": head}, momentum=0.9)
    tokens = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[True, False, True, True, False], [False, True, False, True, True]])
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        momentum.update()
        with torch.no_grad():
            teacher = momentum["head"](hidden)
        if task == "mlm":
            loss = mlm_loss(head(hidden), tokens.masked_fill(~mask, -100), teacher, 0.4)
        else:
            loss = mim_loss(head(hidden), tokens, mask, teacher, 0.4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


# ---------------------------------------------------------------------- PSL
CLS, SEP, PAD = 101, 102, 0


def attention_from_rows(rows):
    """(B, heads, L, L) probabilities whose [CLS] rows are ``rows`` (B, heads, L); other rows uniform."""
    rows = torch.tensor(rows, dtype=torch.float32)
    batch, heads, length = rows.shape
    attention = torch.full((batch, heads, length, length), 1.0 / length)
    attention[:, :, 0] = rows / rows.sum(-1, keepdim=True)
    return attention


def official_psl_targets_by_loops(attention, ids, vocab, k=4, labels=5, cls=CLS):
    """The official rule, written out: each head votes for its k most attended positions, the `labels`
    positions with the most votes give the target ids, the [CLS] id is cleared afterwards."""
    batch, heads, length, _ = attention.shape
    targets = torch.zeros(batch, vocab)
    for b in range(batch):
        votes = [0] * length
        for h in range(heads):
            row = attention[b, h, 0].tolist()
            for position in sorted(range(length), key=lambda j: -row[j])[:k]:
                votes[position] += 1
        for position in sorted(range(length), key=lambda j: -votes[j])[:labels]:
            targets[b, int(ids[b, position])] = 1
        targets[b, cls] = 0
    return targets


def test_psl_targets_official_rule():
    # distinct vote counts so the order is unambiguous: positions 1..5 get 3, 3-ties avoided below
    ids = torch.tensor([[CLS, 11, 12, 13, 14, 15, 16, SEP]])
    rows = [[[9, 8, 7, 1, 1, 1, 1, 6],
             [9, 8, 1, 7, 1, 1, 1, 6],
             [9, 8, 1, 1, 7, 1, 1, 6]]]  # votes: [CLS], 11 and [SEP] 3 each; 12, 13, 14 one each; 15, 16 none
    attention = attention_from_rows(rows)
    got = psl_targets(attention, ids, vocab_size=120, cls_token_id=CLS, replicate_official=True)
    # the top 5 counts are [CLS], 11, [SEP] and two of the one-vote positions; [CLS] is cleared afterwards
    assert got[0, [11, SEP]].tolist() == [1, 1] and got[0, CLS] == 0
    assert int(got[0, [12, 13, 14]].sum()) == 2 and int(got.sum()) == 4
    # votes, not attention mass, decide: in caption 0 [SEP] has the largest head-averaged attention but one
    # vote; 11 and 13 have two each. Caption 1: 22 (3 votes) and [SEP] (2 votes) - the official rule keeps [SEP]
    ids = torch.tensor([[CLS, 11, 12, 13, 14, SEP], [CLS, 21, 22, 23, SEP, PAD]])
    rows = [[[1, 9, 8, 1, 1, 1], [1, 9, 1, 8, 1, 1], [1, 1, 1, 9, 1, 50]],
            [[1, 2, 9, 8, 1, 1], [1, 2, 9, 1, 8, 1], [1, 2, 9, 1, 8, 1]]]
    attention = attention_from_rows(rows)
    got = psl_targets(attention, ids, vocab_size=120, cls_token_id=CLS, k_per_head=2, num_labels=2,
                      replicate_official=True)
    assert [row.nonzero().flatten().tolist() for row in got] == [[11, 13], [22, SEP]]
    assert torch.equal(got, official_psl_targets_by_loops(attention, ids, 120, k=2, labels=2))


def test_psl_targets_default_excludes_special_and_padding_positions():
    ids = torch.tensor([[CLS, 21, 22, SEP, PAD, PAD],
                        [CLS, 31, 32, 33, 34, SEP]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    # heads attend mostly to [CLS], [SEP] and the padding, which must never become labels
    rows = [[[50, 1, 2, 40, 30, 30], [50, 2, 1, 40, 30, 30]],
            [[50, 1, 2, 3, 6, 40], [50, 6, 4, 1, 1, 40]]]
    targets = psl_targets(attention_from_rows(rows), ids, vocab_size=120, attention_mask=mask,
                          excluded_ids=(CLS, SEP, PAD), k_per_head=2, num_labels=3)
    # caption 0 has two content tokens: both, and nothing else (fewer labels than num_labels)
    assert targets[0].nonzero().flatten().tolist() == [21, 22]
    # the attention mask alone keeps the padding out, whatever id it holds
    unmasked_pad = psl_targets(attention_from_rows(rows), ids, vocab_size=120, attention_mask=mask,
                               excluded_ids=(CLS, SEP), k_per_head=2, num_labels=3)
    assert unmasked_pad[0].nonzero().flatten().tolist() == [21, 22]
    # caption 1: each head's two most attended content tokens are 34, 33 and 31, 32: one vote each; the tie
    # goes to the larger head-averaged attention (31 and 34: 3.5, 32: 3, 33: 2)
    assert targets[1].nonzero().flatten().tolist() == [31, 32, 34]
    # the official rule on the same maps picks [SEP] and padding ([PAD]) as labels
    official = psl_targets(attention_from_rows(rows), ids, vocab_size=120, cls_token_id=CLS, k_per_head=3,
                           num_labels=3, replicate_official=True)
    assert official[0].nonzero().flatten().tolist() == [PAD, SEP]


def test_psl_targets_votes_decide_before_attention_mass():
    ids = torch.tensor([[CLS, 5, 6, 7, SEP]])
    # position 1 is the top of two heads but small on average; position 2 is huge in one head only
    rows = [[[1, 1, 90, 1, 1], [1, 3, 0.1, 2.9, 1], [1, 3, 0.1, 2.9, 1]]]
    targets = psl_targets(attention_from_rows(rows), ids, vocab_size=120, excluded_ids=(CLS, SEP),
                          k_per_head=1, num_labels=1)
    assert targets[0].nonzero().flatten().tolist() == [5]


def test_psl_loss_equals_equations_8_and_9():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 6, generator=g, dtype=torch.float64) * 2
    targets = torch.zeros(2, 6, dtype=torch.float64)
    targets[0, [1, 4]] = 1
    targets[1, 2] = 1
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    for alpha in (0.0, 0.4):
        total = 0.0
        for b in range(2):
            hard = soft = 0.0
            for i in range(6):
                s, y, p_m = sigmoid(logits[b, i].item()), targets[b, i].item(), sigmoid(teacher[b, i].item())
                hard -= y * math.log(s) + (1 - y) * math.log(1 - s)
                soft -= p_m * math.log(s) + (1 - p_m) * math.log(1 - s)
            total += ((1 - alpha) * hard + alpha * soft) / 6
        assert psl_loss(logits, targets, teacher, alpha).item() == pytest.approx(total / 2, rel=1e-10)
    # the mixture of targets, (1 - α) y + α σ(p_m), gives the same loss
    mixed = F.binary_cross_entropy_with_logits(logits, 0.6 * targets + 0.4 * torch.sigmoid(teacher))
    torch.testing.assert_close(psl_loss(logits, targets, teacher, 0.4), mixed)


def test_a_few_steps_on_a_fixed_batch_lower_the_psl_loss():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(4, 8), dim=-1)
    head = nn.Linear(8, 30)
    momentum = MomentumCopies({"concept_head": head}, momentum=0.9)
    targets = torch.zeros(4, 30)
    for b, words in enumerate([[1, 2], [3], [4, 5, 6], [7]]):
        targets[b, words] = 1
    optimizer = torch.optim.Adam(head.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        momentum.update()
        with torch.no_grad():
            teacher = momentum["concept_head"](features)
        loss = psl_loss(head(features), targets, teacher, 0.4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.6, losses


def test_alpha_one_is_pure_distillation_and_the_checks_name_what_is_wrong():
    """α = 1 keeps only the momentum targets (no shortcut to the hard term); α above 1 is refused; a
    missing or misshapen teacher, and ITM logits of the wrong width, are refused even when the other
    condition holds."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.tensor([1, 0, -100, 4, 2, -100])
    keep = labels != -100
    soft = F.softmax(teacher[keep], dim=-1)
    expected = -(F.log_softmax(logits[keep], dim=-1) * soft).sum(-1).mean()
    torch.testing.assert_close(distilled_token_loss(logits, labels, teacher, 1.0), expected)
    targets = (torch.rand(6, 5) > 0.5).float()
    torch.testing.assert_close(psl_loss(logits, targets, teacher, 1.0),
                               F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher)))
    for alpha in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
            psl_loss(logits, targets, teacher, alpha)
    with pytest.raises(ValueError, match="psl_loss: alpha > 0 needs teacher_logits"):
        psl_loss(logits, targets, teacher[:, :4], 0.4)
    with pytest.raises(ValueError, match=r"itm_loss needs \(3B, 2\) logits"):
        itm_loss(torch.randn(6, 3))


def test_itc_names_the_misshapen_input_and_keeps_the_temperature_out_of_the_targets():
    """Every misshapen feature is named; queues of different sizes are refused; τ reaches the loss only
    through the student similarities (the momentum targets use it detached), and a plain float τ works."""
    img, txt, img_m, txt_m = (unit(3, 4, seed=s) for s in range(4))
    q_img, q_txt = unit(5, 4, seed=4).t(), unit(5, 4, seed=5).t()
    features = {"text_feat": txt, "image_feat_m": img_m, "text_feat_m": txt_m}
    for name in features:
        bad = dict(features, **{name: features[name][:, :3]})
        with pytest.raises(ValueError, match=rf"itc_loss: {name} has shape \(3, 3\), expected image_feat's \(3, 4\)"):
            itc_loss(img, bad["text_feat"], bad["image_feat_m"], bad["text_feat_m"], q_img, q_txt, 0.3, 0.4)
    with pytest.raises(ValueError, match=r"the queues must both be \(4, M\); got \(4, 5\) and \(4, 6\)"):
        itc_loss(img, txt, img_m, txt_m, q_img, unit(6, 4, seed=6).t(), 0.3, 0.4)

    alpha = 0.4
    temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    itc_loss(img, txt, img_m, txt_m, q_img, q_txt, temp, alpha).loss.backward()
    reference_temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    text_all, image_all = torch.cat([txt_m.t(), q_txt], 1), torch.cat([img_m.t(), q_img], 1)
    hard = torch.zeros(3, 8, dtype=torch.float64)
    hard[:, :3] = torch.eye(3, dtype=torch.float64)
    total = 0
    for query, query_m, candidates in ((img, img_m, text_all), (txt, txt_m, image_all)):
        targets = alpha * F.softmax(query_m @ candidates / 0.3, dim=1) + (1 - alpha) * hard
        total = total + -(F.log_softmax(query @ candidates / reference_temp, dim=1) * targets).sum(1).mean() / 2
    total.backward()
    torch.testing.assert_close(temp.grad, reference_temp.grad)
    as_float = itc_loss(img, txt, img_m, txt_m, q_img, q_txt, 0.3, alpha).loss
    torch.testing.assert_close(as_float, total.detach())


def test_teacher_probabilities_are_float32_and_losses_keep_the_logits_precision():
    """A bf16 teacher's softmax / sigmoid is taken in float32 (not rounded to bf16 first), and bf16
    student logits give bf16 losses (the targets follow the logits' dtype, as under autocast)."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(6, 50), torch.randn(6, 50).bfloat16()
    labels = torch.tensor([1, 0, -100, 4, 2, -100])
    keep = labels != -100
    soft = F.softmax(teacher[keep].float(), dim=-1)
    expected = 0.6 * F.cross_entropy(logits[keep], labels[keep]) + 0.4 * -(
        F.log_softmax(logits[keep], dim=-1) * soft).sum(-1).mean()
    torch.testing.assert_close(distilled_token_loss(logits, labels, teacher, 0.4), expected)
    targets = (torch.rand(6, 50) > 0.5).float()
    expected = 0.6 * F.binary_cross_entropy_with_logits(logits, targets) + 0.4 * F.binary_cross_entropy_with_logits(
        logits, torch.sigmoid(teacher.float()))
    torch.testing.assert_close(psl_loss(logits, targets, teacher, 0.4), expected)
    half = logits.bfloat16()
    assert distilled_token_loss(half, labels, teacher, 0.4).dtype == torch.bfloat16
    for alpha in (0.0, 0.4):
        assert psl_loss(half, targets, teacher, alpha).dtype == torch.bfloat16
