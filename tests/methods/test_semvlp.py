"""SemVLP (mmf_multilevel/methods/semvlp/): sharing, parameter counts, information flow, losses,
mode schedule and the MMF adapter, on tiny random configs (CPU)."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig

from helpers.heads import assert_bert_transform
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.semvlp import (
    SINGLE,
    TWO,
    ModeSchedule,
    SemVLPNetwork,
    SemVLPPretrainingHeads,
    pretraining_losses,
)
from mmf_multilevel.methods.semvlp.__main__ import base_counts
from mmf_multilevel.methods.semvlp.model import SemVLP
from mmf_multilevel.methods.testing import masked_regions
from mmf_multilevel.modules.masking import IGNORE_INDEX
from mmf_multilevel.modules.text import BertTextEncoder

# the global config MMF's Losses and the models read, as mmf_run registers it
pytestmark = pytest.mark.usefixtures("mmf_global_config")

VOCAB, HIDDEN, LAYERS, LS, FEAT, NOBJ, CLASSES, ANSWERS = 60, 32, 4, 2, 16, 5, 7, 9
PAD, CLS, SEP, MASK = 0, 1, 2, 3

# the documented BERT-base figures (module docstring, defaults.yaml, README)
BASE_SINGLE = 111_061_248
BASE_TWO_UPPER = 125_244_672
BASE_STORED_ALL = 139_428_096
CROSS_MODULE_BASE = 2_363_904


def tiny_bert(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def tiny_network(cross_layer_start=LS, layout="upper", seed=0):
    torch.manual_seed(seed)
    return SemVLPNetwork(BertTextEncoder.from_config(tiny_bert()), FEAT, cross_layer_start, layout).eval()


def batch(seed=1, bsz=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (bsz, 8), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones(bsz, 8, dtype=torch.long)
    ids[1, 5] = SEP
    ids[1, 6:] = PAD
    mask[1, 6:] = 0
    ids[0, 7] = SEP
    ids[2, 7] = SEP
    feats = torch.randn(bsz, NOBJ, FEAT, generator=g)
    x1 = torch.rand(bsz, NOBJ, generator=g) * 0.5
    y1 = torch.rand(bsz, NOBJ, generator=g) * 0.5
    boxes = torch.stack([x1, y1, x1 + 0.3, y1 + 0.4], -1)
    region_mask = torch.ones(bsz, NOBJ, dtype=torch.long)
    region_mask[2, 3:] = 0
    return ids, mask, feats, boxes, region_mask


def run(net, mode, data=None, **kw):
    ids, mask, feats, boxes, rmask = data or batch()
    return net(ids, mask, feats, boxes, rmask, mode=mode, **kw)


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("mode", [SINGLE, TWO])
def test_shapes_and_summary_token(mode):
    net = tiny_network()
    out = run(net, mode)
    assert out["text"].shape == (3, 8, HIDDEN)
    assert out["objects"].shape == (3, 1 + NOBJ, HIDDEN)
    assert out["object_mask"].shape == (3, 1 + NOBJ) and out["object_mask"][:, 0].eq(1).all()
    assert out["pooled"].shape == (3, HIDDEN)
    if mode == SINGLE:
        # objects first: [CLS] is sequence index 1 + N, not 0
        assert out["summary_index"] == 1 + NOBJ
        assert torch.equal(out["summary"], out["sequence"][:, 1 + NOBJ])
        assert torch.equal(out["summary"], out["text"][:, 0])
    else:
        assert out["summary_index"] == 0  # o_IMG, the first position of the object stream
        assert torch.equal(out["summary"], out["objects"][:, 0])  # o_IMG
    pooler = net.text.pooler
    assert torch.allclose(out["pooled"], torch.tanh(pooler.dense(out["summary"])))


# ------------------------------------------------------------------------------------------ sharing
def _record_calls(net):
    """Forward hooks on every shared sub-module (φ_S, φ_F) and every φ_C: (name, id(module)) per call."""
    calls, hooks = [], []
    targets = [(f"block{i}.{part}", getattr(b, part)) for i, b in enumerate(net.blocks)
               for part in ("attention", "intermediate", "output")]
    targets += [(f"cross_attention.{k}", m) for k, m in net.cross_attention.items()]
    for name, module in targets:
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: calls.append((name, id(m)))))
    return calls, hooks


def test_both_modes_run_the_same_shared_block_instances():
    net = tiny_network()
    blocks = net.blocks
    shared_ids = {id(m) for b in blocks for m in (b.attention, b.intermediate, b.output)}
    cross_ids = {id(m) for m in net.cross_attention.values()}
    seen = {}
    for mode in (SINGLE, TWO):
        calls, hooks = _record_calls(net)
        run(net, mode)
        for h in hooks:
            h.remove()
        seen[mode] = calls
    single_ids = {i for _, i in seen[SINGLE]}
    two_ids = {i for _, i in seen[TWO]}
    # single-stream: every shared sub-module once per block, no cross-attention
    assert single_ids == shared_ids and len(seen[SINGLE]) == 3 * LAYERS
    # two-stream: the same module objects, each run twice (text stream, then object stream), plus φ_C above L_s
    assert two_ids - cross_ids == shared_ids
    assert len([c for c in seen[TWO] if c[1] in shared_ids]) == 2 * 3 * LAYERS
    assert {c[0] for c in seen[TWO] if c[1] in cross_ids} == {f"cross_attention.{i}" for i in range(LS, LAYERS)}
    # one stack in the module tree and in the state dict: no copies, no tied duplicates
    assert len([n for n, _ in net.named_modules() if n.endswith("attention.self.query")]) == LAYERS
    assert len([n for n, _ in net.named_modules() if n.endswith(".self.query")]) == LAYERS + (LAYERS - LS)
    state = net.state_dict()
    assert len([k for k in state if k.startswith("text.bert.encoder.layer.") and k.endswith("attention.self.query.weight")]) == LAYERS
    all_params = list(net.named_parameters(remove_duplicate=False))
    assert len(all_params) == len(list(net.parameters()))
    assert len({p.data_ptr() for _, p in all_params}) == len(all_params)
    # the mode parameter sets: single ⊂ two, and the difference is exactly the φ_C modules used
    single = {id(p) for p in net.mode_parameters(SINGLE)}
    two = {id(p) for p in net.mode_parameters(TWO)}
    assert single < two
    per_cross = 4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HIDDEN
    assert net.num_parameters(TWO) - net.num_parameters(SINGLE) == (LAYERS - LS) * per_cross


@pytest.mark.parametrize("mode", [SINGLE, TWO])
def test_gradient_routing_matches_the_mode_parameter_sets(mode):
    net = tiny_network(layout="all").train()
    out = run(net, mode)
    (out["objects"].sum() + out["text"].sum() + out["pooled"].sum()).backward()
    used = {id(p) for p in net.mode_parameters(mode)}
    for name, p in net.named_parameters():
        if name.startswith("cross_attention."):
            index = int(name.split(".")[1])
            if mode == TWO and index >= LS:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
            assert (id(p) in used) == (mode == TWO and index >= LS)
        elif name.startswith("text.bert.encoder.layer."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("layout, stored", [("upper", BASE_TWO_UPPER), ("all", BASE_STORED_ALL)])
def test_base_size_parameter_counts_per_mode(layout, stored):
    counts = base_counts([layout])
    assert counts[f"{layout}/single"] == BASE_SINGLE
    assert counts[f"{layout}/two"] == BASE_TWO_UPPER
    assert counts[f"{layout}/stored"] == stored
    n_cross = 6 if layout == "upper" else 12
    assert stored - BASE_SINGLE == n_cross * CROSS_MODULE_BASE
    # BERT-base with pooler (109,482,240) + Linear(2052, 768) + its LayerNorm + [IMG]
    assert BASE_SINGLE == 109_482_240 + 2052 * 768 + 768 + 2 * 768 + 768


def test_changing_ls_needs_modules_that_exist():
    net = tiny_network(layout="upper")
    with pytest.raises(ValueError, match="cross_attention_layers='all'"):
        net.cross_layer_start = 0
    full = tiny_network(layout="all")
    full.cross_layer_start = 0
    assert full.num_parameters(TWO) == full.num_parameters(SINGLE) + LAYERS * (4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HIDDEN)
    with pytest.raises(ValueError, match="L_s"):
        tiny_network(cross_layer_start=LAYERS + 1)


# ------------------------------------------------------------------------------------------ information flow
def test_single_stream_equals_a_plain_bert_encoder_on_the_concatenation():
    net = tiny_network()
    ids, mask, feats, boxes, rmask = batch()
    out = net(ids, mask, feats, boxes, rmask, mode=SINGLE)
    text_emb = net.embed_text(ids)
    obj_emb, obj_mask = net.embed_objects(feats, boxes, rmask)
    reference = net.text.encode(torch.cat([obj_emb, text_emb], 1), attention_mask=torch.cat([obj_mask, mask], 1))
    assert torch.allclose(out["sequence"], reference, atol=1e-6)
    # and the two-stream text stream equals the encoder on the text alone
    two = net(ids, mask, feats, boxes, rmask, mode=TWO)
    assert torch.allclose(two["text"], net.text.encode(text_emb, attention_mask=mask), atol=1e-6)
    # the image changes the text in single-stream mode (full attention)
    out2 = net(ids, mask, feats + 1.0, boxes, rmask, mode=SINGLE)
    assert not torch.allclose(out["text"], out2["text"])


def test_two_stream_text_never_sees_the_image_and_cross_attends_to_the_last_text_layer():
    net = tiny_network()
    ids, mask, feats, boxes, rmask = batch()
    a = net(ids, mask, feats, boxes, rmask, mode=TWO, output_hidden_states=True)
    b = net(ids, mask, feats * 3 + 1, boxes, rmask, mode=TWO)
    assert torch.equal(a["text"], b["text"])  # H^L bit-identical under an image change
    other = ids.clone()
    other[:, 1:4] = (other[:, 1:4] + 7) % (VOCAB - 4) + 4
    c = net(other, mask, feats, boxes, rmask, mode=TWO, output_hidden_states=True)
    # the object stream up to block L_s is text-independent; above it the text matters
    assert torch.equal(a["object_hidden_states"][LS], c["object_hidden_states"][LS])
    assert not torch.allclose(a["objects"], c["objects"])
    # every φ_C receives the same memory: the text's final states H^L
    memories = []
    hooks = [m.register_forward_hook(lambda m, args, kwargs, o: memories.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
             for m in net.cross_attention.values()]
    out = net(ids, mask, feats, boxes, rmask, mode=TWO)
    for h in hooks:
        h.remove()
    assert len(memories) == LAYERS - LS
    assert all(m is memories[0] for m in memories) and torch.equal(memories[0], out["text"])
    # with L_s = L the objects never see the text
    top = tiny_network(cross_layer_start=LAYERS)
    assert torch.equal(top(ids, mask, feats, boxes, rmask, mode=TWO)["objects"], top(other, mask, feats, boxes, rmask, mode=TWO)["objects"])


def test_object_inputs_are_linear_projections_of_feature_and_box():
    net = tiny_network()
    _, _, feats, boxes, rmask = batch()
    emb, mask = net.embed_objects(feats, boxes, rmask)
    proj = net.objects.proj
    assert proj.in_features == FEAT + 4
    raw = torch.cat([net.objects.img_embedding.expand(3, 1, HIDDEN), proj(torch.cat([feats, boxes], -1))], 1)
    assert torch.allclose(emb, net.objects.norm(raw), atol=1e-6)
    assert torch.equal(mask[:, 1:], rmask)


# ------------------------------------------------------------------------------------------ losses
def heads_for(net, qa=ANSWERS):
    torch.manual_seed(3)
    return SemVLPPretrainingHeads(net, CLASSES, qa)


def loss_inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    mlm = torch.full((3, 8), IGNORE_INDEX, dtype=torch.long)
    mlm[0, 2], mlm[0, 4], mlm[1, 1], mlm[2, 3] = 10, 11, 12, 13
    selected = torch.zeros(3, NOBJ, dtype=torch.bool)
    selected[0, 1] = selected[1, 0] = selected[1, 4] = selected[2, 2] = True
    labels = torch.randint(0, CLASSES, (3, NOBJ), generator=g)
    targets = torch.randn(3, NOBJ, FEAT, generator=g)
    matched = torch.tensor([1, 0, 1])
    qa = torch.rand(3, ANSWERS, generator=g)
    return mlm, selected, labels, targets, matched, qa


@pytest.mark.parametrize("mode", [SINGLE, TWO])
def test_pretraining_losses_against_an_independent_computation(mode):
    net = tiny_network()
    heads = heads_for(net)
    out = run(net, mode)
    mlm, selected, labels, targets, matched, qa = loss_inputs()
    losses = pretraining_losses(heads, out, mlm, targets, selected, labels, matched, qa)
    assert set(losses) == {"mlm", "mrfr", "mrc", "itm", "qa"}
    with torch.no_grad():
        # MLM: matched samples 0 and 2 only -> positions (0,2), (0,4), (2,3)
        terms = []
        for b, t in [(0, 2), (0, 4), (2, 3)]:
            h = heads.mlm.transform(out["text"][b, t])
            logits = h @ net.text.word_embeddings.weight.t() + heads.mlm.bias
            terms.append(-torch.log_softmax(logits, -1)[mlm[b, t]])
        assert torch.allclose(losses["mlm"], torch.stack(terms).mean(), atol=1e-5)
        # objects: selected & matched -> (0,1), (2,2); object index j is output position 1 + j ([IMG] first)
        feat_terms, label_terms = [], []
        for b, j in [(0, 1), (2, 2)]:
            o = out["objects"][b, 1 + j]
            pred = heads.mrfr.decoder(heads.mrfr.transform(o))
            feat_terms.append(((pred - targets[b, j]) ** 2).mean())
            logit = heads.mrc.decoder(heads.mrc.transform(o))
            label_terms.append(-torch.log_softmax(logit, -1)[labels[b, j]])
        assert torch.allclose(losses["mrfr"], torch.stack(feat_terms).mean(), atol=1e-5)
        assert torch.allclose(losses["mrc"], torch.stack(label_terms).mean(), atol=1e-5)
        # ITM on every sample, from the pooled summary (h_CLS single / o_IMG two)
        summary = out["text"][:, 0] if mode == SINGLE else out["objects"][:, 0]
        pooled = torch.tanh(net.text.pooler.dense(summary))
        itm_logits = heads.itm.classifier(pooled)
        assert torch.allclose(losses["itm"], -torch.log_softmax(itm_logits, -1)[torch.arange(3), matched].mean(), atol=1e-5)
        # QA: BCE summed over answers, mean over matched questions
        qa_logits = heads.qa(pooled)
        p = torch.sigmoid(qa_logits)
        bce = -(qa * torch.log(p) + (1 - qa) * torch.log(1 - p)).sum(-1)
        assert torch.allclose(losses["qa"], bce[[0, 2]].mean(), atol=1e-4)


def test_losses_with_nothing_to_predict_are_zero_not_nan():
    net = tiny_network()
    heads = heads_for(net)
    out = run(net, SINGLE)
    mlm, selected, labels, targets, matched, qa = loss_inputs()
    none = torch.zeros_like(selected)
    no_tokens = torch.full_like(mlm, IGNORE_INDEX)
    losses = pretraining_losses(heads, out, no_tokens, targets, none, labels, torch.zeros(3, dtype=torch.long), qa)
    for name in ("mlm", "mrfr", "mrc", "qa"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad, name
    assert torch.isfinite(losses["itm"])
    # captions: no QA targets -> no QA loss; no is_correct -> no ITM loss, MLM on every sample
    losses = pretraining_losses(heads, out, mlm, targets, selected, labels)
    assert set(losses) == {"mlm", "mrfr", "mrc"}
    with pytest.raises(ValueError, match="num_qa_answers"):
        pretraining_losses(heads, out, qa_targets=torch.zeros(3, ANSWERS + 1))
    bad = labels.clone()
    bad[0, 1] = CLASSES
    with pytest.raises(ValueError, match="num_object_labels"):
        pretraining_losses(heads, out, None, targets, selected, bad)


@pytest.mark.parametrize("mode", [SINGLE, TWO, "alternate"])
def test_a_few_steps_on_a_fixed_batch_lower_every_loss(mode):
    net = tiny_network().train()
    heads = heads_for(net)
    params = list(net.parameters()) + [p for n, p in heads.named_parameters() if not n.startswith("mlm.decoder")]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    data = batch()
    mlm, selected, labels, targets, matched, qa = loss_inputs()
    masked = data[2].masked_fill(selected.unsqueeze(-1), 0.0)
    data = (data[0], data[1], masked, data[3], data[4])
    history = []
    schedule = ModeSchedule("alternate") if mode == "alternate" else ModeSchedule(mode)
    for step in range(40):
        out = run(net, schedule(step), data)
        losses = pretraining_losses(heads, out, mlm, targets, selected, labels, matched, qa)
        history.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for name in history[0]:
        assert history[-1][name] < 0.8 * history[0][name], (name, history[0][name], history[-1][name])


# ------------------------------------------------------------------------------------------ schedule
def test_alternate_schedule_is_exactly_the_ratio():
    s = ModeSchedule("alternate", 0.5)
    modes = s.modes(20)
    assert modes[:4] == [SINGLE, TWO, SINGLE, TWO]
    assert modes.count(SINGLE) == modes.count(TWO) == 10
    quarter = ModeSchedule("alternate", 0.25).modes(40)
    assert quarter.count(SINGLE) == 10 and all(quarter[i:i + 4].count(SINGLE) == 1 for i in range(0, 40, 4))
    assert ModeSchedule("alternate", 1.0).modes(5) == [SINGLE] * 5
    assert ModeSchedule("alternate", 0.0).modes(5) == [TWO] * 5


def test_random_schedule_is_seeded_identical_across_ranks_and_near_the_ratio():
    a, b = ModeSchedule("random", 0.5, seed=7), ModeSchedule("random", 0.5, seed=7)
    modes = a.modes(2000)
    assert modes == b.modes(2000)  # two "ranks" (or a resumed run) agree
    assert a.modes(10, start=500) == modes[500:510]
    assert 0.45 < modes.count(SINGLE) / 2000 < 0.55
    assert ModeSchedule("random", 0.5, seed=8).modes(2000) != modes
    assert 0.25 < ModeSchedule("random", 0.3, seed=1).modes(2000).count(SINGLE) / 2000 < 0.35
    assert set(ModeSchedule(SINGLE).modes(50)) == {SINGLE} and set(ModeSchedule(TWO).modes(50)) == {TWO}
    with pytest.raises(ValueError, match="mode_schedule"):
        ModeSchedule("coin")
    with pytest.raises(ValueError, match="single_stream_ratio"):
        ModeSchedule("random", 1.5)


# ------------------------------------------------------------------------------------------ MMF adapter
def model_config(**overrides):
    base = OmegaConf.load(SemVLP.config_path()).model_config.semvlp
    tiny = dict(bert_model_name=None, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, cross_layer_start=LS, feature_dim=FEAT,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, mode_schedule="alternate",
                pretraining=dict(num_object_labels=CLASSES, num_qa_answers=ANSWERS))
    return OmegaConf.merge(base, tiny, overrides)




def build_model(**overrides):
    torch.manual_seed(0)
    model = SemVLP(model_config(**overrides))
    model.build()
    model.init_losses()  # as MMF's build_model does
    return model


def sample_list(captions=True, bsz=3):
    from mmf.common.sample import SampleList

    ids, mask, feats, boxes, rmask = batch(bsz=bsz)
    g = torch.Generator().manual_seed(2)
    w = torch.tensor([640, 480, 500])[:bsz]
    h = torch.tensor([480, 360, 400])[:bsz]
    bbox = boxes * torch.stack([w, h, w, h], -1).view(bsz, 1, 4).float()
    info = SampleList()
    info.max_features = rmask.sum(1)
    info.bbox = bbox
    info.image_width, info.image_height = w, h
    info.objects = torch.randint(0, CLASSES, (bsz, NOBJ), generator=g).masked_fill(rmask == 0, -1)
    sl = SampleList()
    sl.input_ids, sl.input_mask, sl.segment_ids = ids, mask, torch.zeros_like(ids)
    sl.image_feature_0, sl.image_info_0 = feats, info
    # what a pre-training dataset adds: MLM targets (masked_token), masked-object decisions
    labels = torch.full_like(ids, -1)
    labels[0, 2], labels[2, 3], labels[1, 1] = 10, 12, 13
    sl.lm_label_ids = labels
    masked_regions(sl, prob=0.5, seed=4)
    if captions:
        sl.is_correct = torch.tensor([1, 0, 1])[:bsz]
    else:
        sl.targets = torch.rand(bsz, ANSWERS, generator=g)
    sl.dataset_type, sl.dataset_name = "train", "coco_captions" if captions else "vqa2"
    return sl


def test_mmf_model_pretraining_alternates_modes_and_names_losses_by_mode():
    model = build_model().train()
    seen = []
    for update in range(4):
        model.on_update_start(TrainingProgress(update=update, epoch=1))
        out = model(sample_list())
        seen.append(out["mode"])
        mode = out["mode"]
        assert set(out["losses"]) == {f"train/coco_captions/{mode}/{k}" for k in ("mlm", "mrfr", "mrc", "itm")}
        assert out["scores"].shape == (3, 2)
    assert seen == [SINGLE, TWO, SINGLE, TWO]
    assert model.log_message(TrainingProgress(update=4, epoch=1)) == (
        "semvlp modes: update 4 ran two-stream; updates so far: single 2, two 2 (mode_schedule: alternate)")
    # the mode is a function of the update the trainer pushes: a resumed run continues the schedule
    fresh = build_model().train()
    fresh.load_state_dict(model.state_dict())
    fresh.on_update_start(TrainingProgress(update=4, epoch=1))
    assert fresh(sample_list())["mode"] == SINGLE
    # evaluation uses the configured mode
    model.eval()
    assert model(sample_list())["mode"] == SINGLE


def test_mmf_model_feeds_the_datasets_masked_objects_and_takes_qa_batches():
    model = build_model().train()
    seen = {}
    hook = model.backbone.objects.register_forward_hook(lambda m, args, o: seen.update(features=args[0].clone()))
    sl = sample_list()
    out = model(sl)
    hook.remove()
    zeroed = seen["features"].abs().sum(-1) == 0
    original = sl.image_feature_0
    # exactly the regions the dataset zeroed reach the network as zeros, the rest unchanged
    assert zeroed.any() and torch.equal(zeroed, sl.region_zeroed)
    assert torch.equal(seen["features"][~zeroed], original[~zeroed])
    # QA batch: targets -> QA loss; no is_correct -> no ITM
    out = model(sample_list(captions=False))
    mode = out["mode"]
    assert set(out["losses"]) == {f"train/vqa2/{mode}/{k}" for k in ("mlm", "mrfr", "mrc", "qa")}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    # QA batch with mismatched questions (itm_probability): ITM too, no QA loss from the mismatched one
    qa = sample_list(captions=False)
    qa.is_correct = torch.tensor([1, 0, 1])
    out = model(qa)
    assert set(out["losses"]) == {f"train/vqa2/{out['mode']}/{k}" for k in ("mlm", "mrfr", "mrc", "qa", "itm")}
    changed = sample_list(captions=False)
    changed.is_correct = qa.is_correct
    changed.targets[1] = 1 - changed.targets[1]
    model.eval()
    torch.testing.assert_close(model(changed)["losses"][f"train/vqa2/{SINGLE}/qa"], model(qa)["losses"][f"train/vqa2/{SINGLE}/qa"])


def test_mmf_model_pretraining_needs_the_datasets_masks():
    model = build_model().train()
    sl = sample_list()
    del sl["lm_label_ids"]
    with pytest.raises(KeyError, match="dataset_config.coco_captions.*masked_token"):
        model(sl)
    sl = sample_list()
    for key in ("region_selected", "region_zeroed", "region_source"):
        del sl[key]
    with pytest.raises(KeyError, match="dataset_config.coco_captions.region_mask_probability"):
        model(sl)
    # the masking settings that moved to the datasets name their new place
    with pytest.raises(ValueError, match="pretraining.object_mask_probability.*region_mask_probability"):
        build_model(pretraining=dict(object_mask_probability=0.5))


def test_mmf_model_gradient_accumulation_keeps_one_mode_per_update():
    model = build_model().train()
    modes = []
    for update in range(3):
        model.on_update_start(TrainingProgress(update=update, epoch=1))
        modes += [model(sample_list())["mode"] for _ in range(2)]  # two micro-batches per update
    assert modes == [SINGLE, SINGLE, TWO, TWO, SINGLE, SINGLE]


@pytest.mark.parametrize("mode", [SINGLE, TWO])
def test_mmf_model_task_heads(mode):
    from mmf.common.sample import SampleList

    vqa = build_model(training_head_type="classification", num_labels=11, mode=mode).eval()
    assert vqa(sample_list(captions=False))["scores"].shape == (3, 11)
    retrieval = build_model(training_head_type="retrieval", mode=mode).eval()
    assert retrieval(sample_list())["scores"].shape == (3, 2)
    nlvr2 = build_model(training_head_type="nlvr2", mode=mode).eval()
    left, right = sample_list(), sample_list()
    sl = SampleList()
    sl.input_ids, sl.input_mask, sl.segment_ids = left.input_ids, left.input_mask, left.segment_ids
    sl.img0, sl.img1 = SampleList(), SampleList()
    sl.img0.image_feature_0, sl.img0.image_info_0 = left.image_feature_0, left.image_info_0
    sl.img1.image_feature_0, sl.img1.image_info_0 = right.image_feature_0 * 2, right.image_info_0
    assert nlvr2(sl)["scores"].shape == (3, 2)
    with pytest.raises(KeyError, match="input_layout"):
        nlvr2(left)
    with pytest.raises(ValueError, match="num_labels"):
        build_model(training_head_type="classification", num_labels=None)
    with pytest.raises(ValueError, match="training_head_type"):
        build_model(training_head_type="captioning")


def test_mmf_model_errors_name_the_config_keys():
    feature_key = rf"image_feature_0 has {FEAT + 1}-d features but model_config\.semvlp\.feature_dim is {FEAT}"
    for head in ("pretraining", "classification"):
        model = build_model(training_head_type=head, num_labels=ANSWERS).train()
        sl = sample_list()
        sl.image_feature_0 = torch.randn(3, NOBJ, FEAT + 1)
        with pytest.raises(ValueError, match=feature_key):
            model(sl)
    model = build_model().train()
    sl = sample_list()
    del sl.image_info_0["objects"]
    with pytest.raises(KeyError, match=r"semvlp: masked region label prediction needs the detector's labels.*"
                                       r"cache; set model_config\.semvlp\.pretraining\.num_object_labels: 0 to train "
                                       r"without it.$"):
        model(sl)
    with pytest.raises(ValueError, match=r"^model_config\.semvlp\.mode must be one of \['single', 'two'\]"):
        build_model(mode="three")


def test_the_build_logs_the_parameters_of_each_mode(monkeypatch):
    from mmf.common.registry import registry

    lines = []
    monkeypatch.setitem(registry.mapping["state"], "writer", SimpleNamespace(write=lines.append))
    model = build_model(cross_attention_layers="all")
    net = model.backbone
    stored = sum(p.numel() for p in net.parameters())
    assert (f"semvlp network parameters: single-stream mode {net.num_parameters(SINGLE):,}, two-stream mode "
            f"{net.num_parameters(TWO):,} (L_s = {LS}, cross_attention_layers: all, stored {stored:,})") in lines


def test_fine_tuning_checkpoint_mapping_takes_the_whole_network():
    """``pretrained_state_mapping: {backbone: backbone}`` covers every network key of a pre-trained model:
    a pre-trained model is its backbone plus its heads, and fine-tuning has the same backbone keys."""
    pre = build_model()
    ft = build_model(training_head_type="classification", num_labels=5)
    pre_keys = {k for k in pre.state_dict() if k.startswith("backbone.")}
    assert len(pre_keys) > 50 and pre_keys == {k for k in ft.state_dict() if k.startswith("backbone.")}
    assert not set(pre.state_dict()) - pre_keys - {k for k in pre.state_dict() if k.startswith("heads.")}


def test_checkpoints_from_before_the_one_folder_layout_load():
    """State dicts written when the backbone was ``semvlp.*``, the object heads ``object_feature`` /
    ``object_label`` and the schedule a ``schedule_step`` buffer load into today's names."""
    model = build_model().eval()
    renames = {"backbone.": "semvlp.", "heads.mrfr.": "heads.object_feature.", "heads.mrc.": "heads.object_label."}
    old = {}
    for key, value in model.state_dict().items():
        for now, before in renames.items():
            if key.startswith(now):
                key = before + key[len(now):]
        old[key] = value
    old["schedule_step"] = torch.tensor(7)
    assert any(k.startswith("semvlp.text.") for k in old) and any(k.startswith("heads.object_label.") for k in old)
    fresh = build_model(cross_layer_start=LS)
    torch.manual_seed(9)
    for p in fresh.parameters():
        p.data.normal_()
    fresh.load_state_dict(old, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # and MMF's pretrained_state_mapping prefix of the old projects ('semvlp: semvlp') means the backbone
    assert fresh.map_pretrained_prefix("semvlp") == "backbone"


def test_a_checkpoint_with_another_cross_attention_layout_is_refused_naming_both():
    """Figure 3's ablations fine-tune with the L_s they were pre-trained with: loading an L_s = 3 checkpoint
    into an L_s = 2 model (or back) would leave a cross-attention module random (or drop one) silently."""
    pre = build_model(cross_layer_start=3)
    ft = build_model(training_head_type="classification", num_labels=5, cross_layer_start=LS)
    state = {k: v for k, v in pre.state_dict().items() if k.startswith("backbone.")}
    with pytest.raises(ValueError, match=r"checkpoint's two-stream layout is cross-attention in blocks 4\.\.4 \(L_s = 3.*"
                                         r"this model's is cross-attention in blocks 3\.\.4 \(L_s = 2"):
        ft.load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match=r"no cross-attention \(L_s = 4\)"):
        build_model(cross_layer_start=3).load_state_dict(build_model(cross_layer_start=4).state_dict())
    # the same layout loads; a checkpoint of another model (no backbone keys) is not this check's business
    same = build_model(training_head_type="classification", num_labels=5, cross_layer_start=3)
    same.load_state_dict(state, strict=False)
    ft.check_pretrained_state({"model.bert.embeddings.word_embeddings.weight": torch.zeros(1)})


