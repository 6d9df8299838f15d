"""The registered ``simla`` model (``mmf_multilevel/methods/simla/model.py``) on the tiny configuration of
``methods/simla/testing.py``: the momentum copies outside the optimizer, the EMA once per update, the queues
filled with the momentum features, the ITC/ITM wiring recomputed from the pieces, a few steps lowering every
loss, and checkpoints carrying the momentum model and the queues."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from helpers.simla import rows_of, unimodal_features, unmasked_ids
from helpers.spies import recorded
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.simla import testing
from mmf_multilevel.methods.simla.losses import itc_loss, itm_labels, itm_pair_indices, sample_hard_negatives

pytestmark = pytest.mark.usefixtures("mmf_global_config")

LOSSES = ("itc", "itm", "mlm", "mim", "psl")


def build(seed=0, **overrides):
    from mmf.common.registry import registry

    cls = registry.get_model_class("simla")
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.simla, testing.tiny_config("pretraining"),
                             overrides)
    torch.manual_seed(seed)
    model = cls(config)
    model.build()
    return model


def forward(model, batch, seed=1):
    torch.manual_seed(seed)
    out = model(batch)
    return {key.rsplit("/", 1)[-1]: value for key, value in out["losses"].items()}, out["scores"]


def momentum_parameters(model):
    return {id(p) for p in model.momentum.parameters()}


def tiny_bert_config():
    """The tiny BERT of ``methods/testing.py`` as a transformers ``BertConfig`` (to save a BERT folder)."""
    from transformers import BertConfig

    from mmf_multilevel.methods.testing import TINY_BERT

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")
    return BertConfig(**{k: TINY_BERT[k] for k in keys})


def test_the_momentum_copies_never_reach_an_optimizer():
    model = build()
    copies = momentum_parameters(model)
    assert copies and all(not p.requires_grad for p in model.momentum.parameters())
    groups = model.get_optimizer_parameters(OmegaConf.create({}))
    chosen = [p for group in groups for p in group["params"]]
    optimizer = model.configure_optimizer(OmegaConf.create({}))
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    for params in (chosen, in_optimizer):
        assert not copies & {id(p) for p in params}
        assert len(params) == len({id(p) for p in params})
    trainable = {id(p) for p in model.parameters() if id(p) not in copies}
    assert {id(p) for p in chosen} == trainable  # every online parameter, the dVAE none (it is no parameter)
    # weight decay on matrices and τ, none on biases and LayerNorms (the official optimizer's rule)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.heads.temp) not in no_decay and id(model.heads.itm_head.bias) in no_decay
    assert groups[1]["weight_decay"] == 0.0


def test_the_ema_runs_once_per_update_in_on_update_start_and_not_in_forward():
    model = build().train()
    batch = testing.tiny_batch("pretraining")
    online = model.backbone.image_encoder.vit.patch_embed.proj.weight
    copy = model.momentum["visual_encoder"].vit.patch_embed.proj.weight
    head, head_copy = model.heads.concept_head.weight, model.momentum["concept_head"].weight
    torch.testing.assert_close(copy, online)
    with torch.no_grad():
        online.add_(1.0)
        head.mul_(2.0)
    before, head_before = copy.detach().clone(), head_copy.detach().clone()
    forward(model, batch)
    forward(model, batch)
    assert torch.equal(copy, before) and torch.equal(head_copy, head_before), "forward moved the momentum model"
    model.on_update_start(TrainingProgress(update=1, epoch=1))
    torch.testing.assert_close(copy, 0.995 * before + 0.005 * online.detach())
    torch.testing.assert_close(head_copy, 0.995 * head_before + 0.005 * head.detach())
    # the ITM head has no copy; the MLM decoder's copy stays tied to the copied word embeddings
    assert "itm_head" not in model.momentum.names
    assert model.momentum["mlm"].decoder.weight is model.momentum["text_encoder"].word_embeddings.weight


def test_the_queues_take_the_momentum_features_after_a_training_forward_only():
    model = build().train()
    batch = testing.tiny_batch("pretraining")
    with torch.no_grad():  # online != momentum, so the test tells them apart
        model.heads.vision_proj.weight.add_(torch.randn_like(model.heads.vision_proj.weight))
        model.heads.text_proj.weight.add_(torch.randn_like(model.heads.text_proj.weight))
    queue_image, queue_text = model.queues.image_queue.clone(), model.queues.text_queue.clone()
    forward(model, batch)
    size = batch.input_ids.size(0)
    assert int(model.queues.queue_ptr) == size
    ids = unmasked_ids(batch)
    with torch.no_grad():
        features = unimodal_features(model, batch.image, ids, batch.input_mask)
    torch.testing.assert_close(model.queues.image_queue[:, :size], features["image_feat_m"].t())
    torch.testing.assert_close(model.queues.text_queue[:, :size], features["text_feat_m"].t())
    assert torch.equal(model.queues.image_queue[:, size:], queue_image[:, size:])
    assert torch.equal(model.queues.text_queue[:, size:], queue_text[:, size:])
    model.eval()
    state = {k: v.clone() for k, v in model.queues.state_dict().items()}
    forward(model, batch)
    assert all(torch.equal(model.queues.state_dict()[k], v) for k, v in state.items()), "evaluation enqueued"


def test_every_loss_is_present_and_finite_and_the_switches_drop_theirs():
    batch = testing.tiny_batch("pretraining")
    losses, scores = forward(build().train(), batch)
    assert set(losses) == set(LOSSES)
    assert all(torch.isfinite(v) and v.numel() == 1 for v in losses.values())
    assert scores.shape == (3 * batch.input_ids.size(0), 2)
    losses, _ = forward(build(mlm=False, mim=False, psl=False).train(), batch)
    assert set(losses) == {"itc", "itm"}
    assert build(mim=False).dvae is None


def test_itc_and_itm_equal_a_recomputation_from_the_pieces():
    model = build().eval()  # no dropout, no enqueue
    model.alpha = 0.4
    with torch.no_grad():
        model.heads.vision_proj.weight.add_(torch.randn_like(model.heads.vision_proj.weight))  # online and momentum features differ
        model.backbone.text_encoder.cross_attention["0"].self.query.weight.mul_(1.5)
    batch = testing.tiny_batch("pretraining")
    queues = (model.queues.image_queue.clone(), model.queues.text_queue.clone())
    losses, scores = forward(model, batch, seed=7)
    ids = unmasked_ids(batch)  # the unmasked caption
    mask = batch.input_mask
    with torch.no_grad():
        bert, heads = model.backbone.text_encoder, model.heads
        f = unimodal_features(model, batch.image, ids, mask)
        image = f["image"]
        itc = itc_loss(f["image_feat"], f["text_feat"], f["image_feat_m"], f["text_feat_m"], *queues, heads.temp, 0.4)
        torch.testing.assert_close(losses["itc"], itc.loss)
        torch.manual_seed(7)  # the negatives are the forward's first random draw
        neg_text, neg_image = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i)
        text_index, image_index = itm_pair_indices(neg_text, neg_image)
        fused = bert.fuse(ids[text_index], mask[text_index], image[image_index])
        logits = heads.itm_head(fused[:, 0])
    torch.testing.assert_close(scores, logits)
    torch.testing.assert_close(losses["itm"], F.cross_entropy(logits, itm_labels(ids.size(0))))


def test_a_few_steps_on_a_fixed_batch_lower_every_loss():
    model = build().train()
    batch = testing.tiny_batch("pretraining")
    optimizer = model.configure_optimizer(OmegaConf.create({}))
    for group in optimizer.param_groups:
        group["lr"] = 2e-3
    model._optimizer = None  # a fixed learning rate for this test
    first = None
    for update in range(40):
        model.on_update_start(TrainingProgress(update=update, epoch=1))
        optimizer.zero_grad()
        losses, _ = forward(model, batch, seed=3)  # the same MIM masks and negatives at every step
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        sum(losses.values()).backward()
        optimizer.step()
    with torch.no_grad():
        last, _ = forward(model, batch, seed=3)
    for name in LOSSES:
        assert float(last[name]) < first[name], (name, first[name], float(last[name]))


def test_the_state_dict_carries_the_momentum_model_and_queues_and_reloads_exactly():
    model = build(seed=0).train()
    batch = testing.tiny_batch("pretraining")
    with torch.no_grad():
        model.heads.vision_proj.weight.add_(torch.randn_like(model.heads.vision_proj.weight))
    for update in range(2):
        model.on_update_start(TrainingProgress(update=update, epoch=1))
        forward(model, batch, seed=update)
    state = model.state_dict()
    assert any(k.startswith("momentum.copies.visual_encoder.") for k in state)
    assert any(k.startswith("momentum.copies.text_encoder.") for k in state)
    assert {"queues.image_queue", "queues.text_queue", "queues.queue_ptr"} <= set(state)
    assert int(state["queues.queue_ptr"]) == 2 * batch.input_ids.size(0)
    assert not any("dvae" in k for k in state)
    fresh = build(seed=5).train()
    fresh.load_state_dict(state, strict=True)
    for other in (model, fresh):
        other.on_update_start(TrainingProgress(update=2, epoch=1))
    ours, our_scores = forward(model, batch, seed=9)
    theirs, their_scores = forward(fresh, batch, seed=9)
    torch.testing.assert_close(their_scores, our_scores)
    for name in LOSSES:
        torch.testing.assert_close(theirs[name], ours[name])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_alpha_ramp_and_learning_rate_follow_the_pushed_update():
    model = build(alpha_ramp_updates=10, optimization=dict(warmup_updates=4, total_updates=12, lr=1e-4,
                                                           warmup_lr=1e-5, min_lr=1e-5))
    optimizer = model.configure_optimizer(OmegaConf.create({}))
    seen = []
    for update in (0, 2, 4, 8, 12, 20):
        model.on_update_start(TrainingProgress(update=update, epoch=1))
        seen.append((model.alpha, optimizer.param_groups[0]["lr"]))
    assert [a for a, _ in seen] == pytest.approx([0.0, 0.08, 0.16, 0.32, 0.4, 0.4])
    assert [lr for _, lr in seen] == pytest.approx([1e-5, 5.5e-5, 1e-4, 5.5e-5, 1e-5, 1e-5])


def test_encode_gives_the_unimodal_outputs_and_their_features_of_a_batch_or_a_side():
    """``encode``: the ViT's patch sequence and the BERT's text-mode output (the caption as given), the text [CLS]
    as ``pooled``, and the projected, normalised [CLS] features g_v, g_l (paper §2.2); ``side`` reads that image."""
    from mmf.common.sample import SampleList

    model = build().eval()
    batch = testing.tiny_batch("pretraining")
    with torch.no_grad():
        out = model.encode(batch)
        want = unimodal_features(model, batch.image, batch.input_ids, batch.input_mask)
        text = want["text"]
        for key in ("image", "text", "image_feat", "text_feat"):
            torch.testing.assert_close(out[key], want[key])
        torch.testing.assert_close(out["pooled"], text[:, 0])
        assert not torch.allclose(text, model.backbone.text_encoder.encode_text(batch.input_ids,
                                                                                torch.ones_like(batch.input_mask)))
        flipped = batch.image.flip(-1)
        batch.img1 = SampleList({"image": flipped, "image_size": batch.image_size})
        torch.testing.assert_close(model.encode(batch, side="img1")["image"], model.backbone.image_encoder(flipped))
    with pytest.raises(KeyError, match=r"simla needs the paired layout \('img0' missing"):
        model.encode(batch, side="img0")
    del batch["input_ids"]
    with pytest.raises(KeyError, match="simla needs 'input_ids'"):
        model.encode(batch)


def test_the_dvae_view_undoes_the_normalisation_and_halves_each_side_with_antialiasing():
    """The dVAE's input (paper §2.3, MIM): the ViT's crop back in [0, 1] (``pixel_mean`` / ``pixel_std`` undone),
    resized to half of each side as torchvision's antialiased bilinear resize does, in [0, 1]."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    model = build(pixel_mean=[0.2, 0.5, 0.7], pixel_std=[0.1, 0.3, 0.25])
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 3  # values far outside [0, 1]
    mean = torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1)
    std = torch.tensor([0.1, 0.3, 0.25]).view(1, 3, 1, 1)
    raw = (pixels * std + mean).clamp(0.0, 1.0)
    assert (raw == 0).any() and (raw == 1).any()
    want = resize(raw, [16, 24], interpolation=InterpolationMode.BILINEAR, antialias=True).clamp(0.0, 1.0)
    got = model.dvae_view(pixels)
    assert got.shape == (2, 3, 16, 24)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_mim_loss_equals_a_recomputation_from_the_pieces(monkeypatch):
    """MIM (paper §2.3, Eqs. 6-7): a BEiT block mask with the configured settings, the dVAE tokens of the masked
    patches as labels, the masked image's tokens through the BERT as queries cross-attending to the unmasked
    caption's embedding-layer output (its padding masked), the MIM head; the teacher: the momentum ViT, BERT and
    head on the same mask and memory, distilled at α."""
    from mmf_multilevel.methods.simla import model as simla_model
    from mmf_multilevel.methods.simla.losses import distilled_token_loss
    from mmf_multilevel.methods.simla.vision import block_mask

    masks = recorded(monkeypatch, simla_model, "block_mask")
    model = build(mim_masked_patches=5, mim_min_block=3, mim_min_aspect=0.5).eval()
    with torch.no_grad():  # online and momentum heads differ
        model.heads.mim_head.weight.add_(torch.randn_like(model.heads.mim_head.weight))
    batch = testing.tiny_batch("pretraining")
    ids, mask = unmasked_ids(batch), batch.input_mask
    assert (mask == 0).any()  # padded captions: the memory mask matters
    torch.manual_seed(11)
    with torch.no_grad():
        got = model._mim_loss(batch.image, ids, mask, 0.4)
        (args, kwargs, _), = masks
        assert kwargs["num_masked"] == 5 and kwargs["min_block"] == 3 and kwargs["min_aspect"] == 0.5
        vit, bert, m = model.backbone.image_encoder, model.backbone.text_encoder, model.momentum
        torch.manual_seed(11)
        mim_mask = block_mask(batch.image.size(0), vit.grid_size, num_masked=5, min_block=3, min_aspect=0.5)
        labels = model.dvae(model.dvae_view(batch.image))[mim_mask]
        memory = bert.embed(ids)
        hidden = bert.encode(bert.embed(inputs_embeds=vit(batch.image, mim_mask)), None, memory=memory,
                             memory_mask=mask)
        logits = model.heads.mim_head(hidden[:, 1:][mim_mask])
        teacher_bert = m["text_encoder"]
        hidden_m = teacher_bert.encode(teacher_bert.embed(inputs_embeds=m["visual_encoder"](batch.image, mim_mask)),
                                       None, memory=memory, memory_mask=mask)
        teacher = m["mim_head"](hidden_m[:, 1:][mim_mask])
        want = distilled_token_loss(logits, labels, teacher, 0.4)
        unmasked_memory = bert.encode(bert.embed(inputs_embeds=vit(batch.image, mim_mask)), None, memory=memory)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(unmasked_memory, hidden)  # the memory mask changes the output
    assert not torch.allclose(teacher, logits)


