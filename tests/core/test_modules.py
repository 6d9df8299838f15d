"""Unit tests for the shared blocks in ``mmf_multilevel.modules`` (tiny random configs, CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining, BertModel

from helpers.stats import assert_rate
from mmf_multilevel.modules.heads import (
    ITMHead,
    MLMHead,
    RegionClassificationHead,
    RegionFeatureRegressionHead,
    VQAHead,
    bert_pretraining_head_state,
    itm_loss,
    mlm_loss,
    region_classification_loss,
    region_feature_regression_loss,
    vqa_loss,
)
from mmf_multilevel.modules.masking import (
    IGNORE_INDEX,
    RegionMasking,
    apply_region_masking,
    draw_region_masking,
    mask_regions,
    mask_tokens,
)
from mmf_multilevel.modules.text import BertTextEncoder, extended_attention_mask, mask_compute_dtype
from mmf_multilevel.modules.visual import RegionEmbedding, normalize_boxes, num_boxes_to_mask

VOCAB, HIDDEN = 50, 32
PAD, CLS, SEP, MASK = 0, 1, 2, 3


def tiny_config(**kw):
    base = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                vocab_size=VOCAB, max_position_embeddings=64, type_vocab_size=2)
    base.update(kw)
    return BertConfig(**base)


def text_batch():
    ids = torch.tensor([[CLS, 10, 11, 12, 13, SEP, PAD, PAD], [CLS, 20, 21, SEP, PAD, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    types = torch.zeros_like(ids)
    return ids, mask, types


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return BertTextEncoder.from_config(tiny_config()).eval()


# ---------------------------------------------------------------------------------------------- text
def test_forward_matches_hf_bert(encoder):
    ids, mask, types = text_batch()
    seq, pooled = encoder(ids, mask, types)
    ref = encoder.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert seq.shape == (2, 8, HIDDEN) and pooled.shape == (2, HIDDEN)
    torch.testing.assert_close(seq, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_access_points(encoder):
    assert encoder.word_embeddings is encoder.bert.embeddings.word_embeddings
    assert encoder.position_embeddings.num_embeddings == 64
    assert encoder.token_type_embeddings.num_embeddings == 2
    assert len(encoder.layers) == 2 and encoder.hidden_size == HIDDEN
    ids, _, types = text_batch()
    raw = encoder.embed(ids, types, layer_norm=False)
    manual = (encoder.word_embeddings(ids) + encoder.token_type_embeddings(types)
              + encoder.position_embeddings(torch.arange(8)).unsqueeze(0))
    torch.testing.assert_close(raw, manual)
    torch.testing.assert_close(encoder.embed(ids, types), encoder.embeddings.LayerNorm(manual))
    encoder.resize_token_embeddings(VOCAB + 7)
    assert encoder.word_embeddings.num_embeddings == VOCAB + 7


def test_encode_single_stream_sequence(encoder):
    """[text; regions] through the encoder equals HF's BertEncoder with HF's own mask."""
    ids, mask, types = text_batch()
    text = encoder.embed(ids, types)
    regions = torch.randn(2, 5, HIDDEN)
    region_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    joint = torch.cat([text, regions], 1)
    joint_mask = torch.cat([mask, region_mask], 1)
    out = encoder.encode(joint, joint_mask)
    hf_mask = encoder.bert.get_extended_attention_mask(joint_mask, joint_mask.shape)
    ref = encoder.bert.encoder(joint, attention_mask=hf_mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # padded keys have no influence on real positions
    noisy = joint.clone()
    noisy[0, 8 + 3:] = 100.0
    out2 = encoder.encode(noisy, joint_mask)
    real = joint_mask.bool()
    torch.testing.assert_close(out2[real], out[real], atol=1e-5, rtol=1e-5)


def test_encode_layer_subsets_and_block_mask(encoder):
    x = torch.randn(2, 6, HIDDEN)
    full, states = encoder.encode(x, output_hidden_states=True)
    assert len(states) == 3 and torch.equal(states[0], x) and torch.equal(states[-1], full)
    lower = encoder.encode(x, layers=slice(0, 1))
    torch.testing.assert_close(encoder.encode(lower, layers=[1]), full, atol=1e-6, rtol=1e-6)
    # a block-diagonal 3-d mask equals running the two halves separately
    block = torch.zeros(2, 6, 6, dtype=torch.long)
    block[:, :3, :3] = 1
    block[:, 3:, 3:] = 1
    joint = encoder.encode(x, block)
    torch.testing.assert_close(joint[:, :3], encoder.encode(x[:, :3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint[:, 3:], encoder.encode(x[:, 3:]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="hidden_states"):
        encoder.encode(torch.randn(2, 6, HIDDEN + 1))
    with pytest.raises(ValueError, match="attention_mask"):
        encoder.encode(x, torch.ones(2, 5))


def test_encode_cross_attention():
    torch.manual_seed(0)
    enc = BertTextEncoder.from_config(tiny_config(is_decoder=True, add_cross_attention=True)).eval()
    x, memory = torch.randn(2, 4, HIDDEN), torch.randn(2, 3, HIDDEN)
    memory_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = enc.encode(x, torch.ones(2, 4), encoder_hidden_states=memory, encoder_attention_mask=memory_mask)
    changed = memory.clone()
    changed[0, 2] = 50.0
    out2 = enc.encode(x, torch.ones(2, 4), encoder_hidden_states=changed, encoder_attention_mask=memory_mask)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, enc.encode(x, torch.ones(2, 4), encoder_hidden_states=memory * 2))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_half_precision_encoder_builds_its_masks_in_its_own_dtype(attn):
    """Outside autocast the additive masks take the hidden states' dtype: an encoder cast to float16 or
    bfloat16 (``model.half()`` inference; self- and cross-attention, padding on both, one sample with no
    memory to attend to) runs and stays close to the float32 answer."""
    torch.manual_seed(0)
    enc = BertTextEncoder.from_config(tiny_config(is_decoder=True, add_cross_attention=True,
                                                  attn_implementation=attn)).eval()
    x, memory = torch.randn(2, 4, HIDDEN), torch.randn(2, 3, HIDDEN)
    mask, memory_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([[0, 0, 0], [1, 1, 1]])
    reference = enc.encode(x, mask, encoder_hidden_states=memory, encoder_attention_mask=memory_mask)
    for dtype, tolerance in ((torch.float16, 0.02), (torch.bfloat16, 0.1)):
        out = enc.to(dtype).encode(x.to(dtype), mask, encoder_hidden_states=memory.to(dtype),
                                   encoder_attention_mask=memory_mask)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), reference, atol=tolerance, rtol=0)


def test_mask_compute_dtype_follows_the_reference_outside_autocast():
    assert mask_compute_dtype(torch.zeros(2, dtype=torch.float64)) == torch.float64
    assert mask_compute_dtype(torch.zeros(2, dtype=torch.float16)) == torch.float16
    assert mask_compute_dtype(torch.zeros(2, dtype=torch.long)) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mask_compute_dtype(torch.zeros(2, dtype=torch.float64)) == torch.bfloat16


def test_embed_at_the_position_limit_without_token_types_and_layer_norm(encoder):
    limit = encoder.config.max_position_embeddings
    ids = torch.randint(5, VOCAB, (2, limit))
    assert encoder.embed(ids).shape == (2, limit, HIDDEN)  # exactly the limit is allowed
    with pytest.raises(ValueError, match=f"sequence length {limit + 1} exceeds"):
        encoder.embed(torch.randint(5, VOCAB, (2, limit + 1)))
    raw = encoder.embed(ids[:, :6], layer_norm=False)  # token types default to zeros on this path too
    manual = (encoder.word_embeddings(ids[:, :6]) + encoder.token_type_embeddings(torch.zeros_like(ids[:, :6]))
              + encoder.position_embeddings(torch.arange(6)).unsqueeze(0))
    torch.testing.assert_close(raw, manual)


def test_encode_refuses_both_masks(encoder):
    x, mask = torch.randn(2, 4, HIDDEN), torch.ones(2, 4)
    with pytest.raises(ValueError, match="either attention_mask or extended_mask"):
        encoder.encode(x, mask, extended_mask=extended_attention_mask(mask))
    torch.testing.assert_close(encoder.encode(x, extended_mask=extended_attention_mask(mask)), encoder.encode(x, mask))


def test_pool_at_index(encoder):
    seq = torch.randn(3, 7, HIDDEN)
    idx = torch.tensor([0, 4, 6])
    pooled = encoder.pool(seq, idx)
    for b in range(3):
        manual = torch.tanh(encoder.pooler.dense.weight @ seq[b, idx[b]] + encoder.pooler.dense.bias)
        torch.testing.assert_close(pooled[b], manual, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(encoder.pool(seq, 4)[1], pooled[1])
    # an index of another integer dtype (uint8, as a cache may store it) still means positions, not a mask
    torch.testing.assert_close(encoder.pool(seq, idx.to(torch.uint8)), pooled)


def test_extended_attention_mask():
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ext = extended_attention_mask(m)
    assert ext.shape == (2, 1, 1, 3) and ext.dtype == torch.float32
    assert ext[0, 0, 0, 0] == 0 and ext[0, 0, 0, 2] == torch.finfo(torch.float32).min
    assert extended_attention_mask(torch.ones(2, 4, 3)).shape == (2, 1, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ext16 = extended_attention_mask(m)
    assert ext16.dtype == torch.bfloat16 and torch.isfinite(ext16).all()
    assert ext16[1, 0, 0, 2] == torch.finfo(torch.bfloat16).min
    assert extended_attention_mask(m.bool(), torch.float16)[1, 0, 0, 1] == torch.finfo(torch.float16).min
    with pytest.raises(ValueError):
        extended_attention_mask(torch.ones(3))
    with pytest.raises(ValueError):
        extended_attention_mask(m, torch.long)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_autocast_encoder_path(attn):
    torch.manual_seed(0)
    enc = BertTextEncoder.from_config(tiny_config(attn_implementation=attn)).eval()
    emb = RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=5, img_token=True).eval()
    ids, mask, types = text_batch()
    feats, boxes = torch.randn(2, 4, 16), torch.rand(2, 4, 5)
    region_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])

    def run():
        seq, pooled = enc(ids, mask, types)
        regions, rmask = emb(feats, boxes, region_mask)
        joint = enc.encode(torch.cat([enc.embed(ids, types), regions], 1), torch.cat([mask, rmask], 1))
        return seq, pooled, joint

    ref = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run()
        logits = MLMHead(HIDDEN, VOCAB).tie_to(enc.word_embeddings)(out[2][:, :8])
        loss = mlm_loss(logits, torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX)))
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(o).all()
        torch.testing.assert_close(o.float(), r, atol=0.1, rtol=0.05)
    assert out[2].shape == (2, 8 + 5, HIDDEN)
    assert logits.shape == (2, 8, VOCAB) and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_from_name_roundtrip_bert_model(tmp_path, encoder):
    encoder.bert.save_pretrained(tmp_path / "bert")
    loaded = BertTextEncoder.from_name(str(tmp_path / "bert")).eval()
    ids, mask, types = text_batch()
    for a, b in zip(encoder(ids, mask, types), loaded(ids, mask, types)):
        assert torch.equal(a, b)
    overridden = BertTextEncoder.from_name(str(tmp_path / "bert"), hidden_dropout_prob=0.0)
    assert overridden.config.hidden_dropout_prob == 0.0


def test_from_name_pretraining_checkpoint_and_heads(tmp_path):
    """The bert-base-uncased layout: a BertForPreTraining checkpoint gives encoder + MLM/NSP heads."""
    torch.manual_seed(0)
    full = BertForPreTraining(tiny_config()).eval()
    with torch.no_grad():
        full.cls.predictions.bias.normal_()
    full.save_pretrained(tmp_path / "ckpt")
    enc = BertTextEncoder.from_name(str(tmp_path / "ckpt")).eval()
    ids, mask, types = text_batch()
    out = full(input_ids=ids, attention_mask=mask, token_type_ids=types)
    seq, pooled = enc(ids, mask, types)
    state = bert_pretraining_head_state(str(tmp_path / "ckpt"))
    mlm = MLMHead.from_config(enc.config).tie_to(enc.word_embeddings)
    mlm.load_bert_state_dict(state)
    itm = ITMHead(HIDDEN)
    itm.load_nsp_state_dict(state)
    torch.testing.assert_close(mlm(seq), out.prediction_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itm(pooled), out.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    swapped = ITMHead(HIDDEN)
    swapped.load_nsp_state_dict(state, swap=True)
    torch.testing.assert_close(swapped(pooled), out.seq_relationship_logits.flip(-1), atol=1e-5, rtol=1e-5)
    # an untied head needs the decoder weight, which the checkpoint provides through the tied state
    untied = MLMHead.from_config(enc.config)
    untied.load_bert_state_dict(state)
    torch.testing.assert_close(untied(seq), out.prediction_logits, atol=1e-5, rtol=1e-5)
    # a bare BertModel checkpoint has no heads
    BertModel(tiny_config()).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no BERT pre-training heads"):
        bert_pretraining_head_state(str(tmp_path / "bare"))


def test_from_name_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertTextEncoder.from_name(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE") as info:
        BertTextEncoder.from_name("no-such-org/no-such-bert", cache_dir=str(tmp_path / "cache"))
    assert "save_pretrained" in str(info.value)


# ---------------------------------------------------------------------------------------------- visual
def test_normalize_boxes_modes():
    boxes = torch.tensor([[[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 200.0, 100.0]],
                          [[5.0, 5.0, 15.0, 25.0], [0.0, 0.0, 0.0, 0.0]]])
    w, h = torch.tensor([200.0, 50.0]), torch.tensor([100.0, 50.0])
    out = {m: normalize_boxes(boxes, w, h, mode=m) for m in ("4d", "5d", "6d", "7d")}
    for b in range(2):
        for n in range(2):
            x1, y1, x2, y2 = boxes[b, n].tolist()
            W, H = w[b].item(), h[b].item()
            base = [x1 / W, y1 / H, x2 / W, y2 / H]
            rw, rh = (x2 - x1) / W, (y2 - y1) / H
            expect = {"4d": base, "5d": base + [rw * rh], "6d": base + [rw, rh], "7d": base + [rw, rh, rw * rh]}
            for mode, vec in expect.items():
                torch.testing.assert_close(out[mode][b, n], torch.tensor(vec))
    # scalar image size, a single box list, clamping of slight overshoot
    single = normalize_boxes(torch.tensor([[0.0, 0.0, 101.0, 50.0]]), 100, 100, mode="4d")
    torch.testing.assert_close(single, torch.tensor([[0.0, 0.0, 1.0, 0.5]]))


def test_normalize_boxes_errors():
    good = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        normalize_boxes(torch.zeros(2, 3, 5), 10, 10)
    with pytest.raises(ValueError, match="image_w"):
        normalize_boxes(good, 0, 10)
    with pytest.raises(ValueError, match="image_h"):
        normalize_boxes(good, torch.tensor([10.0, 10.0]), torch.tensor([10.0, 0.0]))
    with pytest.raises(ValueError, match="broadcast"):
        normalize_boxes(good, torch.tensor([1.0, 2.0, 3.0, 4.0]), 10)
    with pytest.raises(ValueError, match="x2 < x1"):
        normalize_boxes(torch.tensor([[5.0, 0.0, 1.0, 1.0]]), 10, 10)
    with pytest.raises(ValueError, match="unknown box mode"):
        normalize_boxes(good, 10, 10, mode="3d")


def test_num_boxes_to_mask():
    mask = num_boxes_to_mask(torch.tensor([0, 2, 4]), 4)
    assert mask.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    with pytest.raises(ValueError):
        num_boxes_to_mask(torch.tensor([5]), 4)


def test_region_embedding_sum_style():
    torch.manual_seed(0)
    emb = RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=5, style="sum").eval()
    feats, boxes = torch.randn(2, 3, 16), torch.rand(2, 3, 5)
    out, mask = emb(feats, boxes, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    manual = F.layer_norm(feats @ emb.feature_proj.weight.T + emb.feature_proj.bias, (HIDDEN,), eps=1e-12) + \
        F.layer_norm(boxes @ emb.box_proj.weight.T + emb.box_proj.bias, (HIDDEN,), eps=1e-12)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    torch.testing.assert_close(emb.embed_boxes(boxes), manual - F.layer_norm(
        feats @ emb.feature_proj.weight.T + emb.feature_proj.bias, (HIDDEN,), eps=1e-12), atol=1e-5, rtol=1e-5)
    # float16 cache features are accepted
    assert emb(feats.half(), boxes)[0].dtype == torch.float32
    final = RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, style="sum", final_layer_norm=True).eval()
    with torch.no_grad():
        final.load_state_dict(emb.state_dict(), strict=False)
    type_emb = torch.randn(HIDDEN)
    torch.testing.assert_close(final(feats, boxes, extra=type_emb)[0],
                               F.layer_norm(manual + type_emb, (HIDDEN,), eps=1e-12), atol=1e-5, rtol=1e-5)


def test_region_embedding_concat_style_with_img_token():
    torch.manual_seed(0)
    emb = RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=4, style="concat", img_token=True).eval()
    feats, boxes = torch.randn(2, 3, 16), torch.rand(2, 3, 4)
    out, mask = emb(feats, boxes, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert out.shape == (2, 4, HIDDEN) and mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    proj = torch.cat([feats, boxes], -1) @ emb.proj.weight.T + emb.proj.bias
    torch.testing.assert_close(out[:, 1:], F.layer_norm(proj, (HIDDEN,), eps=1e-12), atol=1e-5, rtol=1e-5)
    img = F.layer_norm(emb.img_embedding, (HIDDEN,), eps=1e-12)
    torch.testing.assert_close(out[:, 0], img.expand(2, HIDDEN), atol=1e-5, rtol=1e-5)
    no_ln = RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=6, style="concat", layer_norm=False)
    assert no_ln.norm is None and no_ln(feats, torch.rand(2, 3, 6))[0].shape == (2, 3, HIDDEN)
    with pytest.raises(ValueError, match="boxes must be"):
        emb(feats, torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="features must be"):
        emb(torch.randn(2, 3, 8), boxes)
    with pytest.raises(ValueError, match="expects 4-d"):
        emb(feats)


def test_normalize_boxes_dtypes_single_boxes_unit_sizes_and_clamping():
    box = torch.tensor([10.0, 20.0, 50.0, 100.0])
    expect = torch.tensor([0.1, 0.1, 0.5, 0.5, 0.4 * 0.4])
    # one box of shape (4,), its size a number or a one-element tensor
    torch.testing.assert_close(normalize_boxes(box, 100, 200), expect)
    torch.testing.assert_close(normalize_boxes(box, torch.tensor([100.0]), torch.tensor([200.0])), expect)
    # integer pixel boxes give the float result; float64 boxes stay float64; the sizes' dtype does not leak
    torch.testing.assert_close(normalize_boxes(box.long(), 100, 200), expect)
    assert normalize_boxes(box.double(), 100, 200).dtype == torch.float64
    assert normalize_boxes(box, torch.tensor([100.0], dtype=torch.float64), 200).dtype == torch.float32
    # an image size of 1: boxes already in [0, 1] come back as they are
    unit = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    torch.testing.assert_close(normalize_boxes(unit, 1, 1.0, mode="4d"), unit)
    # a box past the left / top border is clamped to 0 (and not at all without clamp)
    over = torch.tensor([[-3.0, -5.0, 50.0, 100.0]])
    torch.testing.assert_close(normalize_boxes(over, 100, 100, mode="4d"), torch.tensor([[0.0, 0.0, 0.5, 1.0]]))
    torch.testing.assert_close(normalize_boxes(over, 100, 100, mode="4d", clamp=False),
                               torch.tensor([[-0.03, -0.05, 0.5, 1.0]]))


def test_normalize_boxes_errors_name_the_size_and_the_box():
    good = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"^image_w must be positive"):
        normalize_boxes(good, 0, 10)
    with pytest.raises(ValueError, match=r"^image_h must be positive"):
        normalize_boxes(good, 10, -1)
    with pytest.raises(ValueError, match=r"^image_w of shape \(4,\) does not broadcast"):
        normalize_boxes(good, torch.tensor([1.0, 2.0, 3.0, 4.0]), 10)
    bad = torch.zeros(2, 3, 4)
    bad[1, 2] = torch.tensor([5.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"box at index \(1, 2\) has x2 < x1"):
        normalize_boxes(bad, 10, 10)


def test_region_embedding_defaults_initialisation_and_sizes():
    torch.manual_seed(0)
    emb = RegionEmbedding(img_token=True)
    assert (emb.feature_proj.in_features, emb.feature_proj.out_features, emb.box_proj.in_features) == (2048, 768, 5)
    # BERT initialisation N(0, 0.02): the weights' spread over 1.5 M draws, and the [IMG] vector's over 768
    assert emb.feature_proj.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert emb.img_embedding.std().item() == pytest.approx(0.02, rel=0.15)
    assert RegionEmbedding(16, 8, initializer_range=0.5).feature_proj.weight.std().item() == pytest.approx(0.5, rel=0.2)
    for kwargs in (dict(feature_dim=0), dict(hidden_size=0), dict(box_dim=-1)):
        with pytest.raises(ValueError, match="must be positive"):
            RegionEmbedding(**kwargs)
    one = RegionEmbedding(feature_dim=1, hidden_size=1, box_dim=0)
    assert one(torch.randn(2, 3, 1))[0].shape == (2, 3, 1)


def test_region_embedding_takes_float64_boxes_and_follows_autocast():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 16)
    boxes = normalize_boxes(torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 3, dtype=torch.float64).expand(2, 3, 4), 10, 10,
                            mode="4d")
    emb = RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=4, style="concat").eval()
    torch.testing.assert_close(emb(feats, boxes)[0], emb(feats, boxes.float())[0])
    # without a final norm, the [IMG] vector takes the autocast dtype of the projected regions
    raw = RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=4, style="concat", layer_norm=False,
                          img_token=True).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, mask = raw(feats, boxes)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, HIDDEN) and mask.dtype == torch.long


# ---------------------------------------------------------------------------------------------- masking
def token_corpus(batch=400, length=128, vocab=30522):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (batch, length), generator=g)
    lengths = torch.randint(4, length + 1, (batch,), generator=g)
    attn = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[attn == 0] = PAD
    special = (ids == CLS) | (ids == SEP)
    return ids, attn, special


def test_mask_tokens_statistics():
    ids, attn, special = token_corpus(batch=2000)
    masked, labels = mask_tokens(ids, special, attn, vocab_size=30522, mask_token_id=MASK,
                                 generator=torch.Generator().manual_seed(0))
    maskable = attn.bool() & ~special
    selected = labels != IGNORE_INDEX
    assert not (selected & ~maskable).any()
    assert torch.equal(masked[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])
    rate = selected.sum().item() / maskable.sum().item()
    # ~125,000 maskable tokens: 4 standard errors of 0.15 is 0.004, so 0.145 or 0.155 fails
    assert_rate(rate, 0.15, maskable.sum().item(), what="masked fraction") < 0.0011
    n = selected.sum().item()
    to_mask = (masked[selected] == MASK).sum().item() / n
    kept = (masked[selected] == ids[selected]).sum().item() / n
    randomised = 1 - to_mask - kept
    assert_rate(to_mask, 0.8, n, what="[MASK]") < 0.003
    assert_rate(kept, 0.1, n, what="kept")
    assert_rate(randomised, 0.1, n, what="random word")


def test_mask_tokens_never_masks_special_or_padding():
    ids, attn, special = token_corpus(batch=50, length=32)
    for kwargs in (dict(special_tokens_mask=special, attention_mask=attn),
                   dict(special_token_ids=[PAD, CLS, SEP])):
        masked, labels = mask_tokens(ids, vocab_size=30522, mask_token_id=MASK, prob=1.0, ensure_one=True,
                                     generator=torch.Generator().manual_seed(3), **kwargs)
        protected = (ids == PAD) | (ids == CLS) | (ids == SEP)
        assert (labels[protected] == IGNORE_INDEX).all() and torch.equal(masked[protected], ids[protected])
        assert (labels[~protected] != IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="special_tokens_mask"):
        mask_tokens(ids, vocab_size=30522, mask_token_id=MASK)


def test_mask_tokens_deterministic_ensure_one_and_per_token_prob():
    ids, attn, special = token_corpus(batch=64, length=16)
    kw = dict(special_tokens_mask=special, attention_mask=attn, vocab_size=30522, mask_token_id=MASK)
    a = mask_tokens(ids, generator=torch.Generator().manual_seed(7), **kw)
    b = mask_tokens(ids, generator=torch.Generator().manual_seed(7), **kw)
    c = mask_tokens(ids, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    _, labels = mask_tokens(ids, prob=0.01, ensure_one=True, generator=torch.Generator().manual_seed(0), **kw)
    has_candidate = (attn.bool() & ~special).any(1)
    assert ((labels != IGNORE_INDEX).any(1) == has_candidate).all()
    no_candidates = torch.tensor([[CLS, SEP, PAD]])
    _, empty = mask_tokens(no_candidates, special_token_ids=[CLS, SEP, PAD], vocab_size=30522,
                           mask_token_id=MASK, ensure_one=True)
    assert (empty == IGNORE_INDEX).all()
    probs = torch.zeros(ids.shape)
    probs[:, 1:4] = 1.0
    _, labels = mask_tokens(ids, prob=probs, ensure_one=True, generator=torch.Generator().manual_seed(0), **kw)
    selected = labels != IGNORE_INDEX
    assert not selected[:, 4:].any()
    assert torch.equal(selected[:, 1:4], (attn.bool() & ~special)[:, 1:4])
    one_d, one_labels = mask_tokens(ids[0], special[0], attn[0], vocab_size=30522, mask_token_id=MASK, prob=1.0)
    assert one_d.shape == ids[0].shape and (one_labels != IGNORE_INDEX).sum() == (attn[0].bool() & ~special[0]).sum()
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(ids, prob=1.5, **kw)


def test_mask_regions_statistics_and_targets():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 50, 8, generator=g) + 5.0
    num = torch.randint(10, 51, (2000,), generator=g)
    rmask = num_boxes_to_mask(num, 50)
    before = feats.clone()
    masked, selected = mask_regions(feats, rmask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(feats, before)  # originals untouched: they are the regression targets
    assert not (selected & ~rmask.bool()).any()
    assert_rate(selected.sum().item() / rmask.sum().item(), 0.15, rmask.sum().item(), what="selected regions")
    assert (masked[selected] == 0).all() and torch.equal(masked[~selected], feats[~selected])
    # μ-VLA released recipe: 90% zeroed, 10% kept
    masked, selected = mask_regions(feats, rmask, zero_ratio=0.9, generator=torch.Generator().manual_seed(2))
    zeroed = (masked[selected] == 0).all(-1).float().mean().item()
    assert_rate(zeroed, 0.9, selected.sum().item(), what="zeroed") < 0.004
    # LXMERT 80/10/10: random replacements are real features of the batch
    masked, selected = mask_regions(feats, rmask, zero_ratio=0.8, random_ratio=0.1,
                                    generator=torch.Generator().manual_seed(3))
    rows = masked[selected]
    replaced = ~(rows == 0).all(-1) & ~(rows == feats[selected]).all(-1)
    assert_rate(replaced.float().mean().item(), 0.1, replaced.numel(), what="replaced") < 0.004
    pool = feats[rmask.bool()]
    for row in rows[replaced][:20]:
        assert (pool == row).all(-1).any()


def test_mask_regions_per_region_probability_and_determinism():
    feats = torch.ones(40000, 4, 3)
    probs = torch.tensor([0.0, 0.3, 1.0, 0.15]).expand(40000, 4)
    rmask = torch.tensor([1, 1, 1, 0]).expand(40000, 4)
    _, selected = mask_regions(feats, rmask, prob=probs, generator=torch.Generator().manual_seed(0))
    assert not selected[:, 0].any() and selected[:, 2].all() and not selected[:, 3].any()
    assert_rate(selected[:, 1].float().mean().item(), 0.3, 40000, what="per-region probability") < 0.003
    a = mask_regions(feats, rmask, generator=torch.Generator().manual_seed(5))[1]
    b = mask_regions(feats, rmask, generator=torch.Generator().manual_seed(5))[1]
    assert torch.equal(a, b)
    _, sel = mask_regions(feats[:50], rmask[:50], prob=0.001, ensure_one=True,
                          generator=torch.Generator().manual_seed(0))
    assert (sel.sum(1) >= 1).all() and not sel[:, 3].any()
    with pytest.raises(ValueError, match="region_mask"):
        mask_regions(feats, torch.ones(2000, 5))
    with pytest.raises(ValueError, match="^prob must lie in"):
        mask_regions(feats, prob=torch.full((40000, 4), -0.1))


def test_mask_tokens_settings_are_checked_and_edge_values_accepted():
    ids, attn, special = token_corpus(batch=4, length=16)
    kw = dict(special_tokens_mask=special, attention_mask=attn, vocab_size=100)
    for bad in (dict(mask_ratio=-0.1), dict(random_ratio=-0.1), dict(mask_ratio=0.6, random_ratio=0.5)):
        with pytest.raises(ValueError, match="mask_ratio and random_ratio"):
            mask_tokens(ids % 100, mask_token_id=MASK, **bad, **kw)
    for good in (dict(mask_ratio=0.0), dict(random_ratio=0.0), dict(mask_ratio=0.8, random_ratio=0.2)):
        mask_tokens(ids % 100, mask_token_id=MASK, **good, **kw)
    mask_tokens(ids % 100, mask_token_id=0, **kw)  # id 0 is a valid [MASK] id, the vocabulary's size is not
    with pytest.raises(ValueError, match="mask_token_id 100 is outside"):
        mask_tokens(ids % 100, mask_token_id=100, **kw)
    for bad_prob in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="^prob must lie in"):
            mask_tokens(ids % 100, mask_token_id=MASK, prob=bad_prob, **kw)
    with pytest.raises(ValueError, match="^special_tokens_mask must have the shape"):
        mask_tokens(ids, special[:, :3], vocab_size=30522, mask_token_id=MASK)
    with pytest.raises(ValueError, match="^attention_mask must have the shape"):
        mask_tokens(ids, attention_mask=attn[:, :3], vocab_size=30522, mask_token_id=MASK)


def test_mask_tokens_combines_every_protection_and_takes_a_per_token_prob_for_one_sequence():
    ids, attn, _ = token_corpus(batch=20, length=16)
    # padding is protected by the attention mask while [CLS]/[SEP] are protected by their ids
    _, labels = mask_tokens(ids, attention_mask=attn, special_token_ids=[CLS, SEP], vocab_size=30522,
                            mask_token_id=MASK, prob=1.0)
    protected = (ids == PAD) | (ids == CLS) | (ids == SEP)
    assert (labels[protected] == IGNORE_INDEX).all() and (labels[~protected] != IGNORE_INDEX).all()
    # one sequence (T,) with its per-token probabilities (T,)
    probs = torch.zeros(ids.size(1))
    probs[1:3] = 1.0
    _, one = mask_tokens(ids[0], attention_mask=attn[0], special_token_ids=[CLS, SEP], vocab_size=30522,
                         mask_token_id=MASK, prob=probs)
    assert ((one != IGNORE_INDEX) == (probs > 0)).all()


def test_ensure_one_picks_only_where_the_probability_is_positive_and_follows_the_generator():
    ids, attn, special = token_corpus(batch=8, length=16)
    probs = torch.zeros(ids.shape)
    probs[::2, 1] = 1e-6  # even rows: one eligible token at a tiny rate; odd rows: none
    kw = dict(special_tokens_mask=special, attention_mask=attn, vocab_size=30522, mask_token_id=MASK, prob=probs,
              ensure_one=True)
    _, labels = mask_tokens(ids, generator=torch.Generator().manual_seed(0), **kw)
    selected = labels != IGNORE_INDEX
    assert selected[::2, 1].all() and selected.sum() == 4  # the forced pick is the eligible token, odd rows none
    # the forced pick is drawn from the generator alone: the global seed does not change it
    region_mask = torch.ones(64, 6, dtype=torch.long)
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        masking = draw_region_masking(region_mask, prob=1e-6, ensure_one=True, zero_ratio=0.5, random_ratio=0.5,
                                      generator=torch.Generator().manual_seed(0))
        draws.append(masking)
    assert (draws[0].selected.sum(1) == 1).all()
    for a, b in zip(draws[0], draws[1]):
        assert torch.equal(a, b)
    assert (draws[0].source >= 0).any()  # some forced picks were replaced from another region, by the generator


def test_draw_region_masking_defaults_settings_and_the_source_marker():
    region_mask = num_boxes_to_mask(torch.randint(1, 11, (4000,), generator=torch.Generator().manual_seed(0)), 10)
    masking = draw_region_masking(region_mask, generator=torch.Generator().manual_seed(1))
    real = region_mask.sum().item()
    # defaults: prob 0.15, every selected region zeroed, none replaced, no forced pick
    assert_rate(masking.selected.sum().item() / real, 0.15, real, what="default selection") < 0.002
    assert torch.equal(masking.zeroed, masking.selected) and (masking.source == -1).all()
    sparse = draw_region_masking(region_mask, prob=1e-6, generator=torch.Generator().manual_seed(2))
    assert sparse.selected.sum() <= 1
    for bad in (dict(zero_ratio=-0.1), dict(random_ratio=-0.1), dict(zero_ratio=0.6, random_ratio=0.5)):
        with pytest.raises(ValueError, match="zero_ratio and random_ratio"):
            draw_region_masking(region_mask, **bad)
    # no zeroing at all, every selected region replaced by another real region of its row
    swap = draw_region_masking(region_mask, prob=0.5, zero_ratio=0.0, random_ratio=1.0,
                               generator=torch.Generator().manual_seed(3))
    assert not swap.zeroed.any() and torch.equal(swap.source >= 0, swap.selected)
    rows, cols = swap.selected.nonzero(as_tuple=True)
    assert region_mask[rows, swap.source[rows, cols]].bool().all()
    assert (swap.source[~swap.selected] == -1).all()


def test_apply_region_masking_replaces_from_region_zero_and_checks_shapes():
    features = torch.arange(24.0).view(2, 3, 4)
    selected = torch.tensor([[False, True, True], [True, False, False]])
    masking = RegionMasking(selected=selected, zeroed=torch.tensor([[False, False, True], [False] * 3]),
                            source=torch.tensor([[-1, 0, -1], [2, -1, -1]]))
    out = apply_region_masking(features, masking)
    expect = features.clone()
    expect[0, 1] = features[0, 0]  # replaced by region 0 of its row
    expect[0, 2] = 0.0
    expect[1, 0] = features[1, 2]
    assert torch.equal(out, expect) and torch.equal(features, torch.arange(24.0).view(2, 3, 4))
    with pytest.raises(ValueError, match="matching the masking's"):
        apply_region_masking(features[:, :2], masking)
    with pytest.raises(ValueError, match="matching the masking's"):
        apply_region_masking(features[0], masking)


# ---------------------------------------------------------------------------------------------- heads
def test_mlm_head_tying_and_shapes(encoder):
    head = MLMHead(HIDDEN, VOCAB).tie_to(encoder.word_embeddings)
    assert head.decoder.weight is encoder.word_embeddings.weight
    hidden = torch.randn(2, 5, HIDDEN)
    logits = head(hidden)
    manual = head.transform(hidden) @ encoder.word_embeddings.weight.T + head.bias
    torch.testing.assert_close(logits, manual)
    # a larger table (extra concept ids appended) ties its first VOCAB rows
    big = torch.nn.Embedding(VOCAB + 10, HIDDEN)
    head_big = MLMHead(HIDDEN, VOCAB).tie_to(big)
    assert head_big(hidden).shape == (2, 5, VOCAB)
    with pytest.raises(ValueError):
        MLMHead(HIDDEN, VOCAB).tie_to(torch.nn.Embedding(VOCAB - 1, HIDDEN))
    logits.sum().backward()
    assert encoder.word_embeddings.weight.grad is not None


def test_vqa_and_region_heads():
    torch.manual_seed(0)
    vqa = VQAHead(HIDDEN, 7).eval()
    x = torch.randn(3, HIDDEN)
    manual = F.linear(F.layer_norm(F.gelu(F.linear(x, vqa.dense.weight, vqa.dense.bias)), (2 * HIDDEN,),
                                   vqa.LayerNorm.weight, vqa.LayerNorm.bias, eps=1e-12),
                      vqa.classifier.weight, vqa.classifier.bias)
    torch.testing.assert_close(vqa(x), manual)
    assert vqa.dense.out_features == 2 * HIDDEN
    assert VQAHead(HIDDEN, 7, intermediate_size=HIDDEN).dense.out_features == HIDDEN
    h = torch.randn(2, 5, HIDDEN)
    assert RegionFeatureRegressionHead(HIDDEN, 16)(h).shape == (2, 5, 16)
    assert RegionClassificationHead(HIDDEN, 9)(h).shape == (2, 5, 9)
    plain = RegionClassificationHead(HIDDEN, 9, transform=False)
    torch.testing.assert_close(plain(h), F.linear(h, plain.decoder.weight, plain.decoder.bias))
    assert ITMHead(HIDDEN)(x).shape == (3, 2)


def test_head_defaults_and_settings_reach_their_layers(encoder):
    """BERT's defaults (N(0, 0.02) weights, LayerNorm eps 1e-12, a transform in the region heads, a 2048-d
    feature target, no dropout in the VQA head), HF's parameter names, and every setting reaching its layer."""
    from transformers.models.bert.modeling_bert import BertLMPredictionHead

    torch.manual_seed(0)
    heads = {"mlm": MLMHead(256, 1000), "itm": ITMHead(1000), "vqa": VQAHead(256, 1000),
             "regression": RegionFeatureRegressionHead(256), "classification": RegionClassificationHead(256, 1000)}
    for name, head in heads.items():
        weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, torch.nn.Linear)])
        assert weights.std().item() == pytest.approx(0.02, rel=0.02), name
        norms = [m.eps for m in head.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert norms == ([] if name == "itm" else [1e-12]), name
    assert heads["regression"].decoder.out_features == 2048
    for name in ("regression", "classification"):
        assert isinstance(heads[name].transform, torch.nn.Module) and hasattr(heads[name].transform, "dense"), name
    assert heads["vqa"].dropout.p == 0.0 and heads["itm"].dropout.p == 0.0
    config = tiny_config(hidden_size=256, vocab_size=1000)
    # HF's names (whose decoder.bias is the same tensor as bias); the decoder has no bias of its own
    mlm_keys = set(heads["mlm"].state_dict())
    assert mlm_keys == set(BertLMPredictionHead(config).state_dict()) - {"decoder.bias"}
    assert heads["mlm"].decoder.bias is None
    # settings: activation, eps and spread reach the transform and the initialisation
    relu = MLMHead(HIDDEN, VOCAB, hidden_act="relu", layer_norm_eps=1e-5, initializer_range=0.5)
    hidden = torch.randn(2, 3, HIDDEN)
    manual = F.layer_norm(F.relu(relu.transform.dense(hidden)), (HIDDEN,), relu.transform.LayerNorm.weight,
                          relu.transform.LayerNorm.bias, eps=1e-5)
    torch.testing.assert_close(relu.transform(hidden), manual)
    assert relu.decoder.weight.std().item() == pytest.approx(0.5, rel=0.1)
    from_config = MLMHead.from_config(tiny_config(initializer_range=0.5, layer_norm_eps=1e-5))
    assert from_config.decoder.weight.std().item() == pytest.approx(0.5, rel=0.1)
    assert from_config.transform.LayerNorm.eps == 1e-5
    # a tied head needs no decoder weight from a checkpoint; a table as wide as the vocabulary is cut by rows
    tied = MLMHead(HIDDEN, VOCAB).tie_to(encoder.word_embeddings)
    state = {f"cls.predictions.{k}": v for k, v in MLMHead(HIDDEN, VOCAB).state_dict().items()
             if k != "decoder.weight"}
    tied.load_bert_state_dict(state)
    assert torch.equal(tied.bias, state["cls.predictions.bias"]) and tied.decoder.weight is encoder.word_embeddings.weight
    square = MLMHead(HIDDEN, HIDDEN).tie_to(torch.nn.Embedding(HIDDEN + 8, HIDDEN))
    assert square(hidden).shape == (2, 3, HIDDEN)


# ---------------------------------------------------------------------------------------------- losses
def test_mlm_loss_matches_manual():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 3, -100, 0], [5, -100, -100, -100]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if labels[b, t] != -100:
                row = logits[b, t].tolist()
                total += -(row[labels[b, t]] - math.log(sum(math.exp(v) for v in row)))
                count += 1
    assert mlm_loss(logits, labels).item() == pytest.approx(total / count, rel=1e-5)
    assert mlm_loss(logits, labels, reduction="sum").item() == pytest.approx(total, rel=1e-5)
    per = mlm_loss(logits, labels, reduction="none")
    assert per.shape == (2, 4) and per[0, 0] == 0
    empty = mlm_loss(logits.requires_grad_(), torch.full((2, 4), -100))
    assert empty.item() == 0.0 and empty.requires_grad