def test_the_logged_mode_tally_counts_the_schedule_across_logs_and_resumes():
    """Every log line names the mode of the update just run and the modes of updates 0..n-1 counted
    from the schedule, whatever the spacing of the logs; a smaller update (a resume) counts afresh."""
    model = build_model(mode_schedule="random", single_stream_ratio=0.3)
    schedule = model.schedule

    def expected(update):
        modes = schedule.modes(update)
        return (f"semvlp modes: update {update} ran {schedule(update - 1)}-stream; updates so far: single "
                f"{modes.count(SINGLE)}, two {modes.count(TWO)} (mode_schedule: random)")

    assert model.log_message(TrainingProgress(update=0, epoch=0)) is None
    for update in (1, 2, 7, 8, 20, 5, 6, 33):
        assert model.log_message(TrainingProgress(update=update, epoch=0)) == expected(update)
    assert len({schedule(u) for u in range(33)}) == 2  # the sample of updates saw both modes
    assert build_model(training_head_type="classification", num_labels=3).log_message(TrainingProgress(update=5, epoch=0)) is None


@pytest.mark.parametrize("blocks,words", [
    ([], "no cross-attention (L_s = 4)"),
    ([0, 1, 2, 3], "cross-attention in blocks 1..4 (L_s = 0, cross_attention_layers: upper "
                   "(or cross_attention_layers: all))"),
    ([3, 2], "cross-attention in blocks 3..4 (L_s = 2, cross_attention_layers: upper)"),
    ([1, 3], "cross-attention in blocks [2, 4]"),
])
def test_cross_attention_layouts_in_words(blocks, words):
    from mmf_multilevel.methods.semvlp.network import describe_cross_layout

    assert describe_cross_layout(blocks, 4) == words