def _perturbed(model):
    """Online weights moved away from their momentum copies (ViT, BERT, MLM transform, concept head), so a test
    tells which model a term reads."""
    with torch.no_grad():
        for weight in (model.backbone.image_encoder.vit.patch_embed.proj.weight,
                       model.backbone.text_encoder.cross_attention["0"].self.query.weight,
                       model.heads.mlm.transform.dense.weight, model.heads.concept_head.weight):
            weight.add_(0.5 * torch.randn_like(weight))
    return model


def test_the_mlm_loss_equals_a_recomputation_from_the_pieces(monkeypatch):
    """MLM (paper Eqs. 6-7): the masked caption (as the dataset gave it) through the multimodal BERT reading the
    online image tokens, the MLM head at the labelled positions; the teacher: the momentum BERT reading the momentum
    image tokens and the momentum MLM head, distilled at α."""
    from mmf_multilevel.methods.simla import model as simla_model
    from mmf_multilevel.methods.simla.losses import mlm_loss

    calls = recorded(monkeypatch, simla_model, "mlm_loss")
    torch.manual_seed(3)
    model = _perturbed(build()).eval()
    model.alpha = 0.4
    batch = testing.tiny_batch("pretraining")
    losses, _ = forward(model, batch)
    masked, mask, labels = batch.input_ids, batch.input_mask, batch.lm_label_ids
    keep = labels >= 0
    with torch.no_grad():
        bert, m = model.backbone.text_encoder, model.momentum
        logits = model.heads.mlm(bert.fuse(masked, mask, model.backbone.image_encoder(batch.image))[keep])
        teacher = m["mlm"](m["text_encoder"].fuse(masked, mask, m["visual_encoder"](batch.image))[keep])
        want = mlm_loss(logits, labels[keep], teacher, 0.4)
        ((got_logits, got_labels, got_teacher, got_alpha), _, _), = calls
        torch.testing.assert_close(got_logits, logits)
        torch.testing.assert_close(got_teacher, teacher)
        assert torch.equal(got_labels, labels[keep]) and got_alpha == 0.4
        # the recomputation tells the student from the teacher and the masked caption from the original
        assert not torch.allclose(want, mlm_loss(logits, labels[keep], logits, 0.4))
        unmasked = torch.where(keep, labels, masked)
        other = model.heads.mlm(bert.fuse(unmasked, mask, model.backbone.image_encoder(batch.image))[keep])
        assert not torch.allclose(want, mlm_loss(other, labels[keep], teacher, 0.4))
    torch.testing.assert_close(losses["mlm"], want)
    # α = 0: the hard term alone, the momentum model not run
    model.alpha = 0.0
    losses, _ = forward(model, batch)
    torch.testing.assert_close(losses["mlm"], F.cross_entropy(logits, labels[keep]))
    assert calls[-1][0][2] is None


