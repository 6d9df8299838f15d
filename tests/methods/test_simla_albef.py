"""SIMLA's ALBEF layout (``model_config.simla.layout: albef``): text layers without cross-attention, fusion layers
from the text encoder's output (ALBEF's ``mode="text"`` / ``"fusion"`` / ``"multi_modal"``), checked against HF's
BertModel and an independent plain-torch forward, and the ``simla`` model pre-training and fine-tuning on it."""
import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel

from helpers import simla_reference as ref
from helpers.simla import rows_of
from mmf_multilevel.methods.simla import testing
from mmf_multilevel.methods.simla.network import ALBEF_LAYOUT, MULTIMODAL, TEXT, SIMLATextEncoder, parameter_counts

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FUSION = 2


def albef_encoder(seed=0):
    torch.manual_seed(seed)
    return SIMLATextEncoder.from_config(BertConfig(**TINY), layout=ALBEF_LAYOUT, fusion_layer=FUSION).eval()


def batch(seed=1, bsz=3, length=7, patches=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (bsz, length), generator=g)
    mask = torch.ones(bsz, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    image = torch.randn(bsz, 1 + patches, 32, generator=g)
    image_mask = torch.ones(bsz, 1 + patches, dtype=torch.long)
    image_mask[0, -2:] = 0
    return ids, mask, image, image_mask


def test_text_layers_have_no_cross_attention_built_counted_or_saved():
    enc = albef_encoder()
    assert list(enc.cross_attention.keys()) == [str(i) for i in range(FUSION, TINY["num_hidden_layers"])]
    assert list(enc.text_layers) == list(range(FUSION)) and list(enc.fusion_layers) == [2, 3]
    state = enc.state_dict()
    assert not any(k.startswith(f"cross_attention.{i}.") for k in state for i in range(FUSION))
    assert any(k.startswith(f"cross_attention.{FUSION}.") for k in state)
    simla = SIMLATextEncoder.from_config(BertConfig(**TINY))
    per_block = sum(p.numel() for p in simla.cross_attention["0"].parameters())
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert total(simla) - total(enc) == FUSION * per_block
    # the text mode uses the embeddings and the text layers only
    assert {id(p) for p in enc.mode_parameters(TEXT)} == (
        {id(p) for p in enc.text.embeddings.parameters()}
        | {id(p) for i in range(FUSION) for p in enc.blocks[i].parameters()})
    assert len(enc.mode_parameters(MULTIMODAL)) == len(list(enc.parameters()))


def test_encode_text_equals_hf_bert_over_the_text_layers():
    enc = albef_encoder()
    ids, mask, _, _ = batch()
    hf = BertModel(BertConfig(**dict(TINY, num_hidden_layers=FUSION)), add_pooling_layer=False).eval()
    state = {k[len("text.bert."):]: v for k, v in enc.state_dict().items() if k.startswith("text.bert.")
             and not any(k.startswith(f"text.bert.encoder.layer.{i}.") for i in range(FUSION, 4))}
    state["embeddings.token_type_embeddings.weight"] = torch.zeros_like(hf.embeddings.token_type_embeddings.weight)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and [k for k in missing if "position_ids" not in k] == []
    real = mask.bool()
    torch.testing.assert_close(enc.encode_text(ids, mask)[real],
                               hf(input_ids=ids, attention_mask=mask).last_hidden_state[real], rtol=1e-5, atol=1e-5)


def reference_fusion(enc, ids, mask, image, image_mask, text_states=None):
    """Independently: the embeddings, the text layers without cross-attention, then the fusion layers with it."""
    state = {k: v.detach() for k, v in enc.state_dict().items()}
    heads = TINY["num_attention_heads"]
    hidden = text_states
    if hidden is None:
        hidden = ref.embeddings(ids, state, "text.bert.embeddings")
        for i in range(FUSION):
            hidden = ref.bert_layer(hidden, mask, state, f"text.bert.encoder.layer.{i}", heads)
    for i in range(FUSION, TINY["num_hidden_layers"]):
        hidden = ref.bert_layer(hidden, mask, state, f"text.bert.encoder.layer.{i}", heads,
                                cross_prefix=f"cross_attention.{i}", memory=image, memory_mask=image_mask)
    return hidden


def test_fuse_is_the_text_encoder_output_through_the_fusion_layers():
    enc = albef_encoder()
    ids, mask, image, image_mask = batch()
    real = mask.bool()
    with torch.no_grad():
        fused = enc.fuse(ids, mask, image, image_mask)
        expected = reference_fusion(enc, ids, mask, image, image_mask)
        torch.testing.assert_close(fused[real], expected[real], rtol=1e-5, atol=1e-5)
        # ALBEF's mode="fusion": from given text states (the ITM path), equal to the pass from ids
        text = enc.encode_text(ids, mask)
        torch.testing.assert_close(enc.fuse(ids, mask, image, image_mask, text_states=text), fused)
        torch.testing.assert_close(enc.fuse_text(text, mask, image, image_mask), fused)
        other = text + 1.0
        torch.testing.assert_close(enc.fuse_text(other, mask, image, image_mask)[real],
                                   reference_fusion(enc, ids, mask, image, image_mask, other)[real],
                                   rtol=1e-5, atol=1e-5)
        # the masked image tokens are not read
        image2 = image.clone()
        image2[0, -2:] += 5.0
        torch.testing.assert_close(enc.fuse(ids, mask, image2, image_mask)[0], fused[0])


def test_attention_maps_are_indexed_by_layer():
    enc = albef_encoder()
    ids, mask, image, image_mask = batch()
    hidden, self_maps, cross_maps = enc.fuse(ids, mask, image, image_mask, output_attentions=True,
                                             output_cross_attentions=True)
    assert len(self_maps) == len(cross_maps) == TINY["num_hidden_layers"]
    assert all(m is not None for m in self_maps)
    assert cross_maps[:FUSION] == (None,) * FUSION and all(m is not None for m in cross_maps[FUSION:])
    _, self_maps, cross_maps = enc.fuse_text(enc.encode_text(ids, mask), mask, image, image_mask,
                                             output_attentions=True, output_cross_attentions=True)
    assert self_maps[:FUSION] == (None,) * FUSION and self_maps[-1].shape == (3, 4, 7, 7)
    assert cross_maps[-1].shape == (3, 4, 7, image.size(1))


def test_bad_layouts_and_mim_are_refused_by_name():
    with pytest.raises(ValueError, match="model_config.simla.layout"):
        SIMLATextEncoder.from_config(BertConfig(**TINY), layout="clip")
    for bad in (0, 4, 2.5):
        with pytest.raises(ValueError, match="model_config.simla.fusion_layer"):
            SIMLATextEncoder.from_config(BertConfig(**TINY), layout=ALBEF_LAYOUT, fusion_layer=bad)
    enc = albef_encoder()
    ids, mask, image, _ = batch()
    with pytest.raises(ValueError, match="layout: simla"):
        enc.reconstruct_image(image, ids, mask)
    with pytest.raises(ValueError, match="fuse_text"):
        SIMLATextEncoder.from_config(BertConfig(**TINY)).fuse_text(image, None, image)


def test_base_size_albef_counts():
    counts = parameter_counts(layout=ALBEF_LAYOUT)
    assert counts["6 cross-attention blocks (layers 6-11)"] == 6 * (4 * (768 * 768 + 768) + 2 * 768)
    assert counts["encoders total"] == 208_918_272
    assert counts["heads total"] == 1_017_917
    assert parameter_counts()["encoders total"] - counts["encoders total"] == 6 * 2_363_904 + 768  # + mask token


# ---------------------------------------------------------------------- the simla model on the ALBEF layout
def build(head_type="pretraining", seed=0, **overrides):
    from mmf.common.registry import registry

    cls = registry.get_model_class("simla")
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.simla, testing.tiny_config(head_type),
                             dict(layout="albef", fusion_layer=1, mim=False), overrides)
    torch.manual_seed(seed)
    model = cls(config)
    model.build()
    return model