@pytest.mark.parametrize("mode", ["single", "two"])
def test_the_adapter_hands_the_backbone_token_types_padding_and_corrupted_regions(mode):
    """encode and the pre-training forward give the network the batch's token types, the region padding
    mask and (pre-training) the corrupted features, in the mode asked for: the same numbers as the
    network called by hand, and different ones if the types or the padding were dropped."""
    from mmf_multilevel.methods.batch import region_inputs

    model = build_model(mode_schedule=mode, mode=mode).train()
    sl = sample_list()
    sl.segment_ids = (torch.arange(8) >= 4).long().expand(3, 8) * sl.input_mask
    model.on_update_start(TrainingProgress(update=0, epoch=0))
    regions = region_inputs(sl, "semvlp", FEAT, "4d")
    by_hand = model.backbone(sl.input_ids, sl.input_mask, regions.corrupted, regions.boxes, regions.mask,
                             sl.segment_ids, mode=mode)
    torch.testing.assert_close(model(sl)["scores"], model.heads.itm(by_hand["pooled"]))
    model.eval()
    clean = model.backbone(sl.input_ids, sl.input_mask, regions.features, regions.boxes, regions.mask,
                           sl.segment_ids, mode=mode)
    torch.testing.assert_close(model.encode(sl)["pooled"], clean["pooled"])
    no_types = model.backbone(sl.input_ids, sl.input_mask, regions.features, regions.boxes, regions.mask, mode=mode)
    no_padding = model.backbone(sl.input_ids, sl.input_mask, regions.features, regions.boxes, None,
                                sl.segment_ids, mode=mode)
    assert not torch.allclose(clean["pooled"], no_types["pooled"])
    assert not torch.allclose(clean["pooled"][2], no_padding["pooled"][2])


