"""μ-VLA network, heads and losses: embeddings, every loss against an independent computation,
the ITM re-weighting, a few optimisation steps lowering each loss, and the MMF adapter."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import BertConfig, BertForPreTraining

from helpers.heads import assert_bert_transform
from mmf_multilevel.methods.muvla.model import MuVLA
from mmf_multilevel.methods.muvla.network import TASK_IDS, MuVLANetwork
from mmf_multilevel.methods.muvla.pretraining import (
    OFFICIAL_MRM_SCALE,
    MuVLAPretrainingHeads,
    itm_pair_weights,
    masked_region_mean,
    pretraining_losses,
)
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.modules.text import BertTextEncoder

# the global config MMF's Losses and the models read, as mmf_run registers it
pytestmark = pytest.mark.usefixtures("mmf_global_config")

VOCAB, HIDDEN, FEAT, TAGS, B, T, N = 50, 32, 12, 6, 4, 7, 5


def bert_config():
    return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def network(style="paper"):
    torch.manual_seed(0)
    return MuVLANetwork(BertTextEncoder.from_config(bert_config()), FEAT, style)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 4] = 3
    ids[1, 5:] = 0
    feats = torch.rand(B, N, FEAT, generator=g)
    x1y1 = torch.rand(B, N, 2, generator=g) * 0.5
    boxes5 = torch.cat([x1y1, x1y1 + 0.3, torch.full((B, N, 1), 0.09)], -1)
    rmask = torch.ones(B, N, dtype=torch.long)
    rmask[2, 3:] = 0
    return ids, mask, feats, boxes5, rmask


# ----------------------------------------------------------------------------------------- network
def test_region_embedding_is_the_sum_of_two_layer_norms_released_and_paper_adds_type_and_norm():
    net = network("released").eval()
    _, _, feats, boxes, rmask = batch()
    r = net.regions
    expected = F.layer_norm(r.feature_proj(feats), (HIDDEN,), r.feature_norm.weight, r.feature_norm.bias, 1e-12) + \
        F.layer_norm(r.box_proj(boxes), (HIDDEN,), r.box_norm.weight, r.box_norm.bias, 1e-12)
    torch.testing.assert_close(net.embed_regions(feats, boxes, rmask), expected)

    paper = network("paper").eval()
    r = paper.regions
    summed = r.feature_norm(r.feature_proj(feats)) + r.box_norm(r.box_proj(boxes)) + paper.text.token_type_embeddings.weight[1]
    torch.testing.assert_close(paper.embed_regions(feats, boxes, rmask), r.norm(summed))


def test_tag_embedding_gives_each_word_piece_its_region_box_through_the_shared_box_projection():
    net = network().eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    tag_boxes = torch.zeros(1, 5, 5)
    tag_boxes[0, 1:3] = torch.tensor([0.1, 0.2, 0.5, 0.6, 0.16])  # "hot dog" = 2 pieces of region 0
    tag_boxes[0, 3] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    out = net.embed_tags(ids, tag_boxes)
    r = net.regions
    expected = net.tag_norm(net.text.word_embeddings(ids)) + r.box_norm(r.box_proj(tag_boxes))
    torch.testing.assert_close(out, expected)
    # no position embedding: the same piece with the same box embeds the same anywhere
    torch.testing.assert_close(out[0, 1] - net.tag_norm(net.text.word_embeddings.weight[10]),
                               out[0, 2] - net.tag_norm(net.text.word_embeddings.weight[11]))


def test_forward_shapes_and_padding_regions_do_not_change_real_outputs():
    net = network().eval()
    ids, mask, feats, boxes, rmask = batch()
    out = net(ids, mask, feats, boxes, rmask)
    assert out["sequence"].shape == (B, T + N, HIDDEN)
    assert out["text"].shape == (B, T, HIDDEN) and out["regions"].shape == (B, N, HIDDEN)
    assert out["pooled"].shape == (B, HIDDEN)
    feats2 = feats.clone()
    feats2[2, 3:] = 100.0  # padded regions of sample 2
    out2 = net(ids, mask, feats2, boxes, rmask)
    torch.testing.assert_close(out2["text"][2], out["text"][2])


# ----------------------------------------------------------------------------------------- losses
def heads_and_output(style="paper"):
    net = network(style)
    heads = MuVLAPretrainingHeads(net, TAGS)
    return net, heads


def test_mlm_head_is_tied_to_the_word_embeddings():
    net, heads = heads_and_output()
    assert heads.mlm.decoder.weight is net.text.word_embeddings.weight


def test_masked_region_mean_both_normalisations():
    per = torch.arange(12.0).view(3, 4)
    sel = torch.zeros(3, 4, dtype=torch.bool)
    sel[0, 1] = sel[2, 3] = True
    assert masked_region_mean(per, sel, "masked").item() == pytest.approx((1 + 11) / 2)
    assert masked_region_mean(per, sel, "official").item() == pytest.approx((1 + 11) / 12 * 6.67)
    assert OFFICIAL_MRM_SCALE == 6.67
    assert masked_region_mean(per, torch.zeros_like(sel)).item() == 0.0


def region_tag_targets(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids, mask, feats, boxes, rmask = batch()
    labels = torch.full((B, T), -1)
    labels[0, 1], labels[0, 3], labels[2, 2], labels[3, 6] = 7, 8, 9, 10
    selected = torch.zeros(B, N, dtype=torch.bool)
    selected[0, 0] = selected[1, 2] = selected[3, 4] = True
    mrc = torch.randint(0, TAGS, (B, N), generator=g)
    mrc[1, 2] = -1  # a region without a tag id: no MRC term
    return ids, mask, feats, boxes, rmask, labels, selected, mrc


def test_region_tag_losses_against_an_independent_computation():
    net, heads = heads_and_output()
    ids, mask, feats, boxes, rmask, labels, selected, mrc = region_tag_targets()
    out = net(ids, mask, feats.masked_fill(selected.unsqueeze(-1), 0), boxes, rmask)
    for norm in ("masked", "official"):
        losses = pretraining_losses(heads, out, "region_tag", mlm_labels=labels, region_selected=selected,
                                    region_targets=feats, mrc_labels=mrc, mrm_normalization=norm)
        assert set(losses) == {"mlm", "mrc", "mrfr"}
        # MLM: mean CE over the 4 masked tags
        logits = heads.mlm(out["text"])
        pos = labels >= 0
        torch.testing.assert_close(losses["mlm"], F.cross_entropy(logits[pos], labels[pos]))
        # MRC: CE over masked regions that have a tag id
        logits = heads.mrc(out["regions"])
        counted = selected & (mrc >= 0)
        ce = F.cross_entropy(logits[counted], mrc[counted], reduction="sum")
        # MRFR: per-region mean squared error against the *unmasked* features
        se = ((heads.mrfr(out["regions"]) - feats) ** 2).mean(-1)[selected].sum()
        if norm == "masked":
            torch.testing.assert_close(losses["mrc"], ce / counted.sum())
            torch.testing.assert_close(losses["mrfr"], se / selected.sum())
        else:
            torch.testing.assert_close(losses["mrc"], ce / (B * N) * 6.67)
            torch.testing.assert_close(losses["mrfr"], se / (B * N) * 6.67)
    smooth = pretraining_losses(heads, out, "region_tag", region_selected=selected, region_targets=feats,
                                mrc_labels=mrc, feature_loss="smooth_l1")["mrfr"]
    expected = F.smooth_l1_loss(heads.mrfr(out["regions"])[selected], feats[selected], beta=1.0)
    torch.testing.assert_close(smooth, expected)


def test_itm_pair_weights_are_detached_match_probabilities_and_one_for_negatives():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]], requires_grad=True)
    w = itm_pair_weights(logits, torch.tensor([1, 0, 1]))
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([torch.sigmoid(torch.tensor(1.0)).item(), 1.0, 0.5]))


def test_per_pair_itm_weighting_of_mlm_mrtc_and_itm_and_the_official_batch_mean():
    net, heads = heads_and_output()
    ids, mask, feats, boxes, rmask, labels, selected, _ = region_tag_targets()
    mrtc = torch.full((B, N), -100)
    mrtc[0, 0], mrtc[3, 4] = 20, 21
    itm_labels = torch.tensor([1, 1, 0, 1])
    w = torch.tensor([0.2, 0.9, 1.0, 0.5])
    out = net(ids, mask, feats, boxes, rmask)
    losses = pretraining_losses(heads, out, "image_sentence", mlm_labels=labels, mrtc_labels=mrtc,
                                itm_labels=itm_labels, itm_weights=w, itm_weighting="per_pair")
    # MLM: per-sample mean over masked tokens, x w_b, averaged over samples with a masked token (0, 2, 3)
    ce = F.cross_entropy(heads.mlm(out["text"]).flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none").view(B, T)
    pos = (labels >= 0).float()
    per_sample = (ce * pos).sum(1) / pos.sum(1).clamp(min=1)
    expected = (per_sample * w)[[0, 2, 3]].sum() / 3
    torch.testing.assert_close(losses["mlm"], expected)
    # p-MRTC: the tied head on the region states, weighted per pair over samples 0 and 3
    ce = F.cross_entropy(heads.mlm(out["regions"]).flatten(0, 1), mrtc.clamp(min=0).flatten(), reduction="none").view(B, N)
    expected = (ce[0, 0] * w[0] + ce[3, 4] * w[3]) / 2
    torch.testing.assert_close(losses["mrtc"], expected)
    # ITM: per-sample CE x w, mean over all samples
    ce = F.cross_entropy(heads.itm(out["pooled"]), itm_labels, reduction="none")
    torch.testing.assert_close(losses["itm"], (ce * w).mean())

    official = pretraining_losses(heads, out, "image_sentence", mlm_labels=labels, mrtc_labels=mrtc,
                                  itm_labels=itm_labels, itm_weights=w, itm_weighting="batch_mean")
    pos_b = labels >= 0
    torch.testing.assert_close(official["mlm"], F.cross_entropy(heads.mlm(out["text"])[pos_b], labels[pos_b]) * w.mean())
    torch.testing.assert_close(official["itm"], F.cross_entropy(heads.itm(out["pooled"]), itm_labels) * w.mean())
    # the official code does not weight p-MRTC
    plain = pretraining_losses(heads, out, "image_sentence", mrtc_labels=mrtc)
    torch.testing.assert_close(official["mrtc"], plain["mrtc"])


def test_region_tag_is_not_weighted_per_pair_but_is_in_the_official_mode():
    net, heads = heads_and_output()
    ids, mask, feats, boxes, rmask, labels, selected, mrc = region_tag_targets()
    out = net(ids, mask, feats, boxes, rmask)
    w = torch.full((B,), 0.25)
    kwargs = dict(mlm_labels=labels, region_selected=selected, region_targets=feats, mrc_labels=mrc)
    plain = pretraining_losses(heads, out, "region_tag", **kwargs)
    per_pair = pretraining_losses(heads, out, "region_tag", itm_weights=w, itm_weighting="per_pair", **kwargs)
    official = pretraining_losses(heads, out, "region_tag", itm_weights=w, itm_weighting="batch_mean", **kwargs)
    for key in plain:
        torch.testing.assert_close(per_pair[key], plain[key])
    torch.testing.assert_close(official["mlm"], plain["mlm"] * 0.25)
    torch.testing.assert_close(official["mrc"], plain["mrc"])


def test_batches_with_nothing_masked_give_a_zero_loss_in_the_graph():
    net, heads = heads_and_output()
    ids, mask, feats, boxes, rmask = batch()
    out = net(ids, mask, feats, boxes, rmask)
    none = torch.full((B, T), -1)
    losses = pretraining_losses(heads, out, "region_phrase", mlm_labels=none, mrtc_labels=torch.full((B, N), -1),
                                itm_weights=torch.ones(B))
    for value in losses.values():
        assert value.item() == 0.0 and value.requires_grad and torch.isfinite(value)


@pytest.mark.parametrize("task,key", [("region_tag", "mlm"), ("region_tag", "mrc"), ("region_tag", "mrfr"),
                                      ("region_phrase", "mrtc"), ("image_sentence", "itm")])
def test_a_few_optimisation_steps_lower_each_loss(task, key):
    net, heads = heads_and_output()
    ids, mask, feats, boxes, rmask, labels, selected, mrc = region_tag_targets()
    mrtc = torch.full((B, N), -100)
    mrtc[0, 0], mrtc[3, 4], mrtc[1, 2] = 20, 21, 22
    kwargs = {
        "mlm": dict(mlm_labels=labels), "mrc": dict(region_selected=selected, mrc_labels=mrc, use_mrfr=False),
        "mrfr": dict(region_selected=selected, region_targets=feats, use_mrc=False), "mrtc": dict(mrtc_labels=mrtc),
        "itm": dict(itm_labels=torch.tensor([1, 0, 1, 0]), itm_weights=torch.tensor([0.5, 1.0, 0.8, 1.0])),
    }[key]
    params = list(net.parameters()) + [p for n, p in heads.named_parameters() if "decoder" not in n]
    opt = torch.optim.AdamW(params, lr=1e-2 if key == "itm" else 3e-3)
    masked = feats.masked_fill(selected.unsqueeze(-1), 0)
    values = []
    for _ in range(12):
        out = net(ids, mask, masked, boxes, rmask)
        loss = pretraining_losses(heads, out, task, **kwargs)[key]
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[-1] < values[0] * 0.9, values


# ----------------------------------------------------------------------------------------- MMF adapter


def model_config(**overrides):
    base = OmegaConf.load(MuVLA.config_path()).model_config.muvla
    tiny = dict(bert_model_name=None, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=32, feature_dim=FEAT, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pretraining=dict(num_tags=TAGS))
    return OmegaConf.merge(base, tiny, overrides)


def build(**overrides):
    torch.manual_seed(0)
    model = MuVLA(model_config(**overrides))
    model.build()
    model.init_losses()
    return model


def sample_list(task="image_sentence"):
    from mmf.common.sample import SampleList

    ids, mask, feats, boxes, rmask = batch()
    w, h = torch.tensor([640, 480, 500, 320]), torch.tensor([480, 360, 400, 240])
    bbox = boxes[..., :4] * torch.stack([w, h, w, h], -1).view(B, 1, 4).float()
    info = SampleList()
    info.max_features, info.bbox, info.image_width, info.image_height = rmask.sum(1), bbox, w, h
    sl = SampleList()
    # token types that matter: every comparison below passes them to the backbone by hand
    sl.input_ids, sl.input_mask, sl.segment_ids = ids, mask, (torch.arange(T) >= 3).long().expand(B, T) * mask
    sl.image_feature_0, sl.image_info_0 = feats, info
    sl.muvla_task = torch.full((B,), TASK_IDS[task])
    labels = torch.full((B, T), -1)
    labels[0, 2], labels[2, 3] = 10, 12
    sl.lm_label_ids = labels
    sl.is_correct = torch.tensor([1, 0, 1, 1])
    sl.dataset_type, sl.dataset_name = "train", "muvla_image_sentence"
    return sl


def test_mmf_pretraining_forward_names_losses_and_starts_weighting_after_the_set_update():
    model = build(pretraining=dict(itm_weight_start_update=2)).train()
    sl = sample_list()
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    out = model(sl)
    assert set(out["losses"]) == {"train/muvla_image_sentence/mlm", "train/muvla_image_sentence/itm"}
    assert out["scores"].shape == (B, 2)
    model.on_update_start(TrainingProgress(update=1, epoch=1))
    assert not model.itm_weighting_active()  # 1 update done
    model.on_update_start(TrainingProgress(update=2, epoch=1))
    assert model.itm_weighting_active()  # 2 updates done
    # with weighting on, the ITM loss equals the per-pair weighted CE of the same forward pass
    model.on_update_start(TrainingProgress(update=5, epoch=1))
    out = model(sl)
    logits = out["scores"]
    w = itm_pair_weights(logits, sl.is_correct)
    ce = F.cross_entropy(logits, sl.is_correct, reduction="none")
    torch.testing.assert_close(out["losses"]["train/muvla_image_sentence/itm"], (ce * w).mean())


def test_mmf_pretraining_rejects_a_batch_without_a_task_or_mixing_tasks():
    model = build().train()
    sl = sample_list()
    sl.muvla_task = torch.tensor([0, 1, 0, 0])
    with pytest.raises(ValueError, match="mixes"):
        model(sl)
    del sl["muvla_task"]
    with pytest.raises(KeyError, match="muvla_task"):
        model(sl)


def test_vqa_pools_the_last_text_token_before_sep_and_cls_pooling_the_pooler():
    model = build(training_head_type="classification", num_labels=9, classifier_dropout=0.0).eval()
    sl = sample_list()
    scores = model(sl)["scores"]
    assert scores.shape == (B, 9)
    out = model.encode(sl)
    last = sl.input_mask.sum(1) - 2  # sample 1: length 5 -> index 3
    assert last.tolist() == [5, 3, 5, 5]
    torch.testing.assert_close(scores, model.classifier(out["text"][torch.arange(B), last]))
    model = build(training_head_type="classification", num_labels=3, pooling="cls", classifier_dropout=0.0).eval()
    torch.testing.assert_close(model(sl)["scores"], model.classifier(model.encode(sl)["pooled"]))


def test_nlvr2_paired_head_is_1536_wide_at_base_size_and_refcoco_scores_each_region():
    from mmf.common.sample import SampleList

    model = build(training_head_type="nlvr2").eval()
    assert model.classifier.classifier[0].in_features == 2 * HIDDEN
    sl = sample_list()
    pair = SampleList()
    pair.input_ids, pair.input_mask, pair.segment_ids = sl.input_ids, sl.input_mask, sl.segment_ids
    for side in ("img0", "img1"):
        s = SampleList()
        s.image_feature_0, s.image_info_0 = sl.image_feature_0, sl.image_info_0
        pair[side] = s
    assert model(pair)["scores"].shape == (B, 2)
    model = build(training_head_type="refcoco").eval()
    scores = model(sl)["scores"]
    assert scores.shape == (B, N)
    assert (scores[2, 3:] == -1e4).all() and (scores[2, :3] > -1e3).all()


def test_bert_checkpoint_by_path_loads_backbone_mlm_and_nsp_heads(tmp_path):
    torch.manual_seed(3)
    source = BertForPreTraining(bert_config())
    source.save_pretrained(tmp_path / "bert")
    model = build(bert_model_name=str(tmp_path / "bert"))
    state = source.state_dict()
    torch.testing.assert_close(model.backbone.text.bert.encoder.layer[0].attention.self.query.weight,
                               state["bert.encoder.layer.0.attention.self.query.weight"])
    torch.testing.assert_close(model.heads.mlm.transform.dense.weight, state["cls.predictions.transform.dense.weight"])
    torch.testing.assert_close(model.heads.itm.classifier.weight, state["cls.seq_relationship.weight"])
    torch.testing.assert_close(model.heads.itm.classifier.bias, state["cls.seq_relationship.bias"])


def test_weighting_starts_after_epoch_m_and_clean_source_uses_the_unmasked_pair():
    model = build(pretraining=dict(itm_weight_start_epoch=1, itm_weight_source="clean")).train()
    model.on_update_start(TrainingProgress(update=3, epoch=1))
    assert not model.itm_weighting_active()
    model.on_update_start(TrainingProgress(update=4, epoch=2))
    assert model.itm_weighting_active()
    sl = sample_list()
    torch.manual_seed(0)
    out = model(sl)
    # the clean pass: masked tokens restored from their labels, so its p_match differs from the masked pass
    clean_ids = torch.where(sl.lm_label_ids >= 0, sl.lm_label_ids, sl.input_ids)
    regions = model._regions(sl)
    features, boxes, rmask = regions.features, regions.boxes, regions.mask
    with torch.no_grad():
        clean = model.backbone(clean_ids, sl.input_mask, features, boxes, rmask, sl.segment_ids)
    w = itm_pair_weights(model.heads.itm(clean["pooled"]), sl.is_correct)
    ce = F.cross_entropy(out["scores"], sl.is_correct, reduction="none")
    torch.testing.assert_close(out["losses"]["train/muvla_image_sentence/itm"], (ce * w).mean())
    assert model(sl)["losses"]["train/muvla_image_sentence/itm"].requires_grad
    model.eval()
    assert not model.itm_weighting_active()  # evaluation is never weighted


def test_mrc_tag_ids_outside_the_vocabulary_name_the_config_key():
    net, heads = heads_and_output()
    ids, mask, feats, boxes, rmask, labels, selected, mrc = region_tag_targets()
    out = net(ids, mask, feats, boxes, rmask)
    mrc[0, 0] = TAGS
    with pytest.raises(ValueError, match="num_tags"):
        pretraining_losses(heads, out, "region_tag", region_selected=selected, region_targets=feats, mrc_labels=mrc)


def test_paired_caption_batches_use_the_default_task_and_skip_mlm_on_negatives():
    model = build(pretraining=dict(default_task="image_sentence", itm_weighting="off")).train()
    sl = sample_list()
    del sl["muvla_task"]
    sl.dataset_name = "conceptual_captions"
    sl.lm_label_ids[1, 1] = 13  # sample 1 is a negative (is_correct 0): its masked token is not predicted
    torch.manual_seed(0)
    out = model(sl)
    assert set(out["losses"]) == {"train/conceptual_captions/mlm", "train/conceptual_captions/itm"}
    model.eval()
    with torch.no_grad():
        regions = model._regions(sl)
        enc = model.backbone(sl.input_ids, sl.input_mask, regions.features, regions.boxes, regions.mask, sl.segment_ids)
        expected = F.cross_entropy(model.heads.mlm(enc["text"][[0, 2], [2, 3]]), torch.tensor([10, 12]))
        got = model(sl)["losses"]["train/conceptual_captions/mlm"]
    torch.testing.assert_close(got, expected)


def test_encode_reads_the_batch_token_types_regions_and_boxes():
    model = build(training_head_type="classification", num_labels=3).eval()
    sl = sample_list()
    regions = model._regions(sl)
    expected = model.backbone(sl.input_ids, sl.input_mask, regions.features, regions.boxes, regions.mask, sl.segment_ids)
    got = model.encode(sl)
    torch.testing.assert_close(got["text"], expected["text"])
    torch.testing.assert_close(got["pooled"], expected["pooled"])
    without_types = model.backbone(sl.input_ids, sl.input_mask, regions.features, regions.boxes, regions.mask)
    assert not torch.allclose(got["pooled"], without_types["pooled"])


def test_loss_edge_cases_one_label_tag_zero_weighting_off_and_unweighted_text():
    """Exactly zero (not merely small) without labels on the unweighted path and for a weighted mean
    over no sample; one masked token gives its own cross-entropy; tag id 0 is a real MRC class; weights
    are ignored when itm_weighting is off and for the unpaired text task."""
    from mmf_multilevel.methods.muvla.pretraining import weighted_sample_mean

    net, heads = heads_and_output()
    ids, mask, feats, boxes, rmask = batch()
    out = net(ids, mask, feats, boxes, rmask)
    none = torch.full((B, T), -1)
    assert pretraining_losses(heads, out, "region_phrase", mlm_labels=none)["mlm"].item() == 0.0
    assert weighted_sample_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool), torch.ones(3)).item() == 0.0
    one = none.clone()
    one[1, 2] = 11
    expected = F.cross_entropy(heads.mlm(out["text"][1, 2]).unsqueeze(0), torch.tensor([11]))
    torch.testing.assert_close(pretraining_losses(heads, out, "image_sentence", mlm_labels=one)["mlm"], expected)
    # MRC: the selected region's tag is 0, the first class of the tag vocabulary
    selected = torch.zeros(B, N, dtype=torch.bool)
    selected[0, 1] = True
    tags = torch.full((B, N), -1)
    tags[0, 1] = 0
    mrc = pretraining_losses(heads, out, "region_tag", region_selected=selected, region_targets=feats, mrc_labels=tags)
    torch.testing.assert_close(mrc["mrc"], F.cross_entropy(heads.mrc(out["regions"][0, 1]).unsqueeze(0), torch.tensor([0])))
    # weights ignored: weighting off (ITM and MLM), and the text task (no pair to weight)
    labels, itm = none.clone(), torch.tensor([1, 0, 1, 1])
    labels[0, 1], labels[2, 3] = 7, 9
    weights = torch.tensor([0.1, 1.0, 0.9, 0.3])
    plain = pretraining_losses(heads, out, "image_sentence", mlm_labels=labels, itm_labels=itm, itm_weighting="off")
    off = pretraining_losses(heads, out, "image_sentence", mlm_labels=labels, itm_labels=itm, itm_weights=weights,
                             itm_weighting="off")
    assert set(off) == set(plain) and all(torch.equal(off[k], plain[k]) for k in plain)
    weighted = pretraining_losses(heads, out, "image_sentence", mlm_labels=labels, itm_labels=itm, itm_weights=weights)
    assert not torch.equal(weighted["itm"], plain["itm"]) and not torch.equal(weighted["mlm"], plain["mlm"])
    text = pretraining_losses(heads, out, "text", mlm_labels=labels, itm_weights=weights)
    torch.testing.assert_close(text["mlm"], plain["mlm"])


@pytest.mark.parametrize("style", ["paper", "released", "visual_bert"])
def test_token_types_and_tag_boxes_reach_the_embeddings_in_every_style(style):
    net = network(style).eval()
    ids, mask, feats, boxes, rmask = batch()
    types = (torch.arange(T) >= 3).long().expand(B, T) * mask
    plain = net(ids, mask, feats, boxes, rmask)
    typed = net(ids, mask, feats, boxes, rmask, token_type_ids=types)
    assert not torch.allclose(plain["pooled"], typed["pooled"])
    zeros = net(ids, mask, feats, boxes, rmask, token_type_ids=torch.zeros_like(ids))
    torch.testing.assert_close(plain["pooled"], zeros["pooled"])  # no types = type 0
    if style != "visual_bert":  # R-T: the tags carry their regions' boxes
        tag_boxes = boxes[:, :1].expand(B, T, 5).clone()
        tagged = net(ids, mask, feats, boxes, rmask, tag_boxes=tag_boxes)
        moved = net(ids, mask, feats, boxes, rmask, tag_boxes=tag_boxes.roll(1, dims=-1))  # not a rescale: LN
        assert not torch.allclose(tagged["pooled"], moved["pooled"])


@pytest.mark.parametrize("key,head", [("pretraining.mrm_normalization", "pretraining"),
                                      ("pretraining.itm_weighting", "pretraining"),
                                      ("pretraining.itm_weight_source", "pretraining"),
                                      ("pretraining.default_task", "pretraining"),
                                      ("pooling", "classification")])
def test_a_setting_outside_its_choices_is_refused_by_its_key(key, head):
    overrides = {"training_head_type": head, "num_labels": 3}
    section, _, leaf = key.rpartition(".")
    if section:
        overrides[section] = {leaf: "bogus"}
    else:
        overrides[leaf] = "bogus"
    with pytest.raises(ValueError, match=f"model_config.muvla.{key}"):
        build(**overrides)


def test_task_heads_follow_the_bert_settings():
    settings = dict(hidden_dropout_prob=0.3, layer_norm_eps=1e-6, initializer_range=0.5)
    nlvr2 = build(training_head_type="nlvr2", **settings).classifier
    assert nlvr2.dropout.p == 0.3 and nlvr2.classifier[2].eps == 1e-6 and nlvr2.classifier[3].out_features == 2
    assert nlvr2.classifier[0].weight.std().item() == pytest.approx(0.5, rel=0.15)
    scorer = build(training_head_type="refcoco", **settings).classifier
    assert scorer.transform[2].eps == 1e-6
    assert scorer.transform[0].weight.std().item() == pytest.approx(0.5, rel=0.15)


@pytest.mark.parametrize("style", ["paper", "released", "visual_bert"])
def test_the_region_embedding_follows_the_bert_settings_in_every_style(style):
    """Dropout, LayerNorm ε and the initialiser's σ of the region embedding are BERT's (box styles); the
    VisualBERT style is one projection with no LayerNorm or dropout of its own (its one LayerNorm is BERT's,
    over [text ; regions]). Built with the defaults, the network is the paper's on 2048-d features."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.3, layer_norm_eps=1e-6, initializer_range=0.5)
    torch.manual_seed(0)
    regions = MuVLANetwork(BertTextEncoder.from_config(config), 400, style).regions
    linear = regions.proj if style == "visual_bert" else regions.feature_proj
    assert linear.weight.std().item() == pytest.approx(0.5, rel=0.1)
    if style == "visual_bert":
        assert regions.norm is None and regions.dropout.p == 0.0 and regions.box_dim == 0
        assert linear.in_features == 400
    else:
        assert regions.dropout.p == 0.3 and regions.box_dim == 5 and regions.style == "sum"
        assert regions.feature_norm.eps == regions.box_norm.eps == 1e-6
        assert regions.box_proj.weight.std().item() == pytest.approx(0.5, rel=0.35)  # 5 x 64 draws
        assert (regions.norm is not None) == (style == "paper")
        if style == "paper":
            assert regions.norm.eps == 1e-6
    default = MuVLANetwork(BertTextEncoder.from_config(bert_config()))
    assert default.embedding_style == "paper" and default.feature_dim == 2048