@pytest.mark.parametrize("settings", [dict(psl_k_per_head=2, psl_num_labels=3, psl_replicate_official=False),
                                      dict(psl_k_per_head=3, psl_num_labels=2, psl_replicate_official=True,
                                           num_hidden_layers=3)])
def test_the_psl_loss_equals_a_recomputation_from_the_pieces(settings, monkeypatch):
    """PSL (paper §2.4, Eqs. 8-9): keywords voted from the momentum BERT's last-layer self-attention over the
    unmasked caption reading the online image tokens (the special tokens and padding excluded, the configured
    votes), predicted by the concept head from the online image feature, distilled from the momentum concept head
    on the momentum image feature."""
    from mmf_multilevel.methods.simla import model as simla_model
    from mmf_multilevel.methods.simla.losses import psl_loss, psl_targets

    calls = recorded(monkeypatch, simla_model, "psl_targets")
    torch.manual_seed(3)
    model = _perturbed(build(**settings)).eval()
    model.alpha = 0.3
    batch = testing.tiny_batch("pretraining")
    losses, _ = forward(model, batch)
    ids, mask = unmasked_ids(batch), batch.input_mask
    with torch.no_grad():
        f = unimodal_features(model, batch.image, ids, mask)
        bert_m = model.momentum["text_encoder"]
        _, attentions = bert_m.fuse(ids, mask, f["image"], output_attentions=True)
        targets = psl_targets(attentions[-1], ids, bert_m.config.vocab_size, attention_mask=mask,
                              excluded_ids=(testing.CLS, testing.SEP, testing.PAD), cls_token_id=testing.CLS,
                              k_per_head=settings["psl_k_per_head"], num_labels=settings["psl_num_labels"],
                              replicate_official=settings["psl_replicate_official"])
        logits = model.heads.concept_head(f["image_feat"])
        teacher = model.momentum["concept_head"](f["image_feat_m"])
        want = psl_loss(logits, targets, teacher, 0.3)
        assert targets.sum(-1).max() <= settings["psl_num_labels"] and targets.sum() > 0
        (args, kwargs, _), = calls  # the votes' inputs themselves (a small change in them may keep the same votes)
        torch.testing.assert_close(args[0], attentions[-1])
        assert torch.equal(args[1], ids) and args[2] == bert_m.config.vocab_size
        assert torch.equal(kwargs.pop("attention_mask"), mask)
        assert kwargs == dict(excluded_ids=(testing.CLS, testing.SEP, testing.PAD), cls_token_id=testing.CLS,
                              k_per_head=settings["psl_k_per_head"], num_labels=settings["psl_num_labels"],
                              replicate_official=settings["psl_replicate_official"])
        assert not torch.allclose(attentions[-1], bert_m.fuse(ids, None, f["image"], output_attentions=True)[1][-1])
        assert not torch.allclose(want, psl_loss(logits, targets, logits, 0.3))
    torch.testing.assert_close(losses["psl"], want)