def test_itm_loss_matches_manual():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3], [0.1, 0.2]])
    labels = torch.tensor([1, 0, -100])
    weights = torch.tensor([0.5, 2.0, 1.0])
    ce = [-(logits[b, labels[b]] - torch.logsumexp(logits[b], 0)).item() for b in range(2)]
    assert itm_loss(logits, labels).item() == pytest.approx(sum(ce) / 2, rel=1e-5)
    assert itm_loss(logits, labels, weights).item() == pytest.approx((0.5 * ce[0] + 2.0 * ce[1]) / 2, rel=1e-5)


def test_vqa_loss_matches_manual():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5), torch.rand(3, 5)
    total = 0.0
    for b in range(3):
        for a in range(5):
            s = 1 / (1 + math.exp(-logits[b, a].item()))
            t = targets[b, a].item()
            total += -(t * math.log(s) + (1 - t) * math.log(1 - s))
    assert vqa_loss(logits, targets).item() == pytest.approx(total / 3, rel=1e-5)
    assert vqa_loss(logits, targets).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, targets).item() * 5, rel=1e-5)


def test_losses_reductions_masks_and_empty_batches():
    torch.manual_seed(0)
    logits = torch.randn(4, 2, requires_grad=True)
    # a custom ignore index reaches the per-sample cross-entropy
    labels = torch.tensor([1, -1, 0, 1])
    expect = F.cross_entropy(logits[[0, 2, 3]], labels[[0, 2, 3]])
    torch.testing.assert_close(itm_loss(logits, labels, ignore_index=-1), expect)
    # nothing counted: a zero that still has a graph
    for loss in (itm_loss(logits, torch.full((4,), IGNORE_INDEX)),
                 region_classification_loss(logits.view(2, 2, 2), torch.zeros(2, 2, dtype=torch.long),
                                            torch.zeros(2, 2)),
                 vqa_loss(logits[:0], torch.zeros(0, 2))):
        assert loss.item() == 0.0 and loss.requires_grad
    # VQA: per question with "none", summed with "sum"
    targets = torch.rand(4, 2)
    per_question = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    torch.testing.assert_close(vqa_loss(logits, targets, reduction="none"), per_question)
    torch.testing.assert_close(vqa_loss(logits, targets, reduction="sum"), per_question.sum())
    # region losses take a 0/1 integer selection as well as a boolean one
    predictions, features = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    selected = torch.tensor([[1, 0, 1], [0, 0, 1]])
    torch.testing.assert_close(region_feature_regression_loss(predictions, features, selected),
                               region_feature_regression_loss(predictions, features, selected.bool()))