def test_half_precision_features_in_every_style_tags_refused_by_visual_bert_and_misshapen_region_masks():
    """Cached float16 features give the outputs of their float32 values (every style); the VisualBERT
    style, which has no box embedding, refuses R-T tag sequences; a region mask of the wrong shape is
    refused by name in the box styles."""
    ids, mask, feats, boxes, rmask = batch()
    half = feats.half()
    for style in ("paper", "released", "visual_bert"):
        net = network(style).eval()
        torch.testing.assert_close(net(ids, mask, half, boxes, rmask)["sequence"],
                                   net(ids, mask, half.float(), boxes, rmask)["sequence"])
        if style != "visual_bert":
            with pytest.raises(ValueError, match=r"region_mask must be \(4, 5\)"):
                net(ids, mask, feats, boxes, rmask[:, :4])
    with pytest.raises(ValueError, match="embedding_style: visual_bert has no box embedding"):
        network("visual_bert")(ids, mask, feats, boxes, rmask, tag_boxes=boxes[:, :1].expand(B, T, 5))


def test_pretraining_heads_follow_the_bert_settings_and_the_tag_head_exists_from_one_tag():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, hidden_act="relu", layer_norm_eps=1e-6, initializer_range=0.5)
    heads = MuVLAPretrainingHeads(MuVLANetwork(BertTextEncoder.from_config(config), FEAT), 1)
    assert heads.mrc.decoder.out_features == 1 and heads.itm.classifier.out_features == 2
    for head in (heads.mrc, heads.mrfr):
        assert_bert_transform(head.transform, torch.nn.ReLU, eps=1e-6, std=0.5, rel=0.2)
    assert heads.itm.classifier.weight.std().item() == pytest.approx(0.5, rel=0.35)
    assert MuVLAPretrainingHeads(network(), 0).mrc is None


