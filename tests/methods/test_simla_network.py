"""SIMLA's shared text/multimodal encoder and its pre-training heads (tiny random BERTs, no hub)."""
import re

import pytest
import torch
from transformers import BertConfig, BertModel

from helpers.heads import assert_bert_transform
from mmf_multilevel.methods.simla.network import MULTIMODAL, TEXT, SIMLATextEncoder, base_bert_config
from mmf_multilevel.methods.simla.pretraining import SIMLAPretrainingHeads

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return SIMLATextEncoder.from_config(BertConfig(**TINY)).eval()


def batch(seed=1, bsz=3, length=7, patches=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (bsz, length), generator=g)
    mask = torch.ones(bsz, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    image = torch.randn(bsz, 1 + patches, 32, generator=g)
    return ids, mask, image


def reference_bert(enc):
    """An independent BertModel holding the same weights (token-type rows zero: SIMLA has no token types)."""
    ref = BertModel(BertConfig(**TINY), add_pooling_layer=False).eval()
    state = {k[len("text.bert."):]: v for k, v in enc.state_dict().items() if k.startswith("text.bert.")}
    state["embeddings.token_type_embeddings.weight"] = torch.zeros_like(ref.embeddings.token_type_embeddings.weight)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and [k for k in missing if "position_ids" not in k] == []
    return ref


def test_text_only_pass_equals_hf_bert_on_the_same_weights():
    enc = tiny_encoder()
    ids, mask, _ = batch()
    ours = enc.encode_text(ids, mask)
    theirs = reference_bert(enc)(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    assert not hasattr(enc.text.bert.embeddings, "token_type_embeddings")


def test_multimodal_pass_reads_the_image_in_every_layer_and_text_pass_does_not():
    enc = tiny_encoder()
    ids, mask, image = batch()
    fused = enc.fuse(ids, mask, image)
    assert fused.shape == (3, 7, 32)
    assert not torch.allclose(fused, enc.fuse(ids, mask, image + 1.0))
    assert not torch.allclose(fused, enc.encode_text(ids, mask))
    # every layer's cross-attention runs in the multimodal pass and none in the text pass
    calls = []
    hooks = [m.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, m in ((int(k), v) for k, v in enc.cross_attention.items())]
    enc.encode_text(ids, mask)
    assert calls == []
    enc.fuse(ids, mask, image)
    assert calls == list(range(enc.num_layers))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(enc(ids, mask, mode=TEXT), enc.encode_text(ids, mask))
    torch.testing.assert_close(enc(ids, mask, image=image, mode=MULTIMODAL), fused)


def test_one_parameter_set_serves_both_roles():
    enc = tiny_encoder()
    ids, mask, image = batch()
    used = {}
    for mode, run in ((TEXT, lambda: enc.encode_text(ids, mask)), (MULTIMODAL, lambda: enc.fuse(ids, mask, image))):
        enc.zero_grad(set_to_none=True)
        run().sum().backward()
        used[mode] = {id(p) for p in enc.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert used[mode] == {id(p) for p in enc.mode_parameters(mode)}
    assert used[TEXT] < used[MULTIMODAL]
    cross = {id(p) for p in enc.cross_attention.parameters()}
    assert used[MULTIMODAL] - used[TEXT] == cross
    assert {id(p) for p in enc.parameters()} == used[MULTIMODAL]  # no parameter outside the two roles


def test_padding_is_respected_on_both_sides():
    enc = tiny_encoder()
    ids, mask, image = batch()
    image_mask = torch.ones(3, 6, dtype=torch.long)
    image_mask[0, 4:] = 0
    base = enc.fuse(ids, mask, image, image_mask)
    # padded text positions and padded image tokens change nothing at the real positions
    ids2, image2 = ids.clone(), image.clone()
    ids2[1, 4:] = 7
    image2[0, 4:] += 5.0
    other = enc.fuse(ids2, mask, image2, image_mask)
    real = mask.bool()
    torch.testing.assert_close(base[real], other[real])
    assert not torch.allclose(base[0], enc.fuse(ids, mask, image2)[0])  # unmasked, the change is seen
    text_pad = enc.encode_text(ids2, mask)
    torch.testing.assert_close(enc.encode_text(ids, mask)[real], text_pad[real])


def test_mim_pass_image_queries_attend_to_text_embeddings():
    enc = tiny_encoder()
    ids, mask, image = batch()
    out = enc.reconstruct_image(image, ids, mask)
    assert out.shape == image.shape
    # the memory is the caption's embedding-layer output: cross-attention 0 receives exactly it
    seen = {}
    hook = enc.cross_attention["0"].register_forward_hook(
        lambda m, args, kwargs, res: seen.update(memory=kwargs["encoder_hidden_states"]), with_kwargs=True)
    enc.reconstruct_image(image, ids, mask)
    hook.remove()
    torch.testing.assert_close(seen["memory"], enc.embed(ids))
    # the queries get BERT position embeddings + LayerNorm: equal to an explicit computation of layer 0's input
    emb = enc.text.embeddings
    expected_input = emb.LayerNorm(image + emb.position_embeddings.weight[: image.size(1)])
    torch.testing.assert_close(enc.embed(inputs_embeds=image), expected_input)
    ids2 = ids.clone()
    ids2[1, 4:] = 9  # padded caption words are not attended to
    torch.testing.assert_close(out, enc.reconstruct_image(image, ids2, mask))
    ids2[0, 1] = 9 if ids[0, 1] != 9 else 10
    assert not torch.allclose(out[0], enc.reconstruct_image(image, ids2, mask)[0])


def test_from_bert_loads_self_attention_and_ffn_not_cross_attention(tmp_path):
    torch.manual_seed(4)
    bert = BertModel(BertConfig(**TINY), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    enc = SIMLATextEncoder.from_bert(str(tmp_path / "bert"))
    for name, value in bert.state_dict().items():
        if "token_type" in name or "position_ids" in name:
            continue
        torch.testing.assert_close(enc.text.bert.state_dict()[name], value)
    assert all(".crossattention." not in k for k in enc.state_dict())
    assert len(enc.cross_attention) == TINY["num_hidden_layers"]


def test_configuration_errors_name_the_key():
    with pytest.raises(ValueError, match="encoder_width"):
        SIMLATextEncoder(SIMLATextEncoder.from_config(BertConfig(**TINY)).text, encoder_width=48)
    with pytest.raises(ValueError, match="model_config.simla.temp"):
        SIMLAPretrainingHeads(BertConfig(**TINY), vision_width=32, temp=0.9)


def test_heads_shapes_tying_normalisation_and_clamp():
    enc = tiny_encoder()
    heads = SIMLAPretrainingHeads(BertConfig(**TINY), vision_width=32, embed_dim=16, image_vocab=11).tie_to(
        enc.word_embeddings)
    ids, mask, image = batch()
    text = enc.encode_text(ids, mask)
    f_v, f_t = heads.image_feature(image[:, 0]), heads.text_feature(text[:, 0])
    assert f_v.shape == f_t.shape == (3, 16)
    torch.testing.assert_close(f_v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(f_t.norm(dim=-1), torch.ones(3))
    assert heads.itm_logits(text[:, 0]).shape == (3, 2)
    assert heads.mlm_logits(text).shape == (3, 7, 40)
    assert heads.mim_logits(image).shape == (3, 5, 11)
    assert heads.concept_logits(f_v).shape == (3, 40)
    assert heads.mlm.decoder.weight is enc.word_embeddings.weight
    assert heads.temp.item() == pytest.approx(0.07)
    with torch.no_grad():
        heads.temp.fill_(2.0)
    assert heads.clamp_temperature().item() == pytest.approx(0.5)
    with torch.no_grad():
        heads.temp.fill_(-1.0)
    assert heads.clamp_temperature().item() == pytest.approx(0.001)


def test_base_size_counts_relate_to_the_papers_223m():
    from mmf_multilevel.methods.simla.network import parameter_counts

    counts = parameter_counts()
    assert counts["12 cross-attention blocks"] == 12 * (4 * (768 * 768 + 768) + 2 * 768)
    assert counts["encoders total"] == 223_102_464
    assert counts["heads total"] == 15_161_719


def test_cross_attention_maps_are_returned_in_the_graph_and_respect_the_image_mask():
    # Grad-CAM (paper §3.5) differentiates the multimodal pass's cross-attention probabilities
    enc = tiny_encoder().eval()
    ids, mask, image = batch()
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    image_mask[0, -2:] = 0
    plain = enc.fuse(ids, mask, image, image_mask)
    hidden, self_maps, cross_maps = enc.fuse(ids, mask, image, image_mask, output_attentions=True,
                                             output_cross_attentions=True)
    torch.testing.assert_close(hidden, plain)
    assert len(cross_maps) == enc.num_layers and len(self_maps) == enc.num_layers
    heads = enc.config.num_attention_heads
    assert cross_maps[0].shape == (ids.size(0), heads, ids.size(1), image.size(1))
    torch.testing.assert_close(cross_maps[1].sum(-1), torch.ones(ids.size(0), heads, ids.size(1)))
    assert float(cross_maps[1][0, :, :, -2:].abs().max()) == 0.0
    hidden2, cross_only = enc.fuse(ids, mask, image, image_mask, output_cross_attentions=True)
    (grad,) = torch.autograd.grad(hidden2[:, 0].sum(), cross_only[0])
    assert grad.abs().sum() > 0


def test_embed_checks_its_input():
    enc = tiny_encoder()
    ids, _, image = batch()
    for kwargs in ({}, dict(input_ids=ids, inputs_embeds=image)):
        with pytest.raises(ValueError, match="^pass exactly one of input_ids and inputs_embeds"):
            enc.embed(**kwargs)
    with pytest.raises(ValueError, match=r"^input_ids must be \(batch, seq_len\); got shape \(3, 7, 1\)"):
        enc.embed(ids[..., None])
    for bad in (image[0], image[..., :31]):
        with pytest.raises(ValueError, match=rf"^inputs_embeds must be \(batch, seq, 32\); got {re.escape(str(tuple(bad.shape)))}"):
            enc.embed(inputs_embeds=bad)
    longest = torch.randint(5, 40, (2, 40))  # max_position_embeddings = 40: the longest sequence
    assert enc.embed(longest).shape == (2, 40, 32)
    with pytest.raises(ValueError, match="^sequence length 41 exceeds max_position_embeddings=40"):
        enc.embed(torch.randint(5, 40, (2, 41)))
    # word + position (no token type), LayerNorm: against an explicit computation
    emb = enc.text.embeddings
    expected = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings.weight[:7])
    torch.testing.assert_close(enc.embed(ids), expected)


def test_encode_checks_masks_and_memory_and_defaults_them_to_all_real():
    enc = tiny_encoder()
    ids, mask, image = batch()
    hidden = enc.embed(ids)
    ones, image_ones = torch.ones_like(mask), torch.ones(image.shape[:2], dtype=torch.long)
    torch.testing.assert_close(enc.encode(hidden), enc.encode(hidden, ones))
    torch.testing.assert_close(enc.encode(hidden, mask, memory=image), enc.encode(hidden, mask, image, image_ones))
    with pytest.raises(ValueError, match=r"^attention mask shape \(3, 6\) does not match the sequence \(3, 7\)"):
        enc.encode(hidden, mask[:, 1:])
    for bad in (image[0], image[:2], image[..., :31]):
        with pytest.raises(ValueError, match=rf"^cross-attention memory must be \(3, tokens, 32\); got {re.escape(str(tuple(bad.shape)))}"):
            enc.encode(hidden, mask, memory=bad)
    with pytest.raises(ValueError, match=r"^memory mask shape \(3, 5\) does not match the memory \(3, 6\)"):
        enc.encode(hidden, mask, memory=image, memory_mask=image_ones[:, 1:])


def test_encode_runs_the_layers_named_and_returns_maps_by_layer():
    enc = tiny_encoder()
    ids, mask, image = batch()
    hidden = enc.embed(ids)
    only_last = enc.encode(hidden, mask, layers=[1])
    extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    expected, _, _ = enc.run_block(1, hidden, extended)
    torch.testing.assert_close(only_last, expected)
    out, maps = enc.encode(hidden, mask, layers=[1], output_attentions=True)
    torch.testing.assert_close(out, only_last)
    assert maps[0] is None and maps[1].shape == (3, 4, 7, 7)
    out, cross = enc.encode(hidden, mask, memory=image, output_cross_attentions=True)
    assert isinstance(cross, tuple) and len(cross) == 2 and cross[0].shape == (3, 4, 7, 6)
    assert torch.is_tensor(enc.encode(hidden, mask))  # no map asked: the states alone


def test_modes_are_named():
    enc = tiny_encoder()
    ids, mask, _ = batch()
    for call in (lambda: enc.mode_parameters("fusion"), lambda: enc(ids, mask, mode="fusion")):
        with pytest.raises(ValueError, match=r"^mode must be one of \['text', 'multimodal'\], got 'fusion'"):
            call()
    with pytest.raises(ValueError, match=r"^mode='multimodal' needs the image tokens"):
        enc(ids, mask, mode=MULTIMODAL)
    assert enc.mode_parameters(MULTIMODAL) == list(enc.parameters())


def test_heads_are_built_to_the_settings_and_compute_what_they_name():
    torch.manual_seed(0)
    config = BertConfig(**{**TINY, "hidden_act": "relu", "layer_norm_eps": 1e-6, "initializer_range": 0.5})
    heads = SIMLAPretrainingHeads(config, vision_width=48, embed_dim=16, image_vocab=11)
    assert heads.vision_proj.weight.shape == (16, 48) and heads.text_proj.weight.shape == (16, 32)
    assert heads.itm_head.weight.shape == (2, 32) and heads.mim_head.weight.shape == (11, 32)
    assert heads.concept_head.weight.shape == (40, 16) and heads.mlm.bias.shape == (40,)
    assert_bert_transform(heads.mlm.transform, torch.nn.ReLU, eps=1e-6, std=0.5, rel=0.2)
    g = torch.Generator().manual_seed(2)
    image_cls, text_cls = torch.randn(3, 48, generator=g), torch.randn(3, 32, generator=g)
    hidden = torch.randn(3, 6, 32, generator=g)
    f_v = heads.image_feature(image_cls)
    torch.testing.assert_close(f_v, torch.nn.functional.normalize(heads.vision_proj(image_cls), dim=-1))
    torch.testing.assert_close(heads.text_feature(text_cls),
                               torch.nn.functional.normalize(heads.text_proj(text_cls), dim=-1))
    torch.testing.assert_close(heads.itm_logits(text_cls), heads.itm_head(text_cls))
    torch.testing.assert_close(heads.mlm_logits(hidden), heads.mlm(hidden))
    torch.testing.assert_close(heads.mim_logits(hidden), heads.mim_head(hidden[:, 1:]))  # [CLS] dropped
    torch.testing.assert_close(heads.concept_logits(f_v), heads.concept_head(f_v))
    bare = SIMLAPretrainingHeads(config, vision_width=48, embed_dim=16, image_vocab=11, mim_head=False,
                                 concept_head=False)
    assert bare.mim_head is None and bare.concept_head is None


def test_temperature_bounds_and_the_in_place_clamp():
    config = BertConfig(**TINY)
    for temp, low, high in ((0.001, 0.001, 0.5), (0.5, 0.001, 0.5), (0.2, 0.2, 0.2)):
        heads = SIMLAPretrainingHeads(config, vision_width=32, embed_dim=4, image_vocab=1, temp=temp,
                                      temp_range=(low, high))
        assert heads.temp.item() == pytest.approx(temp) and heads.temp_range == (low, high)
    for temp, temp_range in ((0.0009, (0.001, 0.5)), (0.51, (0.001, 0.5)), (0.1, (0.0, 0.5)), (0.1, (0.2, 0.05))):
        with pytest.raises(ValueError, match=r"^model_config.simla.temp: .* must lie in the clamp range"):
            SIMLAPretrainingHeads(config, vision_width=32, temp=temp, temp_range=temp_range)
    for embed_dim, image_vocab in ((0, 5), (5, 0)):
        with pytest.raises(ValueError, match=rf"^model_config.simla.embed_dim \({embed_dim}\) and "
                                             rf"model_config.simla.image_vocab \({image_vocab}\) must be positive"):
            SIMLAPretrainingHeads(config, vision_width=32, embed_dim=embed_dim, image_vocab=image_vocab)
    assert SIMLAPretrainingHeads(config, vision_width=32, embed_dim=1, image_vocab=1).text_proj.out_features == 1
    heads = SIMLAPretrainingHeads(config, vision_width=32, embed_dim=4, image_vocab=3, temp_range=(0.01, 0.3))
    heads.temp.sum().backward()
    with torch.no_grad():
        heads.temp.fill_(0.9)
    clamped = heads.clamp_temperature()
    assert clamped is heads.temp and clamped.item() == pytest.approx(0.3) and clamped.requires_grad
    assert heads.temp.grad.item() == 1.0  # the clamp leaves the gradient alone


def test_base_bert_config_is_bert_base_with_overrides():
    reference = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    assert base_bert_config().to_dict() == reference.to_dict()
    assert base_bert_config(num_hidden_layers=2, hidden_act="relu").to_dict() == BertConfig(
        **{**reference.to_dict(), "num_hidden_layers": 2, "hidden_act": "relu"}).to_dict()


def test_from_bert_passes_layout_fusion_layer_and_overrides(tmp_path):
    bert = BertModel(BertConfig(**{**TINY, "num_hidden_layers": 4}), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    enc = SIMLATextEncoder.from_bert(str(tmp_path / "bert"), layout="albef", fusion_layer=3, hidden_dropout_prob=0.25)
    assert enc.layout == "albef" and enc.fusion_layer == 3 and sorted(enc.cross_attention) == ["3"]
    assert enc.config.hidden_dropout_prob == 0.25
    eight = SIMLATextEncoder.from_config(BertConfig(**{**TINY, "num_hidden_layers": 8}), layout="albef")
    assert eight.fusion_layer == 6 and list(eight.fusion_layers) == [6, 7]  # ALBEF's default, 6


def test_albef_fuse_from_text_states_returns_the_maps_asked():
    torch.manual_seed(0)
    enc = SIMLATextEncoder.from_config(BertConfig(**{**TINY, "num_hidden_layers": 4}), layout="albef",
                                       fusion_layer=2).eval()
    ids, mask, image = batch()
    states = enc.encode_text(ids, mask)
    via_fuse = enc.fuse(ids, mask, image, None, True, True, text_states=states)
    direct = enc.fuse_text(states, mask, image, None, True, True)
    assert len(via_fuse) == 3
    torch.testing.assert_close(via_fuse[0], direct[0])
    assert via_fuse[1][3].shape == (3, 4, 7, 7) and via_fuse[2][3].shape == (3, 4, 7, 6)
    _, cross_only = enc.fuse(ids, mask, image, None, False, True, text_states=states)
    assert cross_only[2] is not None


def test_mim_and_forward_read_the_image_mask():
    enc = tiny_encoder()
    ids, mask, image = batch()
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    image_mask[0, -2:] = 0
    changed = image.clone()
    changed[0, -2:] += torch.randn(2, 32, generator=torch.Generator().manual_seed(5))  # not a shift LayerNorm undoes
    out = enc.reconstruct_image(image, ids, mask, image_mask)
    other = enc.reconstruct_image(changed, ids, mask, image_mask)
    torch.testing.assert_close(out[0, :-2], other[0, :-2])  # padded image tokens are not attended to
    fused = enc(ids, mask, image=image, image_mask=image_mask, mode=MULTIMODAL)
    torch.testing.assert_close(fused, enc.fuse(ids, mask, image, image_mask))
    torch.testing.assert_close(fused, enc(ids, mask, image=changed, image_mask=image_mask, mode=MULTIMODAL))
    albef = SIMLATextEncoder.from_config(BertConfig(**{**TINY, "num_hidden_layers": 4}), layout="albef", fusion_layer=2)
    with pytest.raises(ValueError, match=r"^MIM \(reconstruct_image\) needs model_config.simla.layout: simla"):
        albef.reconstruct_image(image, ids, mask)


def test_parameter_counts_name_every_part_and_add_up():
    from mmf_multilevel.methods.simla.network import parameter_counts

    counts = parameter_counts()
    bert_head = 768 * 768 + 768 + 2 * 768 + 30522
    assert counts == {
        "vision (ViT-B/16 at 256, with the MIM mask token)": counts["vision (ViT-B/16 at 256, with the MIM mask token)"],
        "text embeddings (word + position + LayerNorm)": 30522 * 768 + 512 * 768 + 2 * 768,
        "12 BERT layers (self-attention + FFN)": 12 * 7_087_872,
        "12 cross-attention blocks": 12 * 2_363_904,
        "text/multimodal encoder": 30522 * 768 + 512 * 768 + 2 * 768 + 12 * 7_087_872 + 12 * 2_363_904,
        "encoders total": 223_102_464,
        "head vision_proj": 768 * 256 + 256, "head text_proj": 768 * 256 + 256, "head itm_head": 768 * 2 + 2,
        "head mlm (decoder tied to the word embeddings)": bert_head,
        "head mim_head": 768 * 8192 + 8192, "head concept_head": 256 * 30522 + 30522,
        "head temperature": 1,
        "heads total": 15_161_719,
        "all (encoders + heads)": 223_102_464 + 15_161_719,
    }
    assert counts["heads total"] == sum(v for k, v in counts.items() if k.startswith("head "))
    small = parameter_counts(image_size=224)
    assert small["vision (ViT-B/16 at 224, with the MIM mask token)"] == (
        counts["vision (ViT-B/16 at 256, with the MIM mask token)"] - (256 - 196) * 768)
    albef = parameter_counts(layout="albef", fusion_layer=3)
    assert albef["9 cross-attention blocks (layers 3-11)"] == 9 * 2_363_904
    assert "vision (ViT-B/16 at 256)" in albef and "head mim_head" not in albef and "head concept_head" not in albef
    assert albef["all (encoders + heads)"] == albef["encoders total"] + albef["heads total"]


def test_counts_command(capsys):
    from mmf_multilevel.methods.simla.network import main, parameter_counts

    assert main([]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert shown.startswith("usage:") and "SIMLA's text / multimodal encoder: one BERT run in two roles" in shown
    assert "--counts print the exact base-size parameter counts" in shown
    assert ("--layout {simla,albef} simla (default): the shared stream; albef: ALBEF's text (6) + fusion (6) layers, "
            "its heads (no MIM, no concept head)") in shown
    for argv, expected in ((["--counts"], parameter_counts()),
                           (["--counts", "--layout", "albef", "--image-size", "224"], parameter_counts(224, "albef"))):
        assert main(argv) == 0
        assert capsys.readouterr().out == "".join(f"{value:>13,}  {name}\n" for name, value in expected.items())
    for argv in (["--layout", "clip"], ["--image-size", "big"]):
        with pytest.raises(SystemExit):
            main(argv)
