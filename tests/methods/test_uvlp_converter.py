"""The official μ-VLA (UVLP) checkpoint layout converted into ``muvla`` (embedding_style: released) gives
the official forward pass - computed here independently from the checkpoint's own tensors."""
import mmf  # noqa: F401  (applies the compatibility layer)
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from test_muvla_checkpoints import FEAT, SIZES, B, N, T  # the same tiny sizes
from test_muvla_checkpoints import inputs as text_and_regions
from transformers import BertConfig, BertModel

from mmf_multilevel.methods.muvla import checkpoints as C
from mmf_multilevel.methods.muvla.model import MuVLA

TAGS = 9
H = SIZES["hidden_size"]


def _rand(*shape, g):
    return torch.randn(*shape, generator=g) * 0.2


def official_state():
    """A state dict in the release's exact layout (MMF ``model.`` prefix), every tensor random."""
    torch.manual_seed(3)
    bert = BertModel(BertConfig(**SIZES))
    g = torch.Generator().manual_seed(4)
    state = {f"model.bert.{k}": v.clone() for k, v in bert.state_dict().items()}
    for key in [k for k in state if "LayerNorm" in k]:  # non-trivial norms: a misplaced one shows
        state[key] = state[key] + _rand(*state[key].shape, g=g)
    e = "model.bert.embeddings."
    for name, shape in (("projection", (H, FEAT)), ("box_fc", (H, 5))):
        state[f"{e}{name}.weight"], state[f"{e}{name}.bias"] = _rand(*shape, g=g), _rand(H, g=g)
    for name in ("visn_layer_norm", "box_layer_norm", "tag_layer_norm"):
        state[f"{e}{name}.weight"], state[f"{e}{name}.bias"] = 1 + _rand(H, g=g), _rand(H, g=g)
    state[f"{e}token_type_embeddings_visual.weight"] = _rand(2, H, g=g)
    state[f"{e}position_embeddings_visual.weight"] = _rand(SIZES["max_position_embeddings"], H, g=g)
    for head in ("cls.predictions", "obj_predict_head"):
        state[f"model.{head}.transform.dense.weight"], state[f"model.{head}.transform.dense.bias"] = _rand(H, H, g=g), _rand(H, g=g)
        state[f"model.{head}.transform.LayerNorm.weight"] = 1 + _rand(H, g=g)
        state[f"model.{head}.transform.LayerNorm.bias"] = _rand(H, g=g)
    state["model.cls.predictions.bias"] = _rand(SIZES["vocab_size"], g=g)
    state["model.cls.predictions.decoder.weight"] = state[f"{e}word_embeddings.weight"]
    state["model.obj_predict_head.decoder_dict.obj.weight"] = _rand(TAGS, H, g=g)
    state["model.obj_predict_head.decoder_dict.obj.bias"] = _rand(TAGS, g=g)
    state["model.obj_predict_head.decoder_dict.feat.weight"] = _rand(FEAT, H, g=g)
    state["model.obj_predict_head.decoder_dict.feat.bias"] = _rand(FEAT, g=g)
    state["model.itm_cls.weight"], state["model.itm_cls.bias"] = _rand(2, H, g=g), _rand(2, g=g)
    return state, bert


def inputs():
    """The μ-VLA checkpoint tests' text and regions, plus 5-d region boxes and R-T tag boxes."""
    ids, mask, feats, rmask = text_and_regions()
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(B, N, 2, generator=g) * 0.5
    wh = torch.rand(B, N, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh, wh[..., :1] * wh[..., 1:]], -1)
    return ids, mask, feats, boxes, rmask, torch.rand(B, T, 5, generator=g)