# ----------------------------------------------------------------------------------------- the adapter's wiring
def mlm_of(model, sl, labels, features, boxes, region_mask, tag_boxes=None):
    """The MLM loss recomputed from the backbone and the head (eval mode: no dropout)."""
    enc = model.backbone(sl.input_ids, sl.input_mask, features, boxes, region_mask, sl.segment_ids, tag_boxes=tag_boxes)
    rows, cols = (labels >= 0).nonzero(as_tuple=True)
    return F.cross_entropy(model.heads.mlm(enc["text"][rows, cols]), labels[rows, cols])


def test_unpaired_text_batches_run_without_region_positions():
    model = build(pretraining=dict(itm_weighting="off")).eval()
    sl = sample_list("text")
    del sl["image_feature_0"], sl["image_info_0"], sl["is_correct"]
    sl.dataset_name = "muvla_text"
    with torch.no_grad():
        out = model(sl)
        expected = mlm_of(model, sl, sl.lm_label_ids, torch.zeros(B, 0, FEAT), torch.zeros(B, 0, 5),
                          torch.zeros(B, 0, dtype=torch.long))
    assert set(out["losses"]) == {"train/muvla_text/mlm"} and "scores" not in out
    torch.testing.assert_close(out["losses"]["train/muvla_text/mlm"], expected)