@pytest.mark.usefixtures("mmf_global_config")
def test_pretraining_on_the_albef_layout_gives_itc_itm_mlm_psl():
    model = build(psl=True).train()
    assert model.backbone.image_encoder.mask_token is None and model.heads.mim_head is None
    assert "mim_head" not in model.momentum.names and "concept_head" in model.momentum.names
    assert not any(".cross_attention.0." in k for k in model.state_dict())
    out = model(testing.tiny_batch("pretraining"))
    losses = {k.rsplit("/", 1)[-1]: v for k, v in out["losses"].items()}
    assert set(losses) == {"itc", "itm", "mlm", "psl"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.text_encoder.cross_attention["1"].self.query.weight.grad.abs().sum() > 0
    # ALBEF proper (pretrain_albef.yaml): no concept head either
    plain = build(psl=False)
    assert plain.heads.concept_head is None and set(plain.momentum.names) == {
        "visual_encoder", "text_encoder", "mlm", "vision_proj", "text_proj"}
    out = plain(testing.tiny_batch("pretraining"))
    assert {k.rsplit("/", 1)[-1] for k in out["losses"]} == {"itc", "itm", "mlm"}


@pytest.mark.usefixtures("mmf_global_config")
def test_the_itm_scores_are_the_fusion_of_the_text_encoder_output():
    model = build().eval()
    sample = testing.tiny_batch("pretraining")
    torch.manual_seed(3)
    scores = model(sample)["scores"]
    encoder = model.backbone.text_encoder
    ids = torch.where(sample.lm_label_ids >= 0, sample.lm_label_ids, sample.input_ids)
    image = model.backbone.image_encoder(sample.image)
    with torch.no_grad():
        positives = model.heads.itm_logits(reference_fusion_model(encoder, ids, sample.input_mask, image)[:, 0])
    torch.testing.assert_close(scores[:4], positives, rtol=1e-4, atol=1e-5)


def reference_fusion_model(encoder, ids, mask, image):
    state = {k: v.detach() for k, v in encoder.state_dict().items()}
    heads = encoder.config.num_attention_heads
    hidden = ref.embeddings(ids, state, "text.bert.embeddings")
    hidden = ref.bert_layer(hidden, mask, state, "text.bert.encoder.layer.0", heads)
    return ref.bert_layer(hidden, mask, state, "text.bert.encoder.layer.1", heads, cross_prefix="cross_attention.1",
                          memory=image)


@pytest.mark.usefixtures("mmf_global_config")
def test_mim_on_the_albef_layout_is_refused_naming_both_settings():
    with pytest.raises(ValueError, match=r"model_config\.simla\.mim.*model_config\.simla\.layout"):
        build(mim=True)


@pytest.mark.usefixtures("mmf_global_config")
def test_retrieval_on_the_albef_layout_and_a_pretraining_checkpoint_loads_whole():
    pre = build(psl=False)
    model = build("retrieval", psl=False)
    model.load_state_dict(pre.state_dict(), strict=True)
    out = model.train()(testing.tiny_batch("retrieval"))
    assert {k.rsplit("/", 1)[-1] for k in out["losses"]} == {"itc", "itm"}


def _text_layer_rows(model):
    """The rows the online BERT's first text layer (no cross-attention in the ALBEF layout) reads, call by call."""
    rows = []
    model.backbone.text_encoder.blocks[0].attention.register_forward_hook(
        lambda module, args, output: rows.append(args[0].size(0)))
    return rows


@pytest.mark.usefixtures("mmf_global_config")
@pytest.mark.parametrize("head_type", ["pretraining", "retrieval"])
def test_the_itm_pairs_reuse_the_text_encoder_output_instead_of_running_the_text_layers_again(head_type):
    """ALBEF's ``mode="fusion"``: the positives and hard negatives of ITM start from the text encoder's output
    already computed for ITC, so the text layers run once over the captions (pre-training: once more for the
    masked caption of MLM); a batch of one image (retrieval's short last batch) likewise."""
    model = build(head_type, psl=False).eval()
    batch = testing.tiny_batch(head_type)
    rows = _text_layer_rows(model)
    model(batch)
    size = batch.input_ids.size(0)
    assert rows == ([size, size] if head_type == "pretraining" else [size])
    if head_type == "retrieval":
        batch.image_index = torch.zeros(size, dtype=torch.long)
        rows.clear()
        model(batch)
        assert rows == [size]
    else:  # a batch of one caption: no negative, the positive's fusion still from the text encoder's output
        rows.clear()
        model(rows_of(batch, slice(0, 1)))
        assert rows == [1, 1]