def ln(x, state, name):
    return F.layer_norm(x, (H,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-12)


def lin(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def reference(state, bert, ids, mask, feats, boxes, rmask, tag_boxes=None):
    """The official forward pass (use_image_position_embedding: true), from the state dict alone."""
    e = "model.bert.embeddings."
    words = state[f"{e}word_embeddings.weight"][ids]
    if tag_boxes is None:  # caption: the plain BERT sum, no LayerNorm
        text = words + state[f"{e}position_embeddings.weight"][torch.arange(T)] + state[f"{e}token_type_embeddings.weight"][0]
    else:  # R-T tags: LN_tag(word) + LN_box(box_fc(tag box)), no position embedding
        text = ln(words, state, f"{e}tag_layer_norm") + ln(lin(tag_boxes, state, f"{e}box_fc"), state, f"{e}box_layer_norm")
    regions = ln(lin(feats, state, f"{e}projection"), state, f"{e}visn_layer_norm") + \
        ln(lin(boxes, state, f"{e}box_fc"), state, f"{e}box_layer_norm")
    hidden = torch.cat([text, regions], 1)
    keep = torch.cat([mask, rmask], 1).float()[:, None, None, :]
    bert.load_state_dict({k[len("model.bert."):]: v for k, v in state.items() if k.startswith("model.bert.")
                          and k[len("model.bert.embeddings."):].split(".")[0] not in ("projection", "box_fc", "visn_layer_norm", "box_layer_norm", "tag_layer_norm",
                           "token_type_embeddings_visual", "position_embeddings_visual")})
    bert.eval()
    sequence = bert.encoder(hidden, attention_mask=(1.0 - keep) * torch.finfo(torch.float32).min)[0]
    pooled = bert.pooler(sequence)

    def transform(x, head):
        return ln(F.gelu(lin(x, state, f"model.{head}.transform.dense")), state, f"model.{head}.transform.LayerNorm")

    heads = {
        "mlm": F.linear(transform(sequence[:, :T], "cls.predictions"), state[f"{e}word_embeddings.weight"],
                        state["model.cls.predictions.bias"]),
        "mrc": lin(transform(sequence[:, T:], "obj_predict_head"), state, "model.obj_predict_head.decoder_dict.obj"),
        "mrfr": lin(transform(sequence[:, T:], "obj_predict_head"), state, "model.obj_predict_head.decoder_dict.feat"),
        "itm": lin(pooled, state, "model.itm_cls"),
    }
    return sequence, pooled, heads


def build(path, head_type="pretraining", embedding_style="released"):
    base = OmegaConf.load(MuVLA.config_path()).model_config.muvla
    config = OmegaConf.merge(base, dict(bert_model_name=None, embedding_style=embedding_style, feature_dim=FEAT,
                                        released_checkpoint=str(path), training_head_type=head_type,
                                        num_labels=4, pretraining=dict(num_tags=TAGS), **SIZES))
    torch.manual_seed(11)
    model = MuVLA(config)
    model.build()
    return model.eval()


def test_converted_release_gives_the_official_hidden_states_and_head_outputs(tmp_path):
    state, bert = official_state()
    path = tmp_path / "uvlp.ckpt"
    torch.save({"model": state, "num_updates": 130000}, path)
    model = build(path)
    ids, mask, feats, boxes, rmask, tag_boxes = inputs()
    with torch.no_grad():
        for tags in (None, tag_boxes):
            sequence, pooled, heads = reference(state, bert, ids, mask, feats, boxes, rmask, tags)
            out = model.backbone(ids, mask, feats, boxes, rmask, tag_boxes=tags)
            torch.testing.assert_close(out["sequence"], sequence, atol=1e-5, rtol=0)
            torch.testing.assert_close(out["pooled"], pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.heads.mlm(out["text"]), heads["mlm"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.heads.mrc(out["regions"]), heads["mrc"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.heads.mrfr(out["regions"]), heads["mrfr"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.heads.itm(out["pooled"]), heads["itm"], atol=1e-5, rtol=0)
    assert model.heads.mlm.decoder.weight is model.backbone.text.word_embeddings.weight  # still tied


def test_fine_tuning_takes_the_backbone_only_and_the_style_must_match(tmp_path):
    state, _ = official_state()
    path = tmp_path / "uvlp.pth"
    torch.save(state, path)  # a bare state dict works too
    model = build(path, head_type="classification")
    torch.testing.assert_close(model.backbone.regions.box_proj.weight, state["model.bert.embeddings.box_fc.weight"])
    torch.testing.assert_close(model.backbone.tag_norm.weight, state["model.bert.embeddings.tag_layer_norm.weight"])
    with pytest.raises(ValueError, match="embedding_style: released"):
        build(path, embedding_style="paper")
    converted, dropped = C.convert_uvlp_state(state)
    assert sorted(dropped) == ["model.bert.embeddings.position_embeddings_visual.weight",
                               "model.bert.embeddings.token_type_embeddings_visual.weight"]
    # the shared region-head transform lands in both of our region heads
    assert converted["heads.mrc.transform.dense.weight"] is converted["heads.mrfr.transform.dense.weight"]
    with pytest.raises(KeyError, match="not a UVLP"):
        C.convert_uvlp_state({"model.bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)})
    wrong = dict(state)
    wrong["model.obj_predict_head.decoder_dict.obj.weight"] = torch.zeros(TAGS + 1, H)
    wrong["model.obj_predict_head.decoder_dict.obj.bias"] = torch.zeros(TAGS + 1)
    torch.save(wrong, path)
    with pytest.raises(ValueError, match="heads.mrc.decoder"):
        build(path)


def test_cli_writes_a_weights_only_checkpoint_and_refuses_other_layouts(tmp_path, capsys):
    state, _ = official_state()
    source, output = tmp_path / "uvlp.ckpt", tmp_path / "muvla.pth"
    torch.save({"model": state}, source)
    assert C.main(["uvlp", str(source), str(output)]) == 0
    printed = capsys.readouterr().out
    assert "left out 2 source keys" in printed and "itm" in printed
    written = torch.load(output, weights_only=True)["model"]
    assert written.keys() == C.convert_uvlp_state(state)[0].keys()
    assert not list(tmp_path.glob("*.tmp-*"))
    # the converted file is what released_checkpoint also takes (weights only, no second conversion)
    direct, converted = build(source), build(output)
    for key, value in direct.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    torch.save({"model": {"encoder.weight": torch.zeros(1)}}, source)
    assert C.main(["uvlp", str(source), str(tmp_path / "other.pth")]) == 2
    assert "not a UVLP" in capsys.readouterr().err and not (tmp_path / "other.pth").exists()


def test_pretraining_without_tags_skips_the_region_class_head_and_a_missing_backbone_entry_is_named(tmp_path):
    state, _ = official_state()
    path = tmp_path / "uvlp.ckpt"
    torch.save({"model": state}, path)
    base = OmegaConf.load(MuVLA.config_path()).model_config.muvla
    config = OmegaConf.merge(base, dict(bert_model_name=None, embedding_style="released", feature_dim=FEAT,
                                        released_checkpoint=str(path), pretraining=dict(num_tags=0), **SIZES))
    model = MuVLA(config)
    model.build()
    assert model.heads.mrc is None
    torch.testing.assert_close(model.heads.itm.classifier.weight, state["model.itm_cls.weight"])
    partial = {k: v for k, v in state.items() if k != "model.bert.encoder.layer.0.output.dense.weight"}
    torch.save({"model": partial}, path)
    with pytest.raises(KeyError, match=r"lacks backbone entries \['backbone.text.bert.encoder.layer.0.output.dense.weight'\]"):
        build(path)


def test_a_release_of_another_size_is_named_by_the_setting(tmp_path):
    state, _ = official_state()
    key = "model.bert.encoder.layer.0.output.dense.weight"
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    path = tmp_path / "uvlp.ckpt"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=rf"^model_config.muvla.released_checkpoint={path}: .* has shape"):
        build(path)