def test_region_feature_regression_loss_matches_manual():
    torch.manual_seed(0)
    pred, tgt = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    sel = torch.tensor([[True, False, True], [False, False, True]])
    mse = sl1 = 0.0
    for b, n in sel.nonzero().tolist():
        diffs = [(pred[b, n, d] - tgt[b, n, d]).item() for d in range(4)]
        mse += sum(x * x for x in diffs) / 4
        sl1 += sum(0.5 * x * x if abs(x) < 1 else abs(x) - 0.5 for x in diffs) / 4
    assert region_feature_regression_loss(pred, tgt, sel).item() == pytest.approx(mse / 3, rel=1e-5)
    assert region_feature_regression_loss(pred, tgt, sel, kind="smooth_l1").item() == pytest.approx(sl1 / 3, rel=1e-5)
    zero = region_feature_regression_loss(pred.requires_grad_(), tgt, torch.zeros(2, 3, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad
    assert region_feature_regression_loss(pred, tgt, sel, reduction="none")[0, 1] == 0


def test_region_classification_loss_matches_manual():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    sel = torch.tensor([[True, True, False], [False, True, True]])
    labels = torch.tensor([[1, -100, 2], [0, 4, 3]])
    soft = torch.softmax(torch.randn(2, 3, 5), -1)
    soft[1, 1] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])
    weights = torch.rand(2, 3)

    def log_softmax(row):
        z = math.log(sum(math.exp(v) for v in row))
        return [v - z for v in row]

    ce, wce, kl, count = 0.0, 0.0, 0.0, 0
    for b in range(2):
        for n in range(3):
            if not sel[b, n]:
                continue
            lp = log_softmax(logits[b, n].tolist())
            kl += sum(t * (math.log(t) - l) for t, l in zip(soft[b, n].tolist(), lp) if t > 0)
            if labels[b, n] != -100:
                ce += -lp[labels[b, n]]
                wce += -lp[labels[b, n]] * weights[b, n].item()
                count += 1
    assert region_classification_loss(logits, labels, sel).item() == pytest.approx(ce / count, rel=1e-5)
    assert region_classification_loss(logits, labels, sel, weights).item() == pytest.approx(wce / count, rel=1e-5)
    assert region_classification_loss(logits, soft, sel).item() == pytest.approx(kl / sel.sum().item(), rel=1e-5)