def test_a_batch_of_one_keeps_itm_as_a_connected_zero_and_scores_its_pair():
    """One caption has no in-batch negative (the official loader drops such a batch): ITM is 0 with a gradient
    path, the scores are the ITM logits of the one pair, the other losses are computed as usual."""
    model = build().eval()
    full = testing.tiny_batch("pretraining")
    batch = rows_of(full, slice(1, 2))
    assert (batch.input_mask == 0).any()  # a padded caption: its mask matters
    losses, scores = forward(model, batch)
    assert set(losses) == set(LOSSES) and float(losses["itm"].detach()) == 0.0 and losses["itm"].requires_grad
    ids = unmasked_ids(batch)
    with torch.no_grad():
        image = model.backbone.image_encoder(batch.image)
        want = model.heads.itm_head(model.backbone.text_encoder.fuse(ids, batch.input_mask, image)[:, 0])
    assert scores.shape == (1, 2)
    torch.testing.assert_close(scores, want)
    losses, scores = forward(model, rows_of(full, slice(0, 2)))
    assert scores.shape == (6, 2) and float(losses["itm"].detach()) > 0  # two captions: the negatives are drawn


def test_pretraining_needs_mlm_targets_only_with_mlm_and_reads_the_caption_as_given_without():
    batch = testing.tiny_batch("pretraining")
    del batch["lm_label_ids"]
    with pytest.raises(KeyError, match=r"dataset_config\.simla_contract a masked_token text_processor.*mlm: false"):
        forward(build().train(), batch)
    model = build(mlm=False, mim=False, psl=False).eval()
    model.alpha = 0.4
    losses, _ = forward(model, batch)
    with torch.no_grad():
        f = unimodal_features(model, batch.image, batch.input_ids, batch.input_mask)
        itc = itc_loss(f["image_feat"], f["text_feat"], f["image_feat_m"], f["text_feat_m"],
                       model.queues.image_queue, model.queues.text_queue, model.heads.temp, 0.4)
    torch.testing.assert_close(losses["itc"], itc.loss)