@pytest.mark.parametrize("mode", [SINGLE, TWO])
def test_hidden_states_only_when_asked_one_per_block_plus_the_embeddings(mode):
    net = tiny_network()
    ids, mask, feats, boxes, rmask = batch()
    plain = net(ids, mask, feats, boxes, rmask, mode=mode)
    out = net(ids, mask, feats, boxes, rmask, mode=mode, output_hidden_states=True)
    keys = ("hidden_states",) if mode == SINGLE else ("text_hidden_states", "object_hidden_states")
    assert not any(key in plain for key in keys)
    for key in keys:
        assert len(out[key]) == LAYERS + 1
    if mode == TWO:
        assert torch.equal(out["text_hidden_states"][-1], out["text"])
        assert torch.equal(out["object_hidden_states"][-1], out["objects"])
    else:
        assert torch.equal(out["hidden_states"][-1], out["sequence"])


def test_settings_reach_the_heads_the_network_and_the_schedule():
    """The task heads take BERT's dropout, LayerNorm eps and initializer range (two labels for NLVR2 and
    matching); ``cross_attention_layers``, ``schedule_seed`` and ``pretraining.feature_loss`` reach the
    network, the schedule and the loss; a wrong ``mode`` names its key."""
    settings = dict(hidden_dropout_prob=0.3, layer_norm_eps=1e-6, initializer_range=0.5)
    vqa = build_model(training_head_type="classification", num_labels=5, **settings).classifier
    nlvr2 = build_model(training_head_type="nlvr2", **settings).classifier
    itm = build_model(training_head_type="retrieval", **settings).itm_head
    assert vqa.dropout.p == nlvr2.dropout.p == itm.dropout.p == 0.3
    assert vqa.LayerNorm.eps == nlvr2.classifier[2].eps == 1e-6
    assert nlvr2.classifier[3].out_features == itm.classifier.out_features == 2
    for weight in (vqa.dense.weight, nlvr2.classifier[0].weight, itm.classifier.weight):
        assert weight.std().item() == pytest.approx(0.5, rel=0.25)
    upper, every = build_model(), build_model(cross_attention_layers="all")
    assert len(every.backbone.cross_attention) == LAYERS > len(upper.backbone.cross_attention) == LAYERS - LS
    draws = [build_model(mode_schedule="random", schedule_seed=seed).schedule.modes(64) for seed in (0, 7)]
    assert draws[0] != draws[1]
    sl = sample_list()
    losses = {}
    for kind in ("mse", "smooth_l1"):
        model = build_model(mode_schedule="single", pretraining=dict(feature_loss=kind)).train()
        model.on_update_start(TrainingProgress(update=0, epoch=0))
        losses[kind] = model(sl)["losses"]["train/coco_captions/single/mrfr"]
    assert not torch.allclose(losses["mse"], losses["smooth_l1"])
    with pytest.raises(ValueError, match="model_config.semvlp.mode"):
        build_model(mode="three")


