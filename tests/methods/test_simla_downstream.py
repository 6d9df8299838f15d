"""SIMLA's VQA (answer generation) and SNLI-VE heads: the losses and the ranking against independent
computations, the decoder's causality and initialisation, the registered model's wiring, the project's
``pretrained_state_mapping`` and a few steps on a fixed batch."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import BertConfig

from helpers.simla import rows_of
from helpers.spies import recorded
from helpers.stats import assert_rate
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.simla import model as simla_model
from mmf_multilevel.methods.simla import testing
from mmf_multilevel.methods.simla.downstream import (
    NOT_RANKED,
    AnswerDecoder,
    answer_sequence_loss,
    answer_targets,
    distilled_cross_entropy,
    rank_answers,
)
from mmf_multilevel.methods.simla.model import SIMLA
from mmf_multilevel.methods.simla.network import SIMLATextEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build(head_type, seed=0, **overrides):
    config = OmegaConf.merge(OmegaConf.load(SIMLA.config_path()).model_config.simla, testing.tiny_config(head_type),
                             overrides)
    torch.manual_seed(seed)
    model = SIMLA(config)
    model.build()
    return model


def decoder(seed=0, layers=2, first=1):
    torch.manual_seed(seed)
    return AnswerDecoder(BertConfig(**TINY), layers, first).eval()


def answers_and_states(seed=1, questions=3, length=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[2, 5, 3, 0], [2, 6, 7, 3], [2, 8, 3, 0], [2, 9, 10, 3], [2, 11, 3, 0]])
    mask = (ids > 0).long()
    states = torch.randn(questions, length, 32, generator=g)
    states_mask = torch.ones(questions, length, dtype=torch.long)
    states_mask[1, 3:] = 0
    return ids, mask, states, states_mask


# ---------------------------------------------------------------------- the decoder and its losses
def test_answer_sequence_loss_is_the_summed_next_token_nll_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    ids, mask, _, _ = answers_and_states()
    logits = torch.randn(ids.size(0), ids.size(1), 40, generator=g)
    teacher = torch.randn(ids.size(0), ids.size(1), 40, generator=g)
    got, got_soft = answer_sequence_loss(logits, ids, mask), answer_sequence_loss(logits, ids, mask, teacher, 0.4)
    for row in range(ids.size(0)):
        hard = soft = 0.0
        for t in range(1, ids.size(1)):
            if mask[row, t]:
                log_p = logits[row, t - 1].log_softmax(-1)
                hard -= float(log_p[ids[row, t]])
                soft -= float((teacher[row, t - 1].softmax(-1) * log_p).sum())
        assert math.isclose(float(got[row]), hard, rel_tol=1e-5)
        assert math.isclose(float(got_soft[row]), 0.6 * hard + 0.4 * soft, rel_tol=1e-5)


def test_answer_targets_weigh_each_distinct_in_list_answer_by_its_share():
    given = torch.tensor([[3, 3, 1, -1], [-1, -1, -1, -1], [0, 0, 0, 0]])
    question, answer, weights = answer_targets(given, weight=0.5)
    assert question.tolist() == [0, 0, 2] and answer.tolist() == [1, 3, 0]
    torch.testing.assert_close(weights, torch.tensor([0.5 / 3, 0.5 * 2 / 3, 0.5]))
    with pytest.raises(ValueError, match="answers_indices"):
        answer_targets(torch.tensor([1, 2]))


def test_decoder_is_causal_and_ignores_padding_but_reads_the_question_states():
    model = decoder()
    ids, mask, states, states_mask = answers_and_states(questions=5)
    out = model(ids, mask, states, states_mask)
    changed = ids.clone()
    changed[:, 2] = 12  # a later token cannot change earlier predictions
    torch.testing.assert_close(model(changed, mask, states, states_mask)[:, :2], out[:, :2])
    assert not torch.allclose(model(changed, mask, states, states_mask)[:, 2:], out[:, 2:])
    other_states = states.clone()
    other_states[1, 3:] = 100.0  # masked question positions are not read
    torch.testing.assert_close(model(ids, mask, other_states, states_mask), out)
    other_states[1, 0] += 1.0
    assert not torch.allclose(model(ids, mask, other_states, states_mask)[1], out[1])


def test_decoder_starts_from_the_encoders_upper_layers():
    torch.manual_seed(3)
    encoder = SIMLATextEncoder.from_config(BertConfig(**TINY))
    model = decoder(seed=4, layers=2, first=1)
    model.init_from_encoder(encoder)
    assert sorted(model.layers) == ["1", "2"]
    for n in ("1", "2"):
        for key, value in encoder.blocks[int(n)].state_dict().items():
            torch.testing.assert_close(model.layers[n].state_dict()[key], value)
        for key, value in encoder.cross_attention[n].state_dict().items():
            torch.testing.assert_close(model.cross_attention[n].state_dict()[key], value)
    torch.testing.assert_close(model.embeddings.word_embeddings.weight, encoder.word_embeddings.weight)
    assert model.lm.decoder.weight is model.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="decoder_from_layer"):
        decoder(layers=2, first=2).init_from_encoder(encoder)


@pytest.mark.parametrize("twice", [False, True])
def test_ranking_is_first_token_top_k_then_full_likelihood(twice):
    model = decoder()
    ids, mask, states, states_mask = answers_and_states()
    k = 3
    scores = rank_answers(model, states, states_mask, ids, mask, k, count_first_token_twice=twice)
    assert scores.shape == (3, ids.size(0))
    with torch.no_grad():
        for q in range(3):
            full, first = [], []
            for c in range(ids.size(0)):  # each candidate decoded on its own
                n = int(mask[c].sum())
                logits = model(ids[c:c + 1, :n], mask[c:c + 1, :n], states[q:q + 1], states_mask[q:q + 1])[0]
                log_p = [float(logits[t - 1].log_softmax(-1)[ids[c, t]]) for t in range(1, n)]
                first.append(log_p[0])
                full.append(sum(log_p) + (log_p[0] if twice else 0.0))
            top = sorted(range(len(first)), key=lambda c: -first[c])[:k]
            for c in range(ids.size(0)):
                want = full[c] if c in top else NOT_RANKED
                assert math.isclose(float(scores[q, c]), want, rel_tol=1e-4, abs_tol=1e-4), (q, c)


def test_distilled_cross_entropy_mixes_the_teachers_distribution():
    g = torch.Generator().manual_seed(2)
    logits, teacher = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    targets = torch.tensor([0, 2, 1, 1])
    hard = F.cross_entropy(logits, targets)
    soft = sum(-(teacher[b].softmax(-1) * logits[b].log_softmax(-1)).sum() for b in range(4)) / 4
    torch.testing.assert_close(distilled_cross_entropy(logits, targets, teacher, 0.4), 0.6 * hard + 0.4 * soft)
    torch.testing.assert_close(distilled_cross_entropy(logits, targets, teacher, 0.0), hard)


# ---------------------------------------------------------------------- the registered model
def test_task_models_build_no_pretraining_heads_and_keep_the_head_in_the_momentum_model():
    for head in ("vqa", "snli_ve"):
        model = build(head)
        assert model.heads is None and model.queues is None
        assert model.backbone.image_encoder.mask_token is None  # no MIM in fine-tuning
        assert set(model.momentum.names) == {"visual_encoder", "text_encoder", "classifier"}
        optimized = {id(p) for group in model.get_optimizer_parameters(None) for p in group["params"]}
        assert not optimized & {id(p) for p in model.momentum.parameters()}
        assert {id(p) for p in model.classifier.parameters()} <= optimized
        assert not any(k.startswith(("answer_ids", "answer_mask")) for k in model.state_dict())


def test_vqa_loss_and_scores_equal_a_recomputation_from_the_parts():
    model = build("vqa").train()
    model.on_update_start(TrainingProgress(update=5, epoch=0))
    model.alpha = 0.4
    with torch.no_grad():  # a momentum model that differs from the online one
        for p in model.momentum.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = testing.tiny_batch("vqa")
    torch.manual_seed(0)
    loss = model(batch)["losses"]["train/simla_contract/vqa"]
    image = model.backbone.image_encoder(batch.image)
    states = model.backbone.text_encoder.fuse(batch.input_ids, batch.input_mask, image)
    image_m = model.momentum["visual_encoder"](batch.image)
    states_m = model.momentum["text_encoder"].fuse(batch.input_ids, batch.input_mask, image_m)
    total = 0.0
    for q, answers in enumerate(batch.answers_indices.tolist()):
        given = [a for a in answers if a >= 0]
        for a in set(given):
            ids, mask = model.answer_ids[a:a + 1], model.answer_mask[a:a + 1]
            logits = model.classifier(ids, mask, states[q:q + 1], batch.input_mask[q:q + 1])
            teacher = model.momentum["classifier"](ids, mask, states_m[q:q + 1], batch.input_mask[q:q + 1])
            total = total + given.count(a) / len(given) * answer_sequence_loss(logits, ids, mask, teacher, 0.4)[0]
    torch.testing.assert_close(loss, total / batch.input_ids.size(0))
    model.eval()
    with torch.no_grad():
        scores = model(batch)["scores"]
        states = model.backbone.text_encoder.fuse(batch.input_ids, batch.input_mask,
                                                  model.backbone.image_encoder(batch.image))
        want = rank_answers(model.classifier, states, batch.input_mask, model.answer_ids, model.answer_mask, 3)
    torch.testing.assert_close(scores, want)
    assert int((scores > NOT_RANKED).sum(1).max()) == 3


def test_vqa_dataset_weight_and_single_answer_batches():
    model = build("vqa").train()
    model.alpha = 0.0
    batch = testing.tiny_batch("vqa", dataset_name="vgqa_images")
    batch.answers_indices = torch.tensor([[1] + [-1] * 9, [2] + [-1] * 9, [-1] * 10, [0] + [-1] * 9])
    torch.manual_seed(0)
    weighted = model(batch)["losses"]["train/vgqa_images/vqa"]
    del batch["answers_indices"]
    batch.answer_index = torch.tensor([1, 2, -1, 0])
    torch.manual_seed(0)
    single = model(batch)["losses"]["train/vgqa_images/vqa"]
    torch.testing.assert_close(single, weighted)
    batch.dataset_name = "vqa2_images"
    torch.manual_seed(0)
    torch.testing.assert_close(model(batch)["losses"]["train/vqa2_images/vqa"], 2 * weighted)


def test_snli_ve_loss_equals_the_distilled_cross_entropy_of_the_momentum_model():
    model = build("snli_ve").train()
    model.alpha = 0.4
    with torch.no_grad():
        for p in model.momentum.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = testing.tiny_batch("snli_ve")
    out = model(batch)
    fused = model.backbone.text_encoder.fuse(batch.input_ids, batch.input_mask, model.backbone.image_encoder(batch.image))
    logits = model.classifier(fused[:, 0])
    fused_m = model.momentum["text_encoder"].fuse(batch.input_ids, batch.input_mask,
                                                  model.momentum["visual_encoder"](batch.image))
    teacher = model.momentum["classifier"](fused_m[:, 0])
    torch.testing.assert_close(out["scores"], logits)
    torch.testing.assert_close(out["losses"]["train/simla_contract/snli_ve"],
                               distilled_cross_entropy(logits, batch.targets, teacher, 0.4))


@pytest.mark.parametrize("head", ["vqa", "snli_ve", "nlvr2", "nlvr2_assignment"])
def test_a_few_steps_on_a_fixed_batch_halve_the_task_loss(head):
    model = build(head, alpha=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    model.settings.optimization.lr = 1e-3
    optimizer = model.configure_optimizer(None)
    batch = testing.tiny_batch(head, batch=6)
    losses = []
    for update in range(60):
        model.on_update_start(TrainingProgress(update=update, epoch=0))
        torch.manual_seed(0)  # the same text-assignment draw every step
        loss = model(batch)["losses"][f"train/simla_contract/{head}"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_vqa_needs_the_answer_list():
    with pytest.raises(ValueError, match="model_config.simla.vqa.answer_list"):
        build("vqa", vqa={"answer_list": None})


class _Writer:
    def write(self, *args, **kwargs):
        pass


def test_the_vqa_projects_mapping_starts_the_decoder_from_the_pre_trained_encoders_upper_layers():
    """projects/simla/vqa.yaml's pretrained_state_mapping, on a 12-layer tiny model: decoder layers 6..11 (and the
    momentum decoder's) equal the pre-training checkpoint's encoder layers 6..11, its LM head the MLM head."""
    from mmf_multilevel.trainers.checkpoint import MultilevelCheckpoint

    deep = dict(num_hidden_layers=12)
    source = build("pretraining", seed=1, **deep)
    with torch.no_grad():
        for p in source.momentum.parameters():
            p.add_(0.1)
    checkpoint = source.state_dict()
    target = build("vqa", seed=2, **deep, vqa={"decoder_layers": 6, "decoder_from_layer": 6})
    mapping = OmegaConf.load(os.path.join(ROOT, "projects", "simla", "vqa.yaml")).checkpoint.pretrained_state_mapping
    config = OmegaConf.create({"checkpoint": {"pretrained_state_mapping": mapping}})
    stub = SimpleNamespace(trainer=SimpleNamespace(model=target, config=config, writer=_Writer()))
    MultilevelCheckpoint._load_pretrained(stub, checkpoint)
    state = target.state_dict()
    for n in range(6, 12):
        for online, copy in (("", ""), ("momentum.copies.", "momentum.copies.")):
            enc = f"{'backbone.' if not online else online}text_encoder.text.bert.encoder.layer.{n}."
            dec = f"{online}classifier.layers.{n}."
            keys = [k for k in checkpoint if k.startswith(enc)]
            assert keys
            for key in keys:
                torch.testing.assert_close(state[dec + key[len(enc):]], checkpoint[key])
    torch.testing.assert_close(state["classifier.lm.transform.dense.weight"],
                               checkpoint["heads.mlm.transform.dense.weight"])
    torch.testing.assert_close(state["momentum.copies.classifier.lm.bias"], checkpoint["momentum.copies.mlm.bias"])
    torch.testing.assert_close(state["classifier.embeddings.word_embeddings.weight"],
                               checkpoint["backbone.text_encoder.text.bert.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(state["momentum.copies.classifier.cross_attention.9.self.query.weight"],
                               checkpoint["momentum.copies.text_encoder.cross_attention.9.self.query.weight"])


# ---------------------------------------------------------------------- NLVR2
def test_pair_layer_sources_follow_the_official_duplication():
    from mmf_multilevel.methods.simla.downstream import pair_layer_sources

    sources = pair_layer_sources(12, 6)
    assert len(sources) == 18 and sources[:6] == list(range(6))
    for layer in range(6, 12):  # official Pretrain_NLVR.py: layer l -> (l - 6) * 2 + 6 and the next
        assert sources[(layer - 6) * 2 + 6] == layer and sources[(layer - 6) * 2 + 7] == layer
    with pytest.raises(ValueError, match="nlvr2_shared_layers"):
        pair_layer_sources(12, 12)


def test_pair_encoder_copies_layers_and_ties_only_the_cross_attention_keys_and_values():
    from mmf_multilevel.methods.simla.downstream import pair_encoder

    torch.manual_seed(0)
    encoder = SIMLATextEncoder.from_config(BertConfig(**TINY))
    paired = pair_encoder(encoder, 1)  # layers 0, 1, 1, 2, 2
    assert paired.num_layers == 5
    for target, source in enumerate([0, 1, 1, 2, 2]):
        for key, value in encoder.blocks[source].state_dict().items():
            torch.testing.assert_close(paired.blocks[target].state_dict()[key], value)
    for first in (1, 3):
        one, two = paired.cross_attention[str(first)].self, paired.cross_attention[str(first + 1)].self
        assert one.key.weight is two.key.weight and one.value.bias is two.value.bias
        assert one.query.weight is not two.query.weight
    assert paired.cross_attention["0"].self.key.weight is not paired.cross_attention["1"].self.key.weight


def test_expand_pair_state_is_the_official_key_rewrite():
    from mmf_multilevel.methods.simla.downstream import expand_pair_state

    keys = [f"backbone.text_encoder.text.bert.encoder.layer.{n}.attention.self.query.weight" for n in range(4)]
    keys += [f"momentum.copies.text_encoder.cross_attention.{n}.self.key.bias" for n in range(4)]
    keys += ["backbone.text_encoder.text.bert.embeddings.word_embeddings.weight", "heads.itm_head.weight"]
    state = {key: torch.tensor(float(i)) for i, key in enumerate(keys)}
    want = {}
    for key, value in state.items():  # the official loop, written out on our names
        parts = key.split(".")
        where = next((i + 1 for i, p in enumerate(parts) if p in ("layer", "cross_attention")), None)
        if where is None:
            want[key] = value
            continue
        n = int(parts[where])
        if n >= 2:
            for new in ((n - 2) * 2 + 2, (n - 2) * 2 + 3):
                want[".".join(parts[:where] + [str(new)] + parts[where + 1:])] = value
        else:
            want[key] = value
    got = expand_pair_state(state, ("backbone.text_encoder.", "momentum.copies.text_encoder."), 4, 2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # a checkpoint already in the layout (6 layers here) is read as it is
    assert expand_pair_state(got, ("backbone.text_encoder.", "momentum.copies.text_encoder."), 4, 2) == got


def test_fuse_pair_reads_image_j_mod_2_in_layer_j():
    from mmf_multilevel.methods.simla.downstream import fuse_pair, pair_encoder

    torch.manual_seed(1)
    paired = pair_encoder(SIMLATextEncoder.from_config(BertConfig(**TINY)), 1).eval()  # 5 layers
    ids, mask, image, _ = answers_and_states(seed=2, questions=5, length=6)
    ids, mask = ids[:, :4].clone(), mask[:, :4]
    other = image.flip(0)
    # one image in both places: the single-image multimodal pass over the same layers
    torch.testing.assert_close(fuse_pair(paired, ids, mask, (image, image)), paired.fuse(ids, mask, image))
    base = fuse_pair(paired, ids, mask, (image, other))
    assert not torch.allclose(base, fuse_pair(paired, ids, mask, (other, image)))
    assert not torch.allclose(base, fuse_pair(paired, ids, mask, (image, torch.randn_like(other))))  # image 1 is read
    with torch.no_grad():  # odd layers' cross-attention made blind to its memory: image 1 no longer matters
        for j in (1, 3):
            attention = paired.cross_attention[str(j)]
            attention.output.dense.weight.zero_()
            attention.output.dense.bias.zero_()
    blind = fuse_pair(paired, ids, mask, (image, other))
    torch.testing.assert_close(fuse_pair(paired, ids, mask, (image, torch.randn_like(other))), blind)
    assert not torch.allclose(fuse_pair(paired, ids, mask, (torch.randn_like(image), other)), blind)


def test_text_assignment_pairs_labels_slots_and_rates():
    from mmf_multilevel.methods.simla.downstream import text_assignment_pairs

    g = torch.Generator().manual_seed(0)
    batch, rounds = 6, 500
    similarity = torch.randn(batch, batch, generator=g)
    similarity[0, 5] = 50.0  # image 5 is almost always image 0's drawn partner
    counts = torch.zeros(3)
    partner_of_0 = 0
    for _ in range(rounds):
        first, second, labels = text_assignment_pairs(similarity, generator=g)
        own = torch.arange(batch)
        assert torch.equal(first == own, labels == 0) and torch.equal(second == own, labels == 1)
        assert bool((first != second).all())
        counts += torch.bincount(labels, minlength=3).float()
        partner_of_0 += int((first[0] == 5) | (second[0] == 5))
    n = batch * rounds
    se = math.sqrt((1 / 3) * (2 / 3) / n)
    assert all(abs(float(c) / n - 1 / 3) < 4 * se for c in counts), counts  # 2/3 matched, split evenly
    assert partner_of_0 > 0.95 * rounds
    first, second, labels = text_assignment_pairs(torch.zeros(2, 2), generator=g)  # a short last batch
    assert sorted(labels.tolist()) in ([0, 0], [0, 1], [1, 1]) and torch.equal(first + second, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="at least 2 images"):
        text_assignment_pairs(torch.zeros(1, 1))


def test_nlvr2_loss_equals_a_recomputation_with_the_momentum_model():
    from mmf_multilevel.methods.simla.downstream import fuse_pair

    model = build("nlvr2").train()
    model.alpha = 0.4
    with torch.no_grad():
        for p in model.momentum.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = testing.tiny_batch("nlvr2")
    out = model(batch)
    images = (batch.img0.image, batch.img1.image)

    def logits(vit, encoder, head):
        return head(fuse_pair(encoder, batch.input_ids, batch.input_mask, [vit(i) for i in images])[:, 0])

    student = logits(model.backbone.image_encoder, model.backbone.text_encoder, model.classifier)
    m = model.momentum
    teacher = logits(m["visual_encoder"], m["text_encoder"], m["classifier"])
    torch.testing.assert_close(out["scores"], student)
    torch.testing.assert_close(out["losses"]["train/simla_contract/nlvr2"],
                               distilled_cross_entropy(student, batch.targets, teacher, 0.4))
    assert model.backbone.text_encoder.num_layers == 3


def test_the_nlvr2_projects_mapping_reads_a_pre_training_checkpoint_in_the_two_image_layout():
    """projects/simla/nlvr2.yaml's mapping on a 12-layer tiny model: layer j of the 18 equals the checkpoint's
    layer pair_layer_sources[j], online; the momentum model starts from the loaded online weights."""
    from mmf_multilevel.methods.simla.downstream import pair_layer_sources
    from mmf_multilevel.trainers.checkpoint import MultilevelCheckpoint

    source = build("pretraining", seed=1, num_hidden_layers=12)
    checkpoint = source.state_dict()
    target = build("nlvr2", seed=2, num_hidden_layers=12, nlvr2_shared_layers=6)
    assert target.backbone.text_encoder.num_layers == 18
    mapping = OmegaConf.load(os.path.join(ROOT, "projects", "simla", "nlvr2.yaml")).checkpoint.pretrained_state_mapping
    config = OmegaConf.create({"checkpoint": {"pretrained_state_mapping": mapping}})
    stub = SimpleNamespace(trainer=SimpleNamespace(model=target, config=config, writer=_Writer()))
    MultilevelCheckpoint._load_pretrained(stub, checkpoint)
    state = target.state_dict()
    for j, l in enumerate(pair_layer_sources(12, 6)):
        for part in ("text.bert.encoder.layer.{}.output.dense.weight", "cross_attention.{}.self.value.weight"):
            want = checkpoint["backbone.text_encoder." + part.format(l)]
            torch.testing.assert_close(state["backbone.text_encoder." + part.format(j)], want)
            torch.testing.assert_close(state["momentum.copies.text_encoder." + part.format(j)], want)
    torch.testing.assert_close(state["momentum.copies.visual_encoder.vit.pos_embed"],
                               checkpoint["backbone.image_encoder.vit.pos_embed"])


def test_text_assignment_draws_follow_the_generator_alone_and_a_batch_of_three_has_neither_pairs():
    from mmf_multilevel.methods.simla.downstream import text_assignment_pairs

    similarity = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        results.append(text_assignment_pairs(similarity, generator=torch.Generator().manual_seed(7)))
    for one, two in zip(*results):
        assert torch.equal(one, two)
    g = torch.Generator().manual_seed(2)
    labels = torch.cat([text_assignment_pairs(torch.zeros(3, 3), generator=g)[2] for _ in range(300)])
    assert_rate(float((labels == 2).float().mean()), 1 / 3, labels.numel(), what="neither at a batch of three")


def test_answer_losses_without_a_teacher_and_targets_without_answers():
    g = torch.Generator().manual_seed(0)
    ids, mask, _, _ = answers_and_states()
    logits = torch.randn(ids.size(0), ids.size(1), 40, generator=g)
    torch.testing.assert_close(answer_sequence_loss(logits, ids, mask, None, 0.4), answer_sequence_loss(logits, ids, mask))
    question, answer, weights = answer_targets(torch.full((2, 3), -1))
    assert question.dtype == answer.dtype == torch.long and weights.dtype == torch.float32
    assert question.numel() == answer.numel() == weights.numel() == 0


def test_classification_loss_without_a_teacher_and_the_head_layers():
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(4, 3, generator=g), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(distilled_cross_entropy(logits, targets, None, 0.4), F.cross_entropy(logits, targets))
    from mmf_multilevel.methods.simla.downstream import ClassifierHead

    torch.manual_seed(0)
    head = ClassifierHead(32, 3)
    pooled = torch.randn(5, 32, generator=g)
    first, last = head.mlp[0], head.mlp[-1]
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (32, 32, 32, 3)
    torch.testing.assert_close(head(pooled), last(torch.relu(first(pooled))))
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        ClassifierHead(32, 1)


def test_decoder_settings_checks_and_embedding():
    config = BertConfig(**TINY)
    assert config._attn_implementation is None  # a config no model has seen
    first_layers = AnswerDecoder(config, num_layers=2, first_layer=0)
    assert first_layers.numbers == ["0", "1"] and first_layers.config is not config
    assert first_layers.config._attn_implementation == "eager" and config._attn_implementation is None
    encoder = SIMLATextEncoder.from_config(BertConfig(**TINY))
    assert AnswerDecoder(encoder.config, 1, 2).config is encoder.config  # a model's config is used as it is
    for layers, first in ((0, 6), (1, -1)):
        with pytest.raises(ValueError, match=rf"decoder_layers \({layers}\) must be positive and decoder_from_layer "
                                             rf"\({first}\) not negative"):
            AnswerDecoder(config, layers, first)
    model = decoder()
    emb = model.embeddings
    ids = torch.randint(0, 40, (2, 40))  # max_position_embeddings = 40: the longest answer
    expected = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings.weight[:40])
    torch.testing.assert_close(model.embed(ids), expected)
    with pytest.raises(ValueError, match="answer length 41 exceeds max_position_embeddings=40"):
        model.embed(torch.zeros(2, 41, dtype=torch.long))
    answer_ids, mask, states, states_mask = answers_and_states()
    with pytest.raises(ValueError, match=r"answer ids \(3, 4\) and mask \(3, 3\) must be the same"):
        model(answer_ids[:3], mask[:3, :3], states, states_mask)


def test_pair_layer_sources_may_share_no_layer():
    from mmf_multilevel.methods.simla.downstream import pair_layer_sources

    assert pair_layer_sources(2, 0) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="nlvr2_shared_layers: -1"):
        pair_layer_sources(2, -1)


def test_fuse_pair_reads_the_masks_and_defaults_them_to_all_real():
    from mmf_multilevel.methods.simla.downstream import fuse_pair, pair_encoder

    torch.manual_seed(1)
    paired = pair_encoder(SIMLATextEncoder.from_config(BertConfig(**TINY)), 1).eval()
    ids, mask, image, _ = answers_and_states(seed=2, questions=5, length=6)
    ids, mask = ids[:, :4].clone(), mask[:, :4]
    other = image.flip(0)
    ones = torch.ones(5, 6, dtype=torch.long)
    base = fuse_pair(paired, ids, torch.ones_like(mask), (image, other), (ones, ones))
    torch.testing.assert_close(fuse_pair(paired, ids, None, (image, other)), base)
    torch.testing.assert_close(fuse_pair(paired, ids, None, (image, other), (None, ones)), base)
    for slot in (0, 1):
        image_mask = ones.clone()
        image_mask[:, -2:] = 0
        masks = [ones, ones]
        masks[slot] = image_mask
        images = [image, other]
        changed = images[slot].clone()
        changed[:, -2:] += torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(slot))
        padded = fuse_pair(paired, ids, mask, images, masks)
        images[slot] = changed
        torch.testing.assert_close(fuse_pair(paired, ids, mask, images, masks), padded)  # padded tokens unread
        assert not torch.allclose(fuse_pair(paired, ids, mask, images), padded)  # unmasked, they are read


def test_the_text_assignment_pre_step_equals_a_recomputation_and_one_caption_gives_a_zero_loss(monkeypatch):
    """Each caption (as written: its masked words put back) with the two images of ``text_assignment_pairs`` drawn
    from the vision projection's cosine over 0.07, through the two-image layout, the 3-way head on [CLS]; a batch
    of one caption has no other image: both slots hold its own and the loss is a zero in the graph."""
    from mmf_multilevel.methods.simla.downstream import fuse_pair, text_assignment_pairs
    from mmf_multilevel.methods.simla.model import ASSIGNMENT_TEMPERATURE

    seen = recorded(monkeypatch, simla_model, "text_assignment_pairs")
    model = build("nlvr2_assignment").eval()
    batch = testing.tiny_batch("nlvr2_assignment", batch=6)
    batch.lm_label_ids = torch.full_like(batch.input_ids, -1)
    batch.lm_label_ids[:, 1] = batch.input_ids[:, 1]
    batch.input_ids[:, 1] = testing.MASK
    torch.manual_seed(3)
    with torch.no_grad():
        out = model(batch)
        ids = batch.input_ids.clone()
        ids[:, 1] = batch.lm_label_ids[:, 1]
        image = model.backbone.image_encoder(batch.image)
        feature = F.normalize(model.classifier["vision_proj"](image[:, 0]), dim=-1)
        torch.manual_seed(3)
        first, second, labels = text_assignment_pairs(feature @ feature.t() / ASSIGNMENT_TEMPERATURE)
        hidden = fuse_pair(model.backbone.text_encoder, ids, batch.input_mask, (image[first], image[second]))
        logits = model.classifier["ta_head"](hidden[:, 0])
    torch.testing.assert_close(seen[0][0][0], feature @ feature.t() / ASSIGNMENT_TEMPERATURE)
    torch.testing.assert_close(out["scores"], logits)
    torch.testing.assert_close(out["losses"]["train/simla_contract/nlvr2_assignment"], F.cross_entropy(logits, labels))
    single = testing.tiny_batch("nlvr2_assignment", batch=1)
    out = model.train()(single)
    loss = out["losses"]["train/simla_contract/nlvr2_assignment"]
    assert out["scores"].shape == (1, 3) and loss.item() == 0.0 and loss.requires_grad


def test_vqa_loss_paths_one_answer_index_no_answer_and_evaluation_without_distillation():
    """VG-QA's single ``answer_index`` trains as a one-answer ``answers_indices``; a batch whose questions have no
    in-list answer gives a zero loss in the graph; evaluation never distils, whatever α."""
    model = build("vqa").eval()
    model.alpha = 0.4
    batch = testing.tiny_batch("vqa")
    with torch.no_grad():
        evaluated = model(batch)["losses"]["train/simla_contract/vqa"]
        model.alpha = 0.0
        undistilled = model(batch)["losses"]["train/simla_contract/vqa"]
        torch.testing.assert_close(evaluated, undistilled)
        single = testing.tiny_batch("vqa")
        del single["answers_indices"]
        single.answer_index = torch.tensor([1, 2, 0, 3])
        one = testing.tiny_batch("vqa")
        one.answers_indices = torch.tensor([[1], [2], [0], [3]])
        torch.testing.assert_close(model(single)["losses"]["train/simla_contract/vqa"],
                                   model(one)["losses"]["train/simla_contract/vqa"])
    model.train()
    none = testing.tiny_batch("vqa")
    none.answers_indices = torch.full_like(none.answers_indices, -1)
    loss = model(none)["losses"]["train/simla_contract/vqa"]
    assert loss.item() == 0.0 and loss.requires_grad


def test_vqa_ranking_reads_k_test_and_the_official_score_setting_from_the_config():
    """Evaluation ranks with the configured ``vqa.k_test`` and ``vqa.count_first_token_twice`` (the official score
    adds the first token's log-probability once more); the question's own padding mask reaches the decoder."""
    model = build("vqa", vqa={"k_test": 2, "count_first_token_twice": True}).eval()
    batch = testing.tiny_batch("vqa")
    assert (batch.input_mask == 0).any()
    with torch.no_grad():
        scores = model(batch)["scores"]
        states = model.backbone.text_encoder.fuse(batch.input_ids, batch.input_mask,
                                                  model.backbone.image_encoder(batch.image))
        want = rank_answers(model.classifier, states, batch.input_mask, model.answer_ids, model.answer_mask, 2, True)
        plain = rank_answers(model.classifier, states, batch.input_mask, model.answer_ids, model.answer_mask, 2)
        unmasked = rank_answers(model.classifier, states, torch.ones_like(batch.input_mask), model.answer_ids,
                                model.answer_mask, 2, True)
    torch.testing.assert_close(scores, want)
    assert int((scores > NOT_RANKED).sum(1).max()) == 2
    assert not torch.allclose(want, plain) and not torch.allclose(want, unmasked)


def test_the_candidate_answers_are_tokenised_as_cls_answer_sep_padded_and_truncated():
    """The answer list through the configured tokenizer: ``[CLS] answer [SEP]``, padded to the longest, cut at
    ``vqa.max_answer_length``; a tokenizer without the wrapping, or with ids past the BERT's vocabulary, is named."""
    model = build("vqa")
    words = {f"w{i}": i for i in range(5, 40)}
    rows = [[testing.CLS] + [words[w] for w in answer.split()] + [testing.SEP] for answer in testing.TINY_ANSWERS]
    width = max(len(r) for r in rows)
    want = torch.tensor([r + [testing.PAD] * (width - len(r)) for r in rows])
    assert torch.equal(model.answer_ids, want)
    assert torch.equal(model.answer_mask, (want != testing.PAD).long())
    assert "answer_ids" not in model.state_dict()
    cut = build("vqa", vqa={"max_answer_length": 3})
    assert cut.answer_ids.shape == (len(testing.TINY_ANSWERS), 3)
    assert cut.answer_ids[2].tolist() == [testing.CLS, words["w7"], testing.SEP]
    with pytest.raises(ValueError, match=r"vqa.tokenizer .* must wrap each answer as \[CLS\] answer \[SEP\]"):
        build("vqa", vqa={"max_answer_length": 2})
    with pytest.raises(ValueError, match=r"vqa.tokenizer .* gives ids up to 12; the BERT has 12 words"):
        build("vqa", vocab_size=12)


def _momentum_moved(model, scale=0.05):
    with torch.no_grad():
        for p in model.momentum.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def test_the_task_teachers_read_the_question_padding_and_run_only_when_distilling(monkeypatch):
    """SNLI-VE and VQA (paper §3.1, momentum distillation in fine-tuning): the teacher is the momentum ViT and BERT
    on the question with its padding mask (then the momentum head / decoder); it is computed only in training with
    α > 0 - in evaluation, or at α = 0, the loss gets no teacher and α = 0, whatever ``model.alpha`` holds."""
    calls = recorded(monkeypatch, simla_model, "distilled_cross_entropy")
    model = _momentum_moved(build("snli_ve")).train()
    batch = testing.tiny_batch("snli_ve")
    assert (batch.input_mask == 0).any()
    model.alpha = 0.4
    model(batch)
    (logits, targets, teacher, alpha), _, _ = calls[-1]
    with torch.no_grad():
        m = model.momentum
        fused_m = m["text_encoder"].fuse(batch.input_ids, batch.input_mask, m["visual_encoder"](batch.image))
        torch.testing.assert_close(teacher, m["classifier"](fused_m[:, 0]))
        unpadded = m["text_encoder"].fuse(batch.input_ids, None, m["visual_encoder"](batch.image))
        assert not torch.allclose(m["classifier"](unpadded[:, 0]), teacher)
    assert alpha == 0.4 and torch.equal(targets, batch.targets.long().view(-1))
    model.alpha = 0.0
    model(batch)
    assert calls[-1][0][2:] == (None, 0.0)
    model.eval().alpha = 0.4
    with torch.no_grad():
        out = model(batch)
    assert calls[-1][0][2:] == (None, 0.0)
    torch.testing.assert_close(out["losses"]["train/simla_contract/snli_ve"],
                               F.cross_entropy(out["scores"], batch.targets.long().view(-1)))

    answers = recorded(monkeypatch, simla_model, "answer_sequence_loss")
    vqa = _momentum_moved(build("vqa")).train()
    batch = testing.tiny_batch("vqa")
    vqa.alpha = 0.0
    vqa(batch)
    assert answers[-1][0][3:] == (None, 0.0)
    vqa.eval().alpha = 0.4
    with torch.no_grad():
        vqa(batch)
    assert answers[-1][0][3:] == (None, 0.0)


def test_vqa_reads_answers_indices_before_answer_index():
    """A batch with both (VQA v2's processor gives every annotator's answer, some also the majority one): the loss
    weighs the ``answers_indices``; ``answer_index`` alone is the fallback."""
    model = build("vqa").eval()
    batch = testing.tiny_batch("vqa")
    with torch.no_grad():
        want = model(batch)["losses"]["train/simla_contract/vqa"]
        batch.answer_index = torch.tensor([5, 4, 5, 4])
        torch.testing.assert_close(model(batch)["losses"]["train/simla_contract/vqa"], want)


def test_the_momentum_text_encoder_of_a_checkpoint_is_read_in_the_two_image_layout_too():
    """``prepare_pretrained_state`` rewrites the checkpoint's momentum BERT as its online one (a mapping may start
    the momentum model from the checkpoint's own momentum copies)."""
    from mmf_multilevel.methods.simla.downstream import pair_layer_sources

    source = _momentum_moved(build("pretraining", seed=1), scale=0.5)
    state = source.state_dict()
    target = build("nlvr2", seed=2)
    out = target.prepare_pretrained_state(state)
    part = "text.bert.encoder.layer.{}.output.dense.weight"
    for j, l in enumerate(pair_layer_sources(2, 1)):
        for prefix in ("backbone.text_encoder.", "momentum.copies.text_encoder."):
            torch.testing.assert_close(out[prefix + part.format(j)], state[prefix + part.format(l)])
    assert not torch.allclose(state["momentum.copies.text_encoder." + part.format(1)],
                              state["backbone.text_encoder." + part.format(1)])
    assert build("retrieval").prepare_pretrained_state(state) is state


def test_text_assignment_pairs_a_batch_of_two_and_reads_a_lone_captions_padding():
    """Two captions already have another image to pair with (a real loss); a lone caption's [CLS] is read through
    the two-image layout with its padding mask and both slots its own image."""
    from mmf_multilevel.methods.simla.downstream import fuse_pair

    model = build("nlvr2_assignment").eval()
    two = testing.tiny_batch("nlvr2_assignment", batch=2)
    torch.manual_seed(0)
    with torch.no_grad():
        loss = model(two)["losses"]["train/simla_contract/nlvr2_assignment"]
    assert float(loss) > 0
    full = testing.tiny_batch("nlvr2_assignment", batch=2)
    lone = rows_of(full, slice(1, 2), ("input_ids", "input_mask", "segment_ids", "image", "image_size"))
    assert (lone.input_mask == 0).any()
    with torch.no_grad():
        scores = model(lone)["scores"]
        image = model.backbone.image_encoder(lone.image)
        hidden = fuse_pair(model.backbone.text_encoder, lone.input_ids, lone.input_mask, (image, image))
        want = model.classifier["ta_head"](hidden[:, 0])
        unpadded = model.classifier["ta_head"](
            fuse_pair(model.backbone.text_encoder, lone.input_ids, None, (image, image))[:, 0])
    torch.testing.assert_close(scores, want)
    assert not torch.allclose(want, unpadded)