def test_log_message_reports_alpha_temperature_queue_and_skipped_batches():
    model = build(queue_size=12)
    model.alpha = 0.25
    with torch.no_grad():
        model.heads.temp.fill_(0.0625)
    model.queues.queue_ptr.fill_(8)
    assert model.log_message(None) == "simla: alpha 0.250, temp 0.0625, queue pointer 8 of 12"
    model.skipped_enqueues = 3
    assert model.log_message(None).endswith("queue pointer 8 of 12, 3 batches not enqueued")
    task = build(training_head_type="snli_ve")
    task.alpha = 0.5
    assert task.log_message(None) == "simla: alpha 0.500"


def test_the_retrieval_encoders_are_the_dual_encoder_for_pretraining_and_retrieval_only():
    from mmf_multilevel.methods.simla.retrieval import SIMLADualEncoder

    for head_type in ("pretraining", "retrieval"):
        model = build(**testing.tiny_config(head_type))
        encoders = model.retrieval_encoders()
        assert isinstance(encoders, SIMLADualEncoder) and encoders.model is model
    assert build(**testing.tiny_config("snli_ve")).retrieval_encoders() is None


ENTRY_POINTS = [  # (head type, the call, the field removed)
    ("pretraining", lambda model, batch: model(batch), "image"),
    ("pretraining", lambda model, batch: model.pretraining_match_logits(batch), "input_ids"),
    ("pretraining", lambda model, batch: model.pretraining_match_logits(batch), "image"),
    ("pretraining", lambda model, batch: model.alignment(batch), "input_ids"),
    ("pretraining", lambda model, batch: model.alignment(batch), "image"),
    ("retrieval", lambda model, batch: model(batch), "image"),
    ("retrieval", lambda model, batch: model.eval()(_gallery(batch)), "input_ids"),
    ("retrieval", lambda model, batch: model.eval()(_gallery(batch)), "image"),
    ("vqa", lambda model, batch: model(batch), "image"),
    ("nlvr2", lambda model, batch: model(batch), "img1"),
    ("nlvr2_assignment", lambda model, batch: model(batch), "image"),
]