def test_bert_weights_by_path_start_the_encoder_and_the_masked_lm_head(tmp_path):
    from transformers import BertForPreTraining

    torch.manual_seed(5)
    source = BertForPreTraining(tiny_bert())
    with torch.no_grad():
        source.cls.predictions.transform.dense.weight.normal_(0.0, 3.0)
    source.save_pretrained(tmp_path / "bert")
    state = source.state_dict()
    model = build_model(bert_model_name=str(tmp_path / "bert"))
    torch.testing.assert_close(model.backbone.text.bert.encoder.layer[0].attention.self.query.weight,
                               state["bert.encoder.layer.0.attention.self.query.weight"])
    torch.testing.assert_close(model.heads.mlm.transform.dense.weight, state["cls.predictions.transform.dense.weight"])
    fresh = build_model(bert_model_name=str(tmp_path / "bert"), pretraining=dict(init_mlm_from_bert=False))
    assert not torch.allclose(fresh.heads.mlm.transform.dense.weight, state["cls.predictions.transform.dense.weight"])


def test_network_defaults_region_settings_and_the_bounds_of_ls():
    """Built with the defaults, the network is the paper's (2048-d features, L_s = 6, cross-attention
    in the upper blocks); the object embedding takes BERT's dropout, LayerNorm ε and initialiser; L_s
    may be 0 (every block cross-attends) up to the number of blocks (none does); the output names the
    mode that ran; a wrong mode is refused by the name ``mode``."""
    from mmf_multilevel.methods.semvlp.network import check_mode

    six = SemVLPNetwork(BertTextEncoder.from_config(tiny_bert(num_hidden_layers=6)))
    assert (six.feature_dim, six.cross_layer_start, six.cross_attention_layers) == (2048, 6, "upper")
    assert len(six.cross_attention) == 0
    torch.manual_seed(0)
    objects = SemVLPNetwork(BertTextEncoder.from_config(
        tiny_bert(hidden_dropout_prob=0.3, layer_norm_eps=1e-6, initializer_range=0.5)), 400, LS).objects
    assert objects.dropout.p == 0.3 and objects.norm is not None and objects.norm.eps == 1e-6
    assert objects.proj.weight.std().item() == pytest.approx(0.5, rel=0.1)
    assert len(tiny_network(cross_layer_start=0).cross_attention) == LAYERS
    assert len(tiny_network(cross_layer_start=LAYERS).cross_attention) == 0
    for bad in (-1, LAYERS + 1):
        with pytest.raises(ValueError, match=r"cross_layer_start \(L_s\) must lie in \[0, 4\]"):
            tiny_network(cross_layer_start=bad)
    net = tiny_network()
    for mode in (SINGLE, TWO):
        assert run(net, mode)["mode"] == mode
    with pytest.raises(ValueError, match=r"^mode must be one of \['single', 'two'\], got 'three'"):
        check_mode("three")


