"""VisualBERT weights (MMF's visual_bert, HF transformers' VisualBertModel) converted into the μ-VLA
backbone give the source model's hidden states on the same input (embedding_style: visual_bert), and start
the box styles (paper, released) with the box / tag parameters initialised and reported as new."""
import copy

import mmf  # noqa: F401  (applies the compatibility layer)
import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, VisualBertConfig, VisualBertModel

from mmf_multilevel.methods.muvla.checkpoints import convert_visual_bert_state, load_visual_bert
from mmf_multilevel.methods.muvla.model import MuVLA
from mmf_multilevel.methods.muvla.network import MuVLANetwork
from mmf_multilevel.modules.text import BertTextEncoder

SIZES = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FEAT, B, T, N = 24, 3, 7, 5


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    feats = torch.randn(B, N, FEAT, generator=g)
    rmask = torch.ones(B, N, dtype=torch.long)
    rmask[2, 3:] = 0
    return ids, mask, feats, rmask


def ours():
    torch.manual_seed(9)
    return MuVLANetwork(BertTextEncoder.from_config(BertConfig(**SIZES)), FEAT, "visual_bert").eval()


def test_hf_visual_bert_converts_to_the_same_hidden_states():
    torch.manual_seed(1)
    source = VisualBertModel(VisualBertConfig(visual_embedding_dim=FEAT, **SIZES)).eval()
    net = ours()
    load_visual_bert(net, source.state_dict())
    ids, mask, feats, rmask = inputs()
    with torch.no_grad():
        ref = source(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), visual_embeds=feats,
                     visual_attention_mask=rmask, visual_token_type_ids=torch.ones(B, N, dtype=torch.long))
        out = net(ids, mask, feats, torch.zeros(B, N, 5), rmask)
    torch.testing.assert_close(out["sequence"], ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pooled"], ref.pooler_output, atol=1e-5, rtol=0)


def mmf_visual_bert():
    from mmf.models.visual_bert import VisualBERTBase
    from transformers import BertConfig as Config

    torch.manual_seed(2)
    return VisualBERTBase(Config(**SIZES), visual_embedding_dim=FEAT).eval()


def test_mmf_visual_bert_checkpoint_converts_to_the_same_hidden_states(tmp_path):
    source = mmf_visual_bert()
    ids, mask, feats, rmask = inputs()
    with torch.no_grad():
        sequence, pooled = source(ids, torch.cat([mask, rmask], 1), torch.zeros_like(ids), feats,
                                  visual_embeddings_type=torch.ones(B, N, dtype=torch.long))[:2]
    # as an MMF model checkpoint stores it (VisualBERT.model.bert.*, with heads beside it)
    state = {f"model.bert.{k}": v for k, v in source.state_dict().items()}
    state["model.classifier.1.weight"] = torch.zeros(3, 3)
    converted = convert_visual_bert_state(state)
    assert "regions.proj.weight" in converted and not any("classifier" in k for k in converted)
    net = ours()
    load_visual_bert(net, state)
    with torch.no_grad():
        out = net(ids, mask, feats, torch.zeros(B, N, 5), rmask)
    torch.testing.assert_close(out["sequence"], sequence, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pooled"], pooled, atol=1e-5, rtol=0)

    # the registered model loads the file through model_config.muvla.visual_bert_checkpoint
    model, _ = model_from_file(tmp_path, state, "visual_bert")
    torch.testing.assert_close(model.backbone.regions.proj.weight, source.embeddings.projection.weight)


def model_from_file(tmp_path, state, style):
    """The registered model built with ``model_config.muvla.visual_bert_checkpoint`` = ``state`` saved to a file."""
    path = tmp_path / "visual_bert.pth"
    torch.save({"model": state}, path)
    base = OmegaConf.load(MuVLA.config_path()).model_config.muvla
    config = OmegaConf.merge(base, dict(bert_model_name=None, embedding_style=style, feature_dim=FEAT,
                                        visual_bert_checkpoint=str(path), training_head_type="refcoco", **SIZES))
    model = MuVLA(config)
    model.build()
    return model, path


def test_visual_bert_weights_need_matching_sizes():
    source = mmf_visual_bert()
    state = {f"model.bert.{k}": v for k, v in source.state_dict().items()}
    torch.manual_seed(0)
    wider = MuVLANetwork(BertTextEncoder.from_config(BertConfig(**SIZES)), FEAT + 1, "visual_bert")
    with pytest.raises(ValueError, match="regions.proj.weight"):
        load_visual_bert(wider, state)
    with pytest.raises(KeyError, match="not a VisualBERT state dict"):
        convert_visual_bert_state({"foo": torch.zeros(1)})


# ---------------------------------------------------------------- the box styles (paper, released)
#: what each box style has and VisualBERT does not (kept at the network's initialisation, reported as new)
NEW = {
    "paper": ["regions.feature_norm.weight", "regions.feature_norm.bias", "regions.box_proj.weight",
              "regions.box_proj.bias", "regions.box_norm.weight", "regions.box_norm.bias", "regions.norm.weight",
              "regions.norm.bias", "tag_norm.weight", "tag_norm.bias"],
    "released": ["regions.feature_norm.weight", "regions.feature_norm.bias", "regions.box_proj.weight",
                 "regions.box_proj.bias", "regions.box_norm.weight", "regions.box_norm.bias", "tag_norm.weight",
                 "tag_norm.bias"],
}
#: VisualBERT's own names of its visual projection and of the visual tensors the box styles have no place for
VISUAL = {"mmf": ("projection", ("token_type_embeddings_visual", "position_embeddings_visual")),
          "hf": ("visual_projection", ("visual_token_type_embeddings", "visual_position_embeddings"))}


def hf_visual_bert():
    torch.manual_seed(1)
    return VisualBertModel(VisualBertConfig(visual_embedding_dim=FEAT, **SIZES)).eval()


def visual_bert_source(kind):
    """(source model, its checkpoint state as stored: MMF's model.bert.* beside a head, HF's VisualBertFor*
    visual_bert.* prefix)."""
    source = mmf_visual_bert() if kind == "mmf" else hf_visual_bert()
    prefix = "model.bert." if kind == "mmf" else "visual_bert."
    state = {f"{prefix}{k}": v for k, v in source.state_dict().items()}
    state["model.classifier.1.weight" if kind == "mmf" else "cls.weight"] = torch.zeros(3, 3)
    return source, state


def expected_copies(kind, source):
    """Network key -> source tensor, written out independently of the loader."""
    projection, dropped = VISUAL[kind]
    out = {}
    for key, value in source.state_dict().items():
        part, module, leaf = key.split(".", 2)[0], key.split(".")[1], key.split(".")[-1]
        if part == "embeddings" and module == projection:
            out[f"regions.feature_proj.{leaf}"] = value
        elif part == "embeddings" and module in dropped:
            continue
        else:
            out[f"text.bert.{key}"] = value
    return out


def box_net(style, feature_dim=FEAT):
    torch.manual_seed(9)
    return MuVLANetwork(BertTextEncoder.from_config(BertConfig(**SIZES)), feature_dim, style).eval()


def text_only_reference(kind, source, style, ids, mask):
    """The source VisualBERT on text alone; for released, whose text embedding has no LayerNorm (the official
    code), the same model with its embedding LayerNorm taken out."""
    if style == "released":
        source = copy.deepcopy(source)
        source.embeddings.LayerNorm = torch.nn.Identity()
    with torch.no_grad():
        if kind == "mmf":
            sequence, pooled = source(ids, mask, torch.zeros_like(ids))[:2]
        else:
            ref = source(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
            sequence, pooled = ref.last_hidden_state, ref.pooler_output
    return sequence, pooled


@pytest.mark.parametrize("kind", ["mmf", "hf"])
@pytest.mark.parametrize("style", ["paper", "released"])
def test_visual_bert_weights_start_the_box_styles(kind, style):
    source, state = visual_bert_source(kind)
    net, fresh = box_net(style), box_net(style)
    lines = []
    new = load_visual_bert(net, state, log=lines.append)

    # the reported parameters are exactly those VisualBERT does not have, and they keep the initialisation
    assert sorted(new) == sorted(NEW[style])
    assert len(lines) == 1 and "initialised as new (not in the VisualBERT checkpoint): " in lines[0]
    assert all(name in lines[0] for name in NEW[style])
    assert all(name in lines[0] for name in VISUAL[kind][1])  # left out, named
    copies = expected_copies(kind, source)
    params, init = dict(net.named_parameters()), dict(fresh.named_parameters())
    assert set(params) == set(copies) | set(new) and not set(copies) & set(new)
    for key, value in copies.items():
        assert torch.equal(params[key], value), key
    for key in new:
        assert torch.equal(params[key], init[key]), key
    # the visual token-type / position tables have no place; the regions' segment (paper) is BERT's text one
    assert not any(k.startswith(("visual_token_type", "visual_position", "regions.proj.")) for k in params)

    # a forward pass runs, on regions and on an R-T tag sequence (the box / tag path the style adds)
    ids, mask, feats, rmask = inputs()
    boxes = torch.rand(B, N, 5)
    with torch.no_grad():
        out = net(ids, mask, feats, boxes, rmask)
        tags = net(ids, mask, feats, boxes, rmask, tag_boxes=torch.rand(B, T, 5))
    assert out["sequence"].shape == tags["sequence"].shape == (B, T + N, SIZES["hidden_size"])
    assert torch.isfinite(out["sequence"]).all() and torch.isfinite(tags["sequence"]).all()

    # text alone (zero regions): the source VisualBERT's BERT on the same ids
    with torch.no_grad():
        text = net(ids, mask, feats[:, :0], boxes[:, :0], rmask[:, :0])
    sequence, pooled = text_only_reference(kind, source, style, ids, mask)
    torch.testing.assert_close(text["text"], sequence, atol=1e-5, rtol=0)
    torch.testing.assert_close(text["pooled"], pooled, atol=1e-5, rtol=0)


def test_visual_bert_into_the_visual_bert_style_reports_only_the_unused_tag_norm():
    source, state = visual_bert_source("hf")
    assert sorted(load_visual_bert(ours(), state)) == ["tag_norm.bias", "tag_norm.weight"]


def test_box_styles_keep_shape_and_missing_tensor_errors():
    _, state = visual_bert_source("mmf")
    with pytest.raises(ValueError, match=r"regions\.feature_proj\.weight.*\(32, 24\).*\(32, 25\)"):
        load_visual_bert(box_net("paper", FEAT + 1), state)
    lacking = {k: v for k, v in state.items() if ".encoder.layer.1." not in k}
    with pytest.raises(KeyError, match="lacks.*text.bert.encoder.layer.1"):
        load_visual_bert(box_net("released"), lacking)
    no_projection = {k: v for k, v in state.items() if ".projection." not in k}
    with pytest.raises(KeyError, match="no VisualBERT visual embedding"):
        load_visual_bert(box_net("paper"), no_projection)


def test_the_model_reports_the_new_parameters_in_its_log(tmp_path, monkeypatch):
    source, state = visual_bert_source("mmf")
    lines = []
    monkeypatch.setattr(MuVLA, "write", lambda self, line: lines.append(line))
    model, path = model_from_file(tmp_path, state, "paper")
    torch.testing.assert_close(model.backbone.regions.feature_proj.weight, source.embeddings.projection.weight)
    report = [line for line in lines if "visual_bert_checkpoint" in line]
    assert len(report) == 1 and str(path) in report[0]
    assert "initialised as new (not in the VisualBERT checkpoint): " in report[0]
    assert all(name in report[0] for name in NEW["paper"])