def test_task_ids_are_read_from_a_batch_of_one_and_bounded():
    model = build().train()
    sl = sample_list("region_tag")
    assert model._task_of(sl) == "region_tag"  # task 0
    for key in ("input_ids", "input_mask", "segment_ids", "lm_label_ids", "is_correct", "muvla_task"):
        sl[key] = sl[key][:1]
    assert model._task_of(sl) == "region_tag"
    for bad in (-1, 4):
        sl.muvla_task = torch.tensor([bad])
        with pytest.raises(ValueError, match=rf"muvla_task {bad} is not one of"):
            model._task_of(sl)


def test_weighting_off_stays_off_after_its_start():
    model = build(pretraining=dict(itm_weighting="off", itm_weight_start_update=0)).train()
    model.on_update_start(TrainingProgress(update=10, epoch=3))
    assert not model.itm_weighting_active()


def test_task_batches_are_taken_as_the_dataset_masked_them_and_their_tag_boxes_reach_the_backbone():
    """With a μ-VLA task the dataset decided which captions to mask (the negative's label counts); labels and
    matching are optional; ``tag_boxes`` reach the embedding."""
    model = build(pretraining=dict(itm_weighting="off")).eval()
    sl = sample_list()
    sl.lm_label_ids[1, 1] = 13  # sample 1 is a negative (is_correct 0)
    regions = model._regions(sl)
    with torch.no_grad():
        got = model(sl)["losses"]["train/muvla_image_sentence/mlm"]
        torch.testing.assert_close(got, mlm_of(model, sl, sl.lm_label_ids, regions.features, regions.boxes,
                                               regions.mask))
        sl.tag_boxes = regions.boxes[:, :1].expand(B, T, 5).roll(1, dims=-1).contiguous()
        tagged = model(sl)["losses"]["train/muvla_image_sentence/mlm"]
        torch.testing.assert_close(tagged, mlm_of(model, sl, sl.lm_label_ids, regions.features, regions.boxes,
                                                  regions.mask, sl.tag_boxes.float()))
        assert not torch.allclose(tagged, got)
        del sl["tag_boxes"]
        labels = sl.lm_label_ids
        del sl["lm_label_ids"]
        assert set(model(sl)["losses"]) == {"train/muvla_image_sentence/itm"}
        sl.lm_label_ids = labels
        del sl["is_correct"]
        out = model(sl)
    assert set(out["losses"]) == {"train/muvla_image_sentence/mlm"} and "scores" not in out