def test_pretraining_heads_follow_the_bert_settings_and_exist_when_they_have_classes():
    """The object and QA heads take BERT's activation, LayerNorm ε and initialiser; the detected-label head
    exists from one class up, the QA head from one answer up (none by default)."""
    torch.manual_seed(0)
    net = SemVLPNetwork(BertTextEncoder.from_config(
        tiny_bert(hidden_act="relu", layer_norm_eps=1e-6, initializer_range=0.5)), FEAT, LS)
    heads = SemVLPPretrainingHeads(net, 1, 1)
    assert heads.mrc.decoder.out_features == 1 and heads.qa.classifier.out_features == 1
    for head in (heads.mrfr, heads.mrc):
        assert_bert_transform(head.transform, torch.nn.ReLU, eps=1e-6, std=0.5, rel=0.25)
    assert heads.qa.LayerNorm.eps == 1e-6
    assert heads.qa.dense.weight.std().item() == pytest.approx(0.5, rel=0.25)
    assert heads.itm.classifier.weight.std().item() == pytest.approx(0.5, rel=0.35)
    none = SemVLPPretrainingHeads(net, 0)
    assert none.mrc is None and none.qa is None and none.num_qa_answers == 0


def test_mismatched_only_batches_and_batches_without_detector_labels():
    """With every pair mismatched the MLM loss is an exact zero still in the graph (not the bias of the
    decoder); without detector labels there is no label loss even though the head exists."""
    net = tiny_network()
    heads = heads_for(net)
    with torch.no_grad():
        heads.mlm.bias.fill_(0.5)
    out = run(net, SINGLE)
    mlm, selected, labels, targets, _, _ = loss_inputs()
    losses = pretraining_losses(heads, out, mlm, targets, selected, None, torch.zeros(3, dtype=torch.long))
    assert losses["mlm"].item() == 0.0 and losses["mlm"].requires_grad
    assert "mrc" not in losses and set(losses) == {"mlm", "mrfr", "itm"}