def _descends(params, loss_fn, steps=25, lr=0.05):
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    return first, loss_fn().item()


@pytest.mark.parametrize("name", ["mlm", "itm", "vqa", "feat", "cls", "kl"])
def test_losses_decrease_under_optimisation(name):
    """A few Adam steps on a fixed tiny single-stream batch lower each loss (fresh modules per loss)."""
    torch.manual_seed(0)
    encoder = BertTextEncoder.from_config(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ids, mask, types = text_batch()
    masked, labels = mask_tokens(ids, attention_mask=mask, special_token_ids=[CLS, SEP], vocab_size=VOCAB,
                                 mask_token_id=MASK, prob=0.5, ensure_one=True,
                                 generator=torch.Generator().manual_seed(0))
    emb = RegionEmbedding(feature_dim=8, hidden_size=HIDDEN, box_dim=5, dropout=0.0)
    feats, boxes = torch.randn(2, 4, 8), torch.rand(2, 4, 5)
    masked_feats, sel = mask_regions(feats, prob=0.5, ensure_one=True, generator=torch.Generator().manual_seed(0))

    def joint():
        regions, rmask = emb(masked_feats, boxes)
        seq = encoder.encode(torch.cat([encoder.embed(masked, types), regions], 1), torch.cat([mask, rmask], 1))
        return seq[:, :8], seq[:, 8:], encoder.pool(seq)

    if name == "mlm":
        head = MLMHead.from_config(encoder.config).tie_to(encoder.word_embeddings)
        fn = lambda: mlm_loss(head(joint()[0]), labels)  # noqa: E731
    elif name == "itm":
        head = ITMHead(HIDDEN)
        fn = lambda: itm_loss(head(joint()[2]), torch.tensor([1, 0]))  # noqa: E731
    elif name == "vqa":
        head = VQAHead(HIDDEN, 6)
        answers = torch.tensor([[1.0, 0.3, 0, 0, 0, 0], [0, 0, 0, 0.6, 0, 1.0]])  # VQA-style soft scores
        fn = lambda: vqa_loss(head(joint()[2]), answers)  # noqa: E731
    elif name == "feat":
        head = RegionFeatureRegressionHead(HIDDEN, 8)
        fn = lambda: region_feature_regression_loss(head(joint()[1]), feats, sel)  # noqa: E731
    elif name == "cls":
        head = RegionClassificationHead(HIDDEN, 4)
        region_labels = torch.randint(4, (2, 4))
        fn = lambda: region_classification_loss(head(joint()[1]), region_labels, sel)  # noqa: E731
    else:
        head = RegionClassificationHead(HIDDEN, 4)
        soft = torch.softmax(2 * torch.randn(2, 4, 4), -1)
        fn = lambda: region_classification_loss(head(joint()[1]), soft, sel)  # noqa: E731
    params = {id(p): p for m in (encoder, emb, head) for p in m.parameters()}
    first, last = _descends(list(params.values()), fn, steps=20, lr=0.01)
    assert last < 0.8 * first, (name, first, last)


def test_head_loading_errors_and_a_larger_checkpoint_vocabulary(tmp_path):
    """A checkpoint whose vocabulary is larger than the head's (BERT's 30,522 rows for a smaller head)
    gives its first rows to the bias and an untied decoder, and nothing else is cut (the transform's
    rows stay whole even where H > vocabulary); a missing key is named with what the prefix holds; a
    checkpoint lacking its heads (or with the NSP head of another width) is refused; overrides reach
    the loader."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    full = BertForPreTraining(tiny_config(vocab_size=24, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        full.cls.predictions.bias.normal_()
    full.save_pretrained(tmp_path / "ckpt")
    state = bert_pretraining_head_state(str(tmp_path / "ckpt"))
    head = MLMHead(HIDDEN, 20)  # H = 32 > 20 rows
    head.load_bert_state_dict(state)
    assert torch.equal(head.bias, state["cls.predictions.bias"][:20])
    assert torch.equal(head.decoder.weight, state["cls.predictions.decoder.weight"][:20])
    assert torch.equal(head.transform.dense.weight, state["cls.predictions.transform.dense.weight"])
    with pytest.raises(ValueError, match=r"cls.predictions.bias: checkpoint shape \(24,\) != \(30,\)"):
        MLMHead(HIDDEN, 30).load_bert_state_dict(state)
    partial = {k: v for k, v in state.items() if k != "cls.predictions.bias"}
    with pytest.raises(KeyError, match=r"lacks \['cls.predictions.bias'\].*cls.predictions.transform.dense.bias"):
        head.load_bert_state_dict(partial)
    with pytest.raises(ValueError, match=r"NSP head shape \(2, 32\) != ITM head \(3, 32\)"):
        ITMHead(HIDDEN, num_labels=3).load_nsp_state_dict(state)
    # overrides go to the loader: another vocabulary size no longer fits the checkpoint
    with pytest.raises(Exception, match="size mismatch|shape"):
        bert_pretraining_head_state(str(tmp_path / "ckpt"), vocab_size=30)
    # a missing encoder key is the encoder's business (the heads are whole); a missing head key is refused
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("bert.pooler.")},
              str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    assert set(bert_pretraining_head_state(str(tmp_path / "ckpt"))) == set(state)
    save_file({k: v for k, v in weights.items() if k != "cls.predictions.decoder.weight"},
              str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no BERT pre-training heads.*decoder.weight"):
        bert_pretraining_head_state(str(tmp_path / "ckpt"))


def test_forward_passes_token_types_and_positions_and_optional_pooler(tmp_path, encoder):
    ids, mask, _ = text_batch()
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]])
    positions = torch.tensor([[5, 4, 3, 2, 1, 0, 0, 0], [9, 8, 7, 6, 0, 0, 0, 0]])
    seq, pooled = encoder(ids, mask, types, position_ids=positions)
    ref = encoder.bert(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
    torch.testing.assert_close(seq, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seq, encoder(ids, mask)[0])  # the types and positions did matter
    bare = BertTextEncoder.from_config(tiny_config(), add_pooling_layer=False)
    assert bare.pooler is None and bare(ids, mask)[1] is None
    encoder.bert.save_pretrained(tmp_path / "bert")
    assert BertTextEncoder.from_name(str(tmp_path / "bert"), add_pooling_layer=False).pooler is None
    assert BertTextEncoder.from_name(str(tmp_path / "bert")).pooler is not None


@pytest.mark.parametrize("name,is_path", [
    ("/abs/bert", True), ("./bert", True), ("../bert", True), ("~/bert", True), (".\\bert", True),
    ("..\\bert", True), ("bert-base-uncased", False), ("org/bert", False),
])
def test_what_counts_as_a_local_path(name, is_path, tmp_path, monkeypatch):
    """Paths (absolute, ./, ../, ~, and their Windows forms) are checkpoint directories; other names are
    hub ids unless such a folder exists here."""
    from mmf_multilevel.modules.text import _looks_like_path

    monkeypatch.chdir(tmp_path)
    assert _looks_like_path(name) is is_path
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "bert").mkdir()
    assert _looks_like_path("org/bert")


def test_box_only_embedding_needs_the_sum_style_with_boxes_and_accepts_half_boxes():
    emb = RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=5, style="sum").eval()
    boxes = torch.rand(2, 3, 5)
    torch.testing.assert_close(emb.embed_boxes(boxes.half()), emb.embed_boxes(boxes.half().float()))
    for other in (RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=5, style="concat"),
                  RegionEmbedding(feature_dim=16, hidden_size=HIDDEN, box_dim=0, style="sum")):
        with pytest.raises(RuntimeError, match="embed_boxes needs style='sum' with box_dim > 0"):
            other.embed_boxes(boxes)


def test_mask_regions_does_not_force_a_region_by_default():
    """``ensure_one`` is off unless asked: at a tiny rate most samples mask nothing."""
    g = torch.Generator().manual_seed(0)
    _, selected = mask_regions(torch.randn(64, 4, 3), prob=1e-4, generator=g)
    assert selected.sum() <= 1
    _, forced = mask_regions(torch.randn(64, 4, 3), prob=1e-4, generator=g, ensure_one=True)
    assert (forced.sum(1) == 1).all()