@pytest.mark.parametrize("task,settings", [
    ("region_tag", dict(itm_weighting="batch_mean", itm_weight_source="clean", mrm_normalization="official",
                        feature_loss="smooth_l1")),
    ("region_tag", dict(itm_weighting="per_pair", itm_weight_source="clean")),  # R-T is not weighted per pair
    ("region_phrase", dict(itm_weighting="per_pair", itm_weight_source="clean", rp_mrfr=True)),
    ("image_sentence", dict(itm_weighting="per_pair", itm_weight_source="masked", is_mrm=True)),
    ("image_sentence", dict(itm_weighting="per_pair", itm_weight_start_update=5)),  # not yet started: no weights
])
def test_the_adapter_hands_each_task_its_inputs_settings_and_weights(task, settings):
    """Every loss of a task batch equals ``pretraining_losses`` called by hand: the backbone on the corrupted
    regions, the original features as the regression target, the dataset's masked regions, region-class and
    phrase labels, the ITM weights from the clean (labels put back, every region kept) or masked pair, and the
    task's extra losses and the settings."""
    model = build(pretraining={"itm_weight_start_update": 0, **settings}).eval()
    with torch.no_grad():  # a matching head whose probabilities tell the pairs apart (the tiny init gives ~0.5 for all)
        model.heads.itm.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(6))
    model.on_update_start(TrainingProgress(update=1, epoch=2))
    model.training = True  # weighting is on in training only; the modules stay in eval mode (no dropout)
    sl = sample_list(task)
    sl.dataset_name = f"muvla_{task}"
    g = torch.Generator().manual_seed(5)
    selected = torch.zeros(B, N, dtype=torch.bool)
    selected[0, 1] = selected[1, 0] = selected[3, 2] = True
    sl.region_selected, sl.region_zeroed = selected, selected.clone()
    sl.region_source = torch.full((B, N), -1, dtype=torch.long)
    sl.mrc_labels = torch.where(selected, torch.randint(0, TAGS, (B, N), generator=g), torch.full((B, N), -1))
    sl.mrtc_labels = torch.where(selected, torch.randint(5, VOCAB, (B, N), generator=g), torch.full((B, N), -1))
    tag_boxes = None
    if task == "region_tag":  # R-T's text is the tags, each with its region's box (no token types then)
        tag_boxes = sl.tag_boxes = model._regions(sl).boxes[:, :1].expand(B, T, 5).contiguous()
    pre = model.settings.pretraining
    with torch.no_grad():
        got = model(sl)["losses"]
        regions = model._regions(sl)
        assert regions.selected is not None and not torch.equal(regions.corrupted, regions.features)
        args = (sl.input_mask, regions.corrupted, regions.boxes, regions.mask, sl.segment_ids)
        out = model.backbone(sl.input_ids, *args, tag_boxes=tag_boxes)
        weights = None
        if model.itm_weighting_active() and (task != "region_tag" or pre.itm_weighting == "batch_mean"):
            if pre.itm_weight_source == "clean":
                clean_ids = torch.where(sl.lm_label_ids >= 0, sl.lm_label_ids, sl.input_ids)
                clean = model.backbone(clean_ids, sl.input_mask, regions.features, regions.boxes, regions.mask,
                                       sl.segment_ids, tag_boxes=tag_boxes)
                logits = model.heads.itm(clean["pooled"])
            else:
                logits = model.heads.itm(out["pooled"])
            weights = itm_pair_weights(logits, sl.is_correct)
        extra = {"region_tag": {}, "region_phrase": {"use_mrfr": pre.rp_mrfr},  # the paper's extra region losses
                 "image_sentence": {"use_mrc": pre.is_mrm, "use_mrfr": pre.is_mrm}}[task]
        expected = pretraining_losses(model.heads, out, task, mlm_labels=sl.lm_label_ids, region_selected=selected,
                                      region_targets=regions.features, mrc_labels=sl.mrc_labels,
                                      mrtc_labels=sl.mrtc_labels, itm_labels=sl.is_correct, itm_weights=weights,
                                      itm_weighting=pre.itm_weighting, mrm_normalization=pre.mrm_normalization,
                                      feature_loss=pre.feature_loss, **extra)
    assert set(got) == {f"train/muvla_{task}/{name}" for name in expected}
    for name, value in expected.items():
        torch.testing.assert_close(got[f"train/muvla_{task}/{name}"], value)
    del sl["lm_label_ids"]  # the clean pair of a batch without MLM is the batch itself
    with torch.no_grad():
        assert f"train/muvla_{task}/itm" in model(sl)["losses"]


