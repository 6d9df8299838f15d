"""MVPTR network (mmf_multilevel/methods/mvptr/network.py): stage shapes, the shared concept table and its
initialisation, regions without position embedding, padding masks, the BERT split, and the base-size
parameter count, on tiny random BERTs (CPU)."""

import math

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from helpers.heads import assert_bert_transform
from mmf_multilevel.methods.mvptr.network import (
    MVPTRNetwork,
    base_config,
    base_counts,
    embedding_rows,
    parameter_count,
)
from mmf_multilevel.methods.mvptr.pretraining import MVPTRPretrainingHeads

VOCAB, HIDDEN, LAYERS = 40, 32, 4
T, TAGS, K = 40, 20, 50  # 35 + 5 text slots, 20 tag slots, 50 regions
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
CONCEPT_ROWS = VOCAB + 6
BASE_NETWORK = 197_413_633  # documented in network.py and README.md

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "man", "young", "ride", "on", "top", "of", "horse", "hot",
         "dog", "##s", "kitchen", "fill", "with"]
WORDS += [f"w{i}" for i in range(VOCAB - len(WORDS))]
ID = {w: i for i, w in enumerate(WORDS)}


def tiny_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def tiny_network(seed=0, **kw):
    torch.manual_seed(seed)
    return MVPTRNetwork(tiny_config(), CONCEPT_ROWS, **kw).eval()


def inputs(seed=1, bsz=3):
    """Texts of 12/9/6 real slots (tokens then concept ids), tags of 6/4/3, regions 50/30/7."""
    g = torch.Generator().manual_seed(seed)
    text_len, tag_len, regions = [12, 9, 6][:bsz], [6, 4, 3][:bsz], [K, 30, 7][:bsz]
    ids = torch.randint(5, CONCEPT_ROWS, (bsz, T), generator=g)
    text_mask = (torch.arange(T) < torch.tensor(text_len)[:, None]).long()
    tag_ids = torch.randint(5, VOCAB, (bsz, TAGS), generator=g)
    tag_mask = (torch.arange(TAGS) < torch.tensor(tag_len)[:, None]).long()
    for b in range(bsz):
        ids[b, 0], ids[b, text_len[b] - 1], tag_ids[b, 0], tag_ids[b, tag_len[b] - 1] = CLS, SEP, CLS, SEP
    ids, tag_ids = ids * text_mask, tag_ids * tag_mask
    feats = torch.rand(bsz, K, 2048, generator=g)
    boxes = torch.rand(bsz, K, 6, generator=g)
    region_mask = (torch.arange(K) < torch.tensor(regions)[:, None]).long()
    return dict(ids=ids, text_mask=text_mask, tag_ids=tag_ids, tag_mask=tag_mask, feats=feats, boxes=boxes,
                region_mask=region_mask)


def encode(net, x):
    text = net.encode_text(x["ids"], x["text_mask"])
    visual, visual_mask = net.encode_visual(x["tag_ids"], x["tag_mask"], x["feats"], x["boxes"], x["region_mask"])
    return text, visual, visual_mask