def _gallery(batch):
    batch.pair_image_index = batch.pop("image_index")
    batch.pair_text_index = torch.arange(batch.pair_image_index.size(0))
    return batch


@pytest.mark.parametrize("head_type,call,field", ENTRY_POINTS)
def test_every_entry_point_names_the_model_and_the_missing_field(head_type, call, field):
    model = build(**testing.tiny_config(head_type))
    batch = testing.tiny_batch(head_type)
    del batch[field]
    with pytest.raises(KeyError, match=rf"simla needs .*'?{field}"):
        call(model, batch)


def test_the_alignment_of_a_padded_caption_equals_that_of_the_caption_alone():
    """The alignment reads the last layer's text-to-patch cross-attention of the first sample: its rows are the
    caption's real tokens, its columns the patches (a bool mask over the ViT grid), and the caption's padding changes
    nothing (the multimodal pass masks it)."""
    from mmf.common.sample import SampleList

    model = build().eval()
    with torch.no_grad():  # a sharper (far from uniform) cross-attention, so a change in its queries shows
        cross = model.backbone.text_encoder.cross_attention["1"].self
        cross.query.weight.mul_(30.0)
        cross.key.weight.mul_(30.0)
    full = testing.tiny_batch("pretraining")
    padded = SampleList({"input_ids": full.input_ids[1:2], "input_mask": full.input_mask[1:2],
                         "image": full.image[1:2], "image_size": full.image_size[1:2]})
    length = int(padded.input_mask.sum())
    assert length < padded.input_ids.size(1)
    alone = SampleList({"input_ids": padded.input_ids[:, :length], "input_mask": padded.input_mask[:, :length],
                        "image": padded.image, "image_size": padded.image_size})
    with torch.no_grad():
        got, want = model.alignment(padded), model.alignment(alone)
    grid = tuple(model.backbone.image_encoder.grid_size)
    assert got["weights"].shape == (length, grid[0] * grid[1])
    torch.testing.assert_close(got["weights"], want["weights"])
    assert got["visual_valid"].dtype == torch.bool and bool(got["visual_valid"].all())
    assert got["source"].startswith("cross-attention, text to image patches, layer 2 of 2")
    assert got["grid"] == grid and got["cell"] == tuple(model.backbone.image_encoder.vit.patch_embed.patch_size)
    with pytest.raises(ValueError, match="simla alignment reads one image per text; a nlvr2 model"):
        build(**testing.tiny_config("nlvr2")).alignment(full)