def test_the_vqa_head_follows_its_settings_and_an_empty_question_pools_cls():
    settings = dict(hidden_dropout_prob=0.3, layer_norm_eps=1e-6, initializer_range=0.5)
    head = build(training_head_type="classification", num_labels=9, classifier_dropout=0.2, **settings).classifier
    assert head.dense.out_features == HIDDEN and head.dropout.p == 0.2 and head.LayerNorm.eps == 1e-6  # I = H
    assert head.dense.weight.std().item() == pytest.approx(0.5, rel=0.15)
    model = build(training_head_type="classification", num_labels=9, classifier_dropout=0.0).eval()
    sl = sample_list()
    sl.input_mask[3] = 0
    sl.input_mask[3, :2] = 1  # [CLS] [SEP]: the token before [SEP] is [CLS]
    out = model.encode(sl)
    torch.testing.assert_close(model(sl)["scores"][3], model.classifier(out["text"][3, 0]))


def test_unpaired_text_is_never_weighted_and_a_batch_without_regions_names_the_model():
    model = build(pretraining=dict(itm_weighting="batch_mean", itm_weight_start_update=0)).eval()
    with torch.no_grad():
        model.heads.itm.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(6))
    sl = sample_list("text")
    del sl["image_feature_0"], sl["image_info_0"], sl["is_correct"]
    sl.dataset_name = "muvla_text"
    with torch.no_grad():
        off = model(sl)["losses"]["train/muvla_text/mlm"]
        model.on_update_start(TrainingProgress(update=3, epoch=2))
        model.training = True  # weighting on (the modules stay in eval mode)
        assert model.itm_weighting_active()
        torch.testing.assert_close(model(sl)["losses"]["train/muvla_text/mlm"], off)
    regions_missing = sample_list()
    del regions_missing["image_feature_0"]
    with pytest.raises(KeyError, match="muvla needs 'image_feature_0'"):
        model.encode(regions_missing)