@torch.no_grad()
def test_stage_shapes_and_joint_layout():
    net, x = tiny_network(), inputs()
    text, visual, visual_mask = encode(net, x)
    assert text.shape == (3, T, HIDDEN) and visual.shape == (3, TAGS + K, HIDDEN)
    assert torch.equal(visual_mask, torch.cat([x["tag_mask"], x["region_mask"]], 1))
    states, pooled, mask = net.fuse(text, x["text_mask"], visual, visual_mask)
    assert states.shape == (3, T + K, HIDDEN) and pooled.shape == (3, HIDDEN)
    assert torch.equal(mask, torch.cat([x["text_mask"], x["region_mask"]], 1))
    # the visual [CLS] and the tags are dropped: replacing them changes nothing
    scrambled = visual.clone()
    scrambled[:, :TAGS] = torch.randn(3, TAGS, HIDDEN)
    assert torch.equal(net.fuse(text, x["text_mask"], scrambled, visual_mask)[0], states)
    # the pooler reads the text [CLS] (position 0)
    pool = net.bert.pooler.dense
    assert torch.allclose(pooled, torch.tanh(pool(states[:, 0])), atol=1e-6)
    g_t, g_v = net.global_embeddings(text, visual)
    assert torch.allclose(g_t.norm(dim=-1), torch.ones(3)) and torch.allclose(g_v.norm(dim=-1), torch.ones(3))
    assert math.isclose(net.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


@torch.no_grad()
def test_fuse_pairs_by_index_without_reencoding():
    net, x = tiny_network(), inputs()
    text, visual, visual_mask = encode(net, x)
    ti, ii = torch.tensor([0, 1, 2, 2, 0]), torch.tensor([1, 1, 0, 2, 2])
    states, pooled, mask = net.fuse(text, x["text_mask"], visual, visual_mask, text_index=ti, image_index=ii)
    ref_states, ref_pooled, ref_mask = net.fuse(text[ti], x["text_mask"][ti], visual[ii], visual_mask[ii])
    assert states.shape == (5, T + K, HIDDEN)
    assert torch.allclose(states, ref_states, atol=1e-6) and torch.allclose(pooled, ref_pooled, atol=1e-6)
    assert torch.equal(mask, ref_mask)
    with pytest.raises(ValueError, match="text_index"):
        net.fuse(text[:2], x["text_mask"][:2], visual, visual_mask)


@torch.no_grad()
def test_regions_have_no_position_embedding():
    """Permuting the regions (with boxes and mask) permutes their outputs equally, and the tags' and the
    fused text's outputs do not change: attention is order-free over position-less inputs."""
    net, x = tiny_network(), inputs()
    text, visual, visual_mask = encode(net, x)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    y = dict(x, feats=x["feats"][:, perm], boxes=x["boxes"][:, perm], region_mask=x["region_mask"][:, perm])
    _, visual_p, visual_mask_p = encode(net, y)
    assert torch.allclose(visual_p[:, TAGS:], visual[:, TAGS:][:, perm], atol=1e-5)
    assert torch.allclose(visual_p[:, :TAGS], visual[:, :TAGS], atol=1e-5)
    fused = net.fuse(text, x["text_mask"], visual, visual_mask)[0]
    fused_p = net.fuse(text, x["text_mask"], visual_p, visual_mask_p)[0]
    assert torch.allclose(fused_p[:, :T], fused[:, :T], atol=1e-5)
    assert torch.allclose(fused_p[:, T:], fused[:, T:][:, perm], atol=1e-5)
    # a region's embedding is Linear([f ; box]) alone (no LayerNorm in pre-training)
    proj = net.region_embedding.proj
    assert net.region_embedding.norm is None
    assert torch.allclose(net.embed_regions(x["feats"], x["boxes"]),
                          torch.cat([x["feats"], x["boxes"]], -1) @ proj.weight.T + proj.bias, atol=1e-5)


@torch.no_grad()
def test_padding_is_not_seen_by_real_positions():
    net, x = tiny_network(), inputs()
    text, visual, visual_mask = encode(net, x)
    fused = net.fuse(text, x["text_mask"], visual, visual_mask)[0]
    g = torch.Generator().manual_seed(9)
    y = dict(x)
    y["ids"] = torch.where(x["text_mask"].bool(), x["ids"], torch.randint(5, CONCEPT_ROWS, x["ids"].shape, generator=g))
    y["tag_ids"] = torch.where(x["tag_mask"].bool(), x["tag_ids"], torch.randint(5, VOCAB, x["tag_ids"].shape, generator=g))
    pad = ~x["region_mask"].bool()[..., None]
    y["feats"] = torch.where(pad, torch.rand(x["feats"].shape, generator=g) * 5, x["feats"])
    y["boxes"] = torch.where(pad, torch.rand(x["boxes"].shape, generator=g), x["boxes"])
    text_y, visual_y, _ = encode(net, y)
    fused_y = net.fuse(text_y, x["text_mask"], visual_y, visual_mask)[0]
    real_text = x["text_mask"].bool()
    real_visual = visual_mask.bool()
    real_joint = torch.cat([x["text_mask"], x["region_mask"]], 1).bool()
    assert not torch.allclose(text_y, text) and not torch.allclose(visual_y, visual)  # the pads did change
    assert torch.allclose(text_y[real_text], text[real_text], atol=1e-5)
    assert torch.allclose(visual_y[real_visual], visual[real_visual], atol=1e-5)
    assert torch.allclose(fused_y[real_joint], fused[real_joint], atol=1e-5)


def write_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return BertTokenizer(str(path), do_lower_case=True)


def test_concept_rows_are_the_mean_of_all_their_word_pieces(tmp_path):
    tokenizer = write_vocab(tmp_path)
    id2phrase = {str(ID["man"]): ["man"], "40": ["man", "young"], "41": ["man", "ride on top of", "horse"],
                 "43": ["hot dogs"], "45": ["kitchen", "fill with", "man"]}
    assert embedding_rows(id2phrase, VOCAB) == 46 == CONCEPT_ROWS  # ids need not be contiguous
    net = tiny_network()
    before = net.word_embeddings.weight.detach().clone()
    assert net.init_concept_embeddings(id2phrase, tokenizer) == 4
    table = net.word_embeddings.weight.detach()
    pieces = {40: ["man", "young"], 41: ["man", "ride", "on", "top", "of", "horse"], 43: ["hot", "dog", "##s"],
              45: ["kitchen", "fill", "with", "man"]}
    for index, words in pieces.items():
        expected = torch.stack([before[ID[w]] for w in words]).mean(0)
        assert torch.allclose(table[index], expected, atol=1e-6), index
    untouched = [i for i in range(CONCEPT_ROWS) if i not in pieces]
    assert torch.equal(table[untouched], before[untouched])  # BERT rows, reused ids, unused concept rows
    # a callable tokenizer works too; concept ids must fit the table
    assert net.init_concept_embeddings({"44": ["w0"]}, lambda s: [ID[w] for w in s.split()]) == 1
    with pytest.raises(ValueError, match="num_embeddings"):
        net.init_concept_embeddings({"46": ["man", "young"]}, tokenizer)


def save_tiny_bert(tmp_path, seed=4):
    torch.manual_seed(seed)
    bert = BertModel(tiny_config()).eval()
    bert.save_pretrained(tmp_path / "bert")
    return BertModel.from_pretrained(tmp_path / "bert", attn_implementation="eager").eval()


@torch.no_grad()
def test_from_bert_splits_layers_into_the_three_encoders(tmp_path):
    """Text encoder = BERT layers 1-2 (of 4), visual encoder = a separate copy of 1-2, multimodal = 3-4,
    each checked against Hugging Face's own forward pass."""
    hf = save_tiny_bert(tmp_path)
    tokenizer = write_vocab(tmp_path)
    id2phrase = {"40": ["man", "young"], "45": ["hot", "dog"]}
    net = MVPTRNetwork.from_bert(str(tmp_path / "bert"), id2phrase=id2phrase, tokenizer=tokenizer).eval()
    assert net.num_embeddings == 46 and net.stage_layers == 2
    words = hf.embeddings.word_embeddings.weight
    assert torch.equal(net.word_embeddings.weight[:VOCAB], words)
    assert torch.allclose(net.word_embeddings.weight[45], (words[ID["hot"]] + words[ID["dog"]]) / 2, atol=1e-6)

    x = inputs()
    ids = x["ids"].clamp(max=VOCAB - 1)  # HF's table has only the word rows
    hidden = hf(ids, attention_mask=x["text_mask"], output_hidden_states=True)
    text = net.encode_text(ids, x["text_mask"])
    assert torch.allclose(text, hidden.hidden_states[2], atol=1e-5)
    # multimodal layers = BERT layers 3-4 on the same states (regions all masked: the text cannot see them)
    visual, visual_mask = net.encode_visual(x["tag_ids"], x["tag_mask"], x["feats"], x["boxes"],
                                            torch.zeros_like(x["region_mask"]))
    states, pooled, _ = net.fuse(hidden.hidden_states[2], x["text_mask"], visual, visual_mask)
    real = x["text_mask"].bool()
    assert torch.allclose(states[:, :T][real], hidden.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(pooled, hidden.pooler_output, atol=1e-5)
    # visual encoder = BERT layers 1-2 over the tags (token type 1) when no region is real
    tags = hf(x["tag_ids"], attention_mask=x["tag_mask"], token_type_ids=torch.ones_like(x["tag_ids"]),
              output_hidden_states=True).hidden_states[2]
    assert torch.allclose(visual[:, :TAGS][x["tag_mask"].bool()], tags[x["tag_mask"].bool()], atol=1e-5)
    # two separate copies: changing the visual encoder leaves the text encoder alone
    for vis, txt in zip(net.visual_layers.parameters(), net.text_layers.parameters()):
        assert vis.data_ptr() != txt.data_ptr() and torch.equal(vis, txt)
    net.visual_layers[0].attention.self.query.weight.add_(1.0)
    assert torch.allclose(net.encode_text(ids, x["text_mask"]), text, atol=1e-6)
    assert not torch.allclose(net.visual_layers[0].attention.self.query.weight, net.text_layers[0].attention.self.query.weight)


def test_random_build_has_independent_visual_layers_and_errors_name_the_keys():
    net = tiny_network()
    assert not torch.equal(net.visual_layers[0].attention.self.query.weight, net.text_layers[0].attention.self.query.weight)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        MVPTRNetwork(tiny_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match="num_embeddings"):
        MVPTRNetwork(tiny_config(), VOCAB - 1)
    x = inputs()
    with pytest.raises(ValueError, match="num_tag_slots"):
        net.encode_visual(x["tag_ids"][:, :10], x["tag_mask"][:, :10], x["feats"], x["boxes"], x["region_mask"])


def test_base_size_parameter_count():
    counts = base_counts()
    assert counts["word_table"] == 86_051 * 768
    assert counts["text_encoder"] == counts["visual_encoder"] == counts["multimodal_encoder"] == 6 * 7_087_872
    assert counts["region_embedding"] == 2054 * 768 + 768
    assert counts["network"] == BASE_NETWORK


def test_mlm_and_mcr_decoders_are_tied_to_the_word_rows_only():
    net = tiny_network()
    heads = MVPTRPretrainingHeads(net)
    table = net.word_embeddings.weight
    assert heads.mlm.decoder.weight is table and heads.mcr.decoder.weight is table  # same storage, not a copy
    assert heads.mlm.transform.dense.weight is not heads.mcr.transform.dense.weight
    states = torch.randn(5, HIDDEN)
    for head, logits in ((heads.mlm, heads.mlm_logits(states)), (heads.mcr, heads.mcr_logits(states))):
        assert logits.shape == (5, VOCAB)  # the concept rows are never predicted
        assert torch.allclose(logits, head.transform(states) @ table[:VOCAB].T + head.bias, atol=1e-5)
    assert heads.itm_logits(torch.randn(4, HIDDEN)).shape == (4, 2)
    with torch.no_grad():
        table[7].add_(1.0)  # training the table moves the decoders with it
    assert torch.equal(heads.mlm.decoder.weight[7], table[7])


def test_heads_follow_the_network_config():
    """The MLM / MCR transforms take the config's activation, LayerNorm eps and initializer range; the ITM
    classifier its initializer range (mmf_multilevel.modules.heads, as BERT's heads)."""
    torch.manual_seed(0)
    net = MVPTRNetwork(tiny_config(hidden_act="relu", layer_norm_eps=1e-6, initializer_range=0.5), CONCEPT_ROWS)
    heads = MVPTRPretrainingHeads(net)
    for head in (heads.mlm, heads.mcr):
        assert_bert_transform(head.transform, torch.nn.ReLU, eps=1e-6, std=0.5, rel=0.2)
        assert head.bias.shape == (VOCAB,)
    assert heads.itm.classifier.weight.shape == (2, HIDDEN)
    assert heads.itm.classifier.weight.std().item() == pytest.approx(0.5, rel=0.4)  # 64 draws


def test_base_size_parameter_count_with_heads():
    with torch.device("meta"):
        net = MVPTRNetwork(base_config(), 86_051)
        both = torch.nn.ModuleDict(dict(network=net, heads=MVPTRPretrainingHeads(net)))
    head_only = 2 * (768 * 768 + 768 + 2 * 768 + 30_522) + (768 * 2 + 2)
    assert parameter_count(both) == BASE_NETWORK + head_only == 198_660_471


@torch.no_grad()
def test_the_text_encoder_reads_token_types_positions_and_every_concept_row():
    """Token types and position ids reach the text embedding (the defaults are type 0 and 0..T-1); the
    last concept row is a valid id and one past it is refused."""
    net = tiny_network()
    x = inputs()
    plain = net.encode_text(x["ids"], x["text_mask"])
    defaults = net.encode_text(x["ids"], x["text_mask"], torch.zeros_like(x["ids"]),
                               torch.arange(T).expand_as(x["ids"]))
    torch.testing.assert_close(plain, defaults)
    typed = net.encode_text(x["ids"], x["text_mask"], token_type_ids=torch.ones_like(x["ids"]))
    moved = net.encode_text(x["ids"], x["text_mask"], position_ids=torch.arange(1, T + 1).expand_as(x["ids"]))
    assert not torch.allclose(typed, plain) and not torch.allclose(moved, plain)
    last = x["ids"].clone()
    last[0, 1] = CONCEPT_ROWS - 1
    net.encode_text(last, x["text_mask"])
    last[0, 1] = CONCEPT_ROWS
    with pytest.raises(ValueError, match=f"input_ids hold id {CONCEPT_ROWS} >= num_embeddings = {CONCEPT_ROWS}"):
        net.encode_text(last, x["text_mask"])


@torch.no_grad()
def test_a_misshapen_mask_is_refused_by_its_argument_name():
    net, x = tiny_network(), inputs()
    text, visual, visual_mask = encode(net, x)
    with pytest.raises(ValueError, match=rf"^attention_mask must be \(3, {T}\); got \(3, {T - 1}\)"):
        net.encode_text(x["ids"], x["text_mask"][:, 1:])
    with pytest.raises(ValueError, match=rf"^text_mask must be \(3, {T}\)"):
        net.fuse(text, x["text_mask"][:, 1:], visual, visual_mask)
    with pytest.raises(ValueError, match=r"^visual_mask must be \(3, "):
        net.fuse(text, x["text_mask"], visual, visual_mask[:, 1:])


def word_level_tokenizer():
    """A ``tokenizers.Tokenizer`` over WORDS that adds [CLS] / [SEP] unless told not to."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(dict(ID), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS),
                                                                                                ("[SEP]", SEP)])
    return tok


@pytest.mark.parametrize("kind", ["tokenizers", "hf_fast"])
def test_concept_rows_from_a_tokenizers_tokenizer_leave_out_the_special_tokens(kind):
    from transformers import PreTrainedTokenizerFast

    tok = word_level_tokenizer()
    assert tok.encode("man young").ids == [CLS, ID["man"], ID["young"], SEP]  # the specials would be averaged in
    if kind == "hf_fast":
        tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    net = tiny_network()
    before = net.word_embeddings.weight.detach().clone()
    assert net.init_concept_embeddings({"40": ["man young"], "41": ["ride", "horse"]}, tok) == 2
    table = net.word_embeddings.weight.detach()
    assert torch.allclose(table[40], (before[ID["man"]] + before[ID["young"]]) / 2, atol=1e-6)
    assert torch.allclose(table[41], (before[ID["ride"]] + before[ID["horse"]]) / 2, atol=1e-6)
    with pytest.raises(TypeError, match="tokenizer must be"):
        net.init_concept_embeddings({"40": ["man"]}, "not a tokenizer")


def test_concept_vocabularies_as_pairs_and_malformed_phrases():
    pairs = [(40, ("man", "young")), ("44", ["horse"])]
    assert embedding_rows(pairs, VOCAB) == 45
    net = tiny_network()
    assert net.init_concept_embeddings(pairs, lambda s: [ID[w] for w in s.split()]) == 2
    for phrase in ["man", (), ("man", ""), ("man", 3)]:
        with pytest.raises(ValueError, match=r"id2phrase\[40\] must be a non-empty tuple of non-empty strings"):
            embedding_rows({"40": phrase}, VOCAB)
    with pytest.raises(ValueError, match="concept id 'x' is not an integer"):
        embedding_rows({"x": ["man"]}, VOCAB)


def test_constructor_defaults_and_bounds():
    net = MVPTRNetwork(tiny_config())
    assert net.num_embeddings == VOCAB == net.word_embeddings.num_embeddings  # no concept rows by default
    assert MVPTRNetwork(tiny_config(), VOCAB).num_embeddings == VOCAB  # the bound admits vocab_size itself
    assert net.num_tag_slots == TAGS and net.bert.pooler is not None
    assert MVPTRNetwork(tiny_config(), num_tag_slots=1).num_tag_slots == 1  # the visual [CLS] alone
    with pytest.raises(ValueError, match="num_tag_slots must be >= 1"):
        MVPTRNetwork(tiny_config(), num_tag_slots=0)


def test_region_embedding_and_vsc_projection_settings():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, hidden_dropout_prob=0.3, layer_norm_eps=1e-7, initializer_range=0.5,
                         intermediate_size=64)
    net = MVPTRNetwork(config, img_layer_norm=True)
    embedding = net.region_embedding
    norms = [m for m in embedding.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 1 and norms[0].eps == 1e-7
    assert [m.p for m in embedding.modules() if isinstance(m, torch.nn.Dropout)] == [0.3]
    linear = [m for m in embedding.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 1 and linear[0].weight.std().item() == pytest.approx(0.5, rel=0.05)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in MVPTRNetwork(config).region_embedding.modules())
    # the VSC projections start at H^-0.5 * N(0, 1) (64 x 64 draws: the spread within a few per cent)
    for proj in (net.txt_proj, net.vis_proj):
        assert proj.std().item() == pytest.approx(64 ** -0.5, rel=0.05)
        assert proj.mean().abs().item() < 0.01
    assert net.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_base_size_counts_add_up_to_the_network():
    counts = base_counts()
    parts = [name for name in counts if name != "network"]
    assert sorted(parts) == sorted(["word_table", "embeddings_other", "text_encoder", "visual_encoder",
                                    "multimodal_encoder", "pooler", "region_embedding", "vsc"])
    assert sum(counts[name] for name in parts) == counts["network"]
    assert counts["vsc"] == 2 * 768 * 768 + 1
    assert counts["pooler"] == 768 * 768 + 768
    assert counts["embeddings_other"] == (512 + 2) * 768 + 2 * 768  # positions, token types, LayerNorm


@torch.no_grad()
def test_half_precision_network_and_global_embeddings():
    """A network cast to bfloat16 (no autocast): its attention masks follow the states' dtype, and the VSC
    projections follow the states they multiply."""
    net, x = tiny_network(), inputs()
    text, visual, _ = encode(net, x)
    g_t, g_v = net.global_embeddings(text, visual)
    assert torch.allclose(g_t, torch.nn.functional.normalize(text[:, 0] @ net.txt_proj, dim=-1), atol=1e-6)
    assert torch.allclose(g_v, torch.nn.functional.normalize(visual[:, 0] @ net.vis_proj, dim=-1), atol=1e-6)
    low = net.to(torch.bfloat16)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}
    text16, visual16, mask16 = encode(low, half)
    assert text16.dtype == visual16.dtype == torch.bfloat16
    assert torch.allclose(text16.float(), text, atol=0.1)
    states, pooled, _ = low.fuse(text16, x["text_mask"], visual16, mask16)
    assert states.dtype == pooled.dtype == torch.bfloat16
    # float32 projections on bfloat16 states (a float32 network's outputs under bfloat16 autocast)
    net32 = tiny_network()
    b_t, b_v = net32.global_embeddings(text.to(torch.bfloat16), visual.to(torch.bfloat16))
    assert b_t.dtype == b_v.dtype == torch.float32
    assert torch.allclose(b_t, g_t, atol=0.05) and torch.allclose(b_v, g_v, atol=0.05)


@torch.no_grad()
def test_fuse_refuses_visual_states_without_regions_and_unpaired_batches():
    net, x = tiny_network(), inputs()
    text, visual, visual_mask = encode(net, x)
    with pytest.raises(ValueError, match=f"visual_states has {TAGS} positions"):
        net.fuse(text, x["text_mask"], visual[:, :TAGS], visual_mask[:, :TAGS])  # tags only, no region
    with pytest.raises(ValueError, match="3 texts and 2 images: pass text_index and image_index"):
        net.fuse(text, x["text_mask"], visual[:2], visual_mask[:2])
    # one index is enough when it pairs the batches: 3 texts on images 0, 1, 1; texts 0, 2 on 2 images
    states, _, _ = net.fuse(text, x["text_mask"], visual[:2], visual_mask[:2], image_index=torch.tensor([0, 1, 1]))
    full, _, _ = net.fuse(text, x["text_mask"], visual, visual_mask, image_index=torch.tensor([0, 1, 1]))
    assert torch.allclose(states, full, atol=1e-6)
    states, _, _ = net.fuse(text, x["text_mask"], visual[:2], visual_mask[:2], text_index=torch.tensor([0, 2]))
    full, _, _ = net.fuse(text, x["text_mask"], visual, visual_mask, text_index=torch.tensor([0, 2]),
                          image_index=torch.tensor([0, 1]))
    assert torch.allclose(states, full, atol=1e-6)


@torch.no_grad()
def test_from_bert_options(tmp_path):
    """From a BertTextEncoder, without concept vocabulary, with a larger table than the concepts need, with
    concepts but no tokenizer (their rows keep the random init), with constructor options, and from a BERT
    without pooler; a BERT whose weights do not fit is refused."""
    from mmf_multilevel.modules.text import BertTextEncoder

    hf = save_tiny_bert(tmp_path)
    words = hf.embeddings.word_embeddings.weight
    net = MVPTRNetwork.from_bert(BertTextEncoder(hf))
    assert net.num_embeddings == VOCAB and torch.equal(net.word_embeddings.weight, words)
    assert torch.equal(net.bert.pooler.dense.weight, hf.pooler.dense.weight)
    net = MVPTRNetwork.from_bert(hf, num_embeddings=50, id2phrase={"40": ["man"]})
    assert net.num_embeddings == 50
    torch.manual_seed(7)
    net = MVPTRNetwork.from_bert(hf, id2phrase={"40": ["man"], "41": ["horse"]}, num_tag_slots=5, img_layer_norm=True)
    assert net.num_embeddings == 42 and net.num_tag_slots == 5
    assert not torch.allclose(net.word_embeddings.weight[40], words[ID["man"]])  # no tokenizer: random init
    assert any(isinstance(m, torch.nn.LayerNorm) for m in net.region_embedding.modules())
    torch.manual_seed(4)
    poolless = BertModel(tiny_config(), add_pooling_layer=False)
    net = MVPTRNetwork.from_bert(poolless)
    assert torch.equal(net.word_embeddings.weight, poolless.embeddings.word_embeddings.weight)
    assert net.bert.pooler is not None  # BERT's random init
    extra = BertModel(tiny_config())
    extra.register_buffer("stray", torch.zeros(1))
    with pytest.raises(ValueError, match=r"BERT weights do not fit: missing \[\], unexpected \['stray'\]"):
        MVPTRNetwork.from_bert(extra)
    with pytest.raises(TypeError, match="bert must be"):
        MVPTRNetwork.from_bert(hf.encoder)


def test_a_misshapen_visual_mask_is_refused_by_its_argument_name():
    net, x = tiny_network(), inputs()
    with pytest.raises(ValueError, match=rf"^tag_mask must be \(3, {TAGS}\); got \(3, {TAGS - 1}\)"):
        net.encode_visual(x["tag_ids"], x["tag_mask"][:, 1:], x["feats"], x["boxes"], x["region_mask"])
    with pytest.raises(ValueError, match=rf"^region_mask must be \(3, {K}\); got \(2, {K}\)"):
        net.encode_visual(x["tag_ids"], x["tag_mask"], x["feats"], x["boxes"], x["region_mask"][:2])