def test_mim_at_alpha_zero_runs_no_teacher(monkeypatch):
    """α = 0 (the start of the ramp): MIM's loss gets no teacher and the momentum ViT is not run for it."""
    from mmf_multilevel.methods.simla import model as simla_model

    calls = recorded(monkeypatch, simla_model, "distilled_token_loss")
    model = build().eval()
    batch = testing.tiny_batch("pretraining")
    ids = unmasked_ids(batch)
    runs = []
    model.momentum["visual_encoder"].register_forward_hook(lambda *args: runs.append(1))
    with torch.no_grad():
        model._mim_loss(batch.image, ids, batch.input_mask, 0.0)
    ((_, _, teacher, alpha), _, _), = calls
    assert teacher is None and alpha == 0.0 and not runs


# ---------------------------------------------------------------------- build and optimisation settings
def test_the_head_and_momentum_settings_reach_their_modules(tmp_path):
    """τ and its clamp range, the momentum coefficient (pre-training and the task heads), α at build time, the
    queue's image tracking (retrieval and grounding only), a fresh skip counter, NLVR2's two classes and no
    momentum model for the text-assignment pre-step."""
    model = build(temp=0.05, temp_range=[0.01, 0.2], momentum=0.9, alpha=0.3)
    assert float(model.heads.temp) == pytest.approx(0.05) and tuple(model.heads.temp_range) == (0.01, 0.2)
    with torch.no_grad():
        model.heads.temp.fill_(0.5)
    assert float(model.heads.clamp_temperature()) == pytest.approx(0.2)
    assert model.momentum.momentum == 0.9 and model.alpha == 0.3 and model.skipped_enqueues == 0
    for head_type in ("retrieval", "grounding"):
        assert build(**testing.tiny_config(head_type), track_queue_ids=True).queues.track_ids
    assert not build(track_queue_ids=True).queues.track_ids
    task = build(**testing.tiny_config("snli_ve"), momentum=0.9, alpha=0.3)
    assert task.momentum.momentum == 0.9 and task.alpha == 0.3 and task.skipped_enqueues == 0
    nlvr2 = build(**testing.tiny_config("nlvr2"))
    assert nlvr2.classifier(torch.zeros(1, 32)).shape == (1, 2)
    assert build(**testing.tiny_config("nlvr2_assignment")).momentum is None


def test_the_mlm_head_starts_from_the_named_berts_only_when_asked(tmp_path):
    from transformers import BertForPreTraining

    torch.manual_seed(7)
    bert = BertForPreTraining(tiny_bert_config())
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()
    bert.save_pretrained(str(tmp_path / "bert"))
    model = build(bert_model_name=str(tmp_path / "bert"), init_mlm_from_bert=True)
    head = bert.cls.predictions
    torch.testing.assert_close(model.heads.mlm.transform.dense.weight, head.transform.dense.weight)
    torch.testing.assert_close(model.heads.mlm.bias, head.bias)
    fresh = build(bert_model_name=str(tmp_path / "bert"), init_mlm_from_bert=False)
    assert not torch.allclose(fresh.heads.mlm.transform.dense.weight, head.transform.dense.weight)
    build(init_mlm_from_bert=True)  # no BERT named: nothing to load