DEFAULT_SCHEDULE_24 = "tstssttssstsssstststtstt"
SEED7_SCHEDULE_24 = "ssstsstssstttstttsttssts"


def test_the_random_mode_schedule_is_the_same_from_version_to_version():
    """A resumed run draws the modes its logged tally counted: the (seed, step) coin is fixed, here pinned for
    the default schedule (random, ratio 0.5, seed 0) and seed 7."""
    as_text = lambda modes: "".join("s" if m == SINGLE else "t" for m in modes)
    assert as_text(ModeSchedule().modes(24)) == DEFAULT_SCHEDULE_24
    assert as_text(ModeSchedule("random", 0.5, 7).modes(24, start=1000)) == SEED7_SCHEDULE_24


def test_the_alignment_names_the_attention_it_reads_and_the_model_in_its_errors():
    """The alignment picture's source names the last block (1-based) of each mode's attention; a batch
    without text is refused naming the model."""
    sources = {}
    for mode in (SINGLE, TWO):
        model = build_model(training_head_type="classification", num_labels=ANSWERS, mode=mode).eval()
        sources[mode] = model.alignment(sample_list(captions=False))["source"]
    assert sources[SINGLE] == f"single-stream self-attention, text to objects, block {LAYERS} of {LAYERS}, mean of 4 heads"
    assert sources[TWO] == (f"two-stream object-to-text cross-attention, block {LAYERS} of {LAYERS}, transposed and "
                            "normalised over the objects, mean of 4 heads")
    sl = sample_list(captions=False)
    del sl["input_ids"]
    with pytest.raises(KeyError, match="semvlp needs 'input_ids'"):
        model.alignment(sl)