def test_the_dvae_settings_build_its_tokenizer_or_read_its_file(tmp_path):
    from mmf_multilevel.methods.simla.vision import DVAETokenizer

    model = build(dvae_random_hidden=4, dvae_random_blocks=1)
    encoder = model.dvae.encoder
    assert (encoder.n_hid, encoder.n_blk_per_group, model.dvae.vocab_size) == (4, 1, testing.IMAGE_VOCAB)
    saved = DVAETokenizer.random(n_hid=4, n_blk_per_group=1, vocab_size=testing.IMAGE_VOCAB, seed=3)
    torch.save(saved.state_dict(), tmp_path / "dvae.pth")
    loaded = build(dvae_path=str(tmp_path / "dvae.pth")).dvae
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_the_optimizer_groups_lr_and_weight_decay_follow_the_settings():
    """AdamW (paper §2.5) with the configured weight decay on every matrix and τ, none on biases and LayerNorm
    weights; its learning rate is ``lr_at`` from the start; frozen parameters and the momentum copies are left out;
    a cosine one update long ends at ``min_lr``; α ramps to the configured value; the pushed progress is kept."""
    model = build(alpha=0.3, alpha_ramp_updates=4,
                  optimization=dict(weight_decay=0.05, warmup_updates=2, total_updates=3, lr=1e-4, warmup_lr=1e-5,
                                    min_lr=1e-6))
    frozen = model.heads.itm_head.weight
    frozen.requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = model.get_optimizer_parameters(None)
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.image_encoder.vit.patch_embed.proj.weight" in decay_names and "heads.temp" in decay_names
    layer_norms = {n for n in names.values() if "LayerNorm.weight" in n and not n.startswith("momentum.")}
    assert layer_norms and layer_norms <= no_decay_names
    assert "heads.itm_head.weight" not in decay_names | no_decay_names
    assert all(not n.startswith("momentum.") for n in decay_names | no_decay_names)
    optimizer = model.configure_optimizer(None)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    progress = TrainingProgress(update=3, epoch=1)
    model.on_update_start(progress)
    assert model.progress is progress
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6) and model.alpha == pytest.approx(0.225)


def test_the_forward_hands_mim_the_unmasked_caption_its_padding_and_alpha(monkeypatch):
    model = build().eval()
    model.alpha = 0.3
    calls = recorded(monkeypatch, model, "_mim_loss")
    batch = testing.tiny_batch("pretraining")
    losses, _ = forward(model, batch)
    ((pixels, ids, mask, alpha), _, _), = calls
    assert pixels is batch.image and alpha == 0.3 and torch.equal(mask, batch.input_mask)
    assert torch.equal(ids, unmasked_ids(batch))
    assert "mim" in losses


def test_the_network_settings_reach_the_vit_and_the_bert(monkeypatch, tmp_path):
    """The ViT's timm name, resolution, hub-weights switch, mask-token init and extra options; a BERT named by path
    read with the configured dropouts and the layout (ALBEF: the fusion layers from ``fusion_layer``)."""
    from transformers import BertModel

    from mmf_multilevel.methods.simla import model as simla_model

    calls = []
    original = simla_model.SIMLAImageEncoder

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **dict(kwargs, pretrained=False))

    monkeypatch.setattr(simla_model, "SIMLAImageEncoder", recording)
    build(vit_pretrained=True, mask_token_init="trunc_normal")
    (args, kwargs), = calls
    assert args == (testing.TINY_VIT["vit"],)
    assert kwargs == dict(image_size=testing.IMAGE_SIZE, pretrained=True, mask_token=True,
                          mask_token_init="trunc_normal", **testing.TINY_VIT["vit_options"])

    BertModel(tiny_bert_config()).save_pretrained(str(tmp_path / "bert"))
    model = build(bert_model_name=str(tmp_path / "bert"), hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2,
                  layout="albef", fusion_layer=1, mim=False)
    text = model.backbone.text_encoder
    assert (text.config.hidden_dropout_prob, text.config.attention_probs_dropout_prob) == (0.3, 0.2)
    assert text.layout == "albef" and list(text.fusion_layers) == [1]
