"""The official ALBEF and SIMLA checkpoints into ``simla`` (``methods/simla/checkpoints.py``): tiny state dicts in
the exact official key layouts (xbert / med BERTs, vit.py ViT, heads, momentum copies, queues) converted, loaded
strictly into the tiny ``simla`` model, and its outputs compared with an independent forward computed from the
official tensors by name (``helpers/simla_reference.py``)."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from helpers import simla_reference as ref
from mmf_multilevel.methods.simla import testing
from mmf_multilevel.methods.simla.checkpoints import convert_official_state, main

pytestmark = pytest.mark.usefixtures("mmf_global_config")

H, HEADS, FFN, VOCAB, POSITIONS, LAYERS = 32, 4, 64, 40, 40, 2
EMBED, QUEUE, IMAGE_VOCAB, PATCH, GRID = testing.EMBED_DIM, testing.QUEUE_SIZE, testing.IMAGE_VOCAB, 16, 4


def _attention(state, prefix, g):
    for name in ("self.query", "self.key", "self.value", "output.dense"):
        state[f"{prefix}.{name}.weight"] = torch.randn(H, H, generator=g) * 0.2
        state[f"{prefix}.{name}.bias"] = torch.randn(H, generator=g) * 0.1
    state[f"{prefix}.output.LayerNorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    state[f"{prefix}.output.LayerNorm.bias"] = 0.1 * torch.randn(H, generator=g)


def _bert(state, prefix, cross_layers, token_types, g):
    state[f"{prefix}embeddings.word_embeddings.weight"] = torch.randn(VOCAB, H, generator=g)
    state[f"{prefix}embeddings.position_embeddings.weight"] = torch.randn(POSITIONS, H, generator=g)
    if token_types:
        state[f"{prefix}embeddings.token_type_embeddings.weight"] = torch.randn(2, H, generator=g)
    state[f"{prefix}embeddings.LayerNorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    state[f"{prefix}embeddings.LayerNorm.bias"] = 0.1 * torch.randn(H, generator=g)
    state[f"{prefix}embeddings.position_ids"] = torch.arange(POSITIONS).view(1, -1)
    for i in range(LAYERS):
        layer = f"{prefix}encoder.layer.{i}"
        _attention(state, f"{layer}.attention", g)
        if i in cross_layers:
            _attention(state, f"{layer}.crossattention", g)
        state[f"{layer}.intermediate.dense.weight"] = torch.randn(FFN, H, generator=g) * 0.2
        state[f"{layer}.intermediate.dense.bias"] = torch.randn(FFN, generator=g) * 0.1
        state[f"{layer}.output.dense.weight"] = torch.randn(H, FFN, generator=g) * 0.2
        state[f"{layer}.output.dense.bias"] = torch.randn(H, generator=g) * 0.1
        state[f"{layer}.output.LayerNorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        state[f"{layer}.output.LayerNorm.bias"] = 0.1 * torch.randn(H, generator=g)


def _mlm(state, prefix, word, g):
    head = f"{prefix}cls.predictions."
    state[head + "bias"] = torch.randn(VOCAB, generator=g) * 0.1
    state[head + "transform.dense.weight"] = torch.randn(H, H, generator=g) * 0.2
    state[head + "transform.dense.bias"] = torch.randn(H, generator=g) * 0.1
    state[head + "transform.LayerNorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    state[head + "transform.LayerNorm.bias"] = 0.1 * torch.randn(H, generator=g)
    state[head + "decoder.weight"] = word.clone()  # tied in BertForMaskedLM
    state[head + "decoder.bias"] = state[head + "bias"].clone()


def _vit(state, prefix, mask_token, g):
    state[f"{prefix}cls_token"] = torch.randn(1, 1, H, generator=g) * 0.1
    state[f"{prefix}pos_embed"] = torch.randn(1, 1 + GRID * GRID, H, generator=g) * 0.1
    if mask_token:
        state[f"{prefix}mask_token"] = torch.randn(1, 1, H, generator=g) * 0.1
    state[f"{prefix}patch_embed.proj.weight"] = torch.randn(H, 3, PATCH, PATCH, generator=g) * 0.02
    state[f"{prefix}patch_embed.proj.bias"] = torch.randn(H, generator=g) * 0.1
    block = f"{prefix}blocks.0."
    for name, shape in (("norm1", None), ("norm2", None)):
        state[block + f"{name}.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        state[block + f"{name}.bias"] = 0.1 * torch.randn(H, generator=g)
    for name, out, inp in (("attn.qkv", 3 * H, H), ("attn.proj", H, H), ("mlp.fc1", 4 * H, H), ("mlp.fc2", H, 4 * H)):
        state[block + f"{name}.weight"] = torch.randn(out, inp, generator=g) * 0.2
        state[block + f"{name}.bias"] = torch.randn(out, generator=g) * 0.1
    state[f"{prefix}norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    state[f"{prefix}norm.bias"] = 0.1 * torch.randn(H, generator=g)


def _linear(state, name, out, inp, g):
    state[f"{name}.weight"] = torch.randn(out, inp, generator=g) * 0.2
    state[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1


def official_state(source, seed=0):
    """A pre-training checkpoint's ``model`` in the official layout: online and momentum modules drawn
    independently (so a skipped or swapped copy shows)."""
    g = torch.Generator().manual_seed(seed)
    albef = source == "albef"
    cross = {1} if albef else {0, 1}
    state = {}
    for suffix in ("", "_m"):
        _vit(state, f"visual_encoder{suffix}.", not albef, g)
        _bert(state, f"text_encoder{suffix}.bert.", cross, albef, g)
        _mlm(state, f"text_encoder{suffix}.", state[f"text_encoder{suffix}.bert.embeddings.word_embeddings.weight"], g)
        _linear(state, f"vision_proj{suffix}", EMBED, H, g)
        _linear(state, f"text_proj{suffix}", EMBED, H, g)
        if not albef:
            _linear(state, f"mim_head{suffix}", IMAGE_VOCAB, H, g)
            _linear(state, f"concept_head{suffix}", VOCAB, EMBED, g)
    _linear(state, "itm_head", 2, H, g)
    state["temp"] = torch.tensor(0.05)
    state["image_queue"] = F.normalize(torch.randn(EMBED, QUEUE, generator=g), dim=0)
    state["text_queue"] = F.normalize(torch.randn(EMBED, QUEUE, generator=g), dim=0)
    state["queue_ptr"] = torch.tensor([8])
    return state


def build(settings):
    from mmf.common.registry import registry

    cls = registry.get_model_class("simla")
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.simla, testing.tiny_config("pretraining"),
                             {k: v for k, v in settings.items() if k != "image_size"})
    model = cls(config)
    model.build()
    return model.eval()


def loaded(source, state=None):
    state = official_state(source) if state is None else state
    converted, dropped, settings = convert_official_state(state, source)
    model = build(settings)
    model.load_state_dict(converted, strict=True)
    return model, state, dropped, settings


def inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 7), generator=g)
    ids[:, 0] = testing.CLS
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    pixels = torch.randn(3, 3, 64, 64, generator=g)
    return ids, mask, pixels


def official_forward(state, source, ids, mask, pixels, suffix=""):
    """The official forward from the official tensors: ITC features, ITM logits of the pairs, MLM logits."""
    albef = source == "albef"
    bert = f"text_encoder{suffix}.bert"
    image = ref.vit(pixels, state, f"visual_encoder{suffix}", HEADS, depth=1)
    text = ref.embeddings(ids, state, f"{bert}.embeddings")
    text_layers = [0] if albef else [0, 1]
    for i in text_layers:  # mode="text": no cross-attention
        text = ref.bert_layer(text, mask, state, f"{bert}.encoder.layer.{i}", HEADS)

    def multimodal(start):  # xbert mode="fusion" from text states / med mode="multimodal" from embeddings
        hidden = text if albef else ref.embeddings(ids, state, f"{bert}.embeddings")
        for i in ([1] if albef else [0, 1]):
            hidden = ref.bert_layer(hidden, mask, state, f"{bert}.encoder.layer.{i}", HEADS,
                                    cross_prefix=f"{bert}.encoder.layer.{i}.crossattention", memory=image)
        return hidden

    fused = multimodal(0)
    out = {"image": image, "text": text,
           "image_feat": F.normalize(ref.linear(image[:, 0], state, f"vision_proj{suffix}"), dim=-1),
           "text_feat": F.normalize(ref.linear(text[:, 0], state, f"text_proj{suffix}"), dim=-1),
           "mlm": ref.mlm_head(fused, state, f"text_encoder{suffix}.cls")}
    if not suffix:
        out["itm"] = ref.linear(fused[:, 0], state, "itm_head")
    return out


def ours(model, ids, mask, pixels, momentum=False):
    m = model.momentum
    vit = m["visual_encoder"] if momentum else model.backbone.image_encoder
    bert = m["text_encoder"] if momentum else model.backbone.text_encoder
    mlm = m["mlm"] if momentum else model.heads.mlm
    vision_proj = m["vision_proj"] if momentum else model.heads.vision_proj
    text_proj = m["text_proj"] if momentum else model.heads.text_proj
    image = vit(pixels)
    text = bert.encode_text(ids, mask)
    fused = bert.fuse(ids, mask, image)
    out = {"image": image, "text": text, "image_feat": F.normalize(vision_proj(image[:, 0]), dim=-1),
           "text_feat": F.normalize(text_proj(text[:, 0]), dim=-1), "mlm": mlm(fused)}
    if not momentum:
        out["itm"] = model.heads.itm_logits(fused[:, 0])
    return out


def compare(got, expected, mask):
    real = mask.bool()
    for key in expected:
        a, b = (got[key][real], expected[key][real]) if key in ("text", "mlm") else (got[key], expected[key])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("source", ["albef", "simla"])
def test_converted_checkpoint_reproduces_the_official_forward(source):
    model, state, dropped, settings = loaded(source)
    ids, mask, pixels = inputs()
    with torch.no_grad():
        compare(ours(model, ids, mask, pixels), official_forward(state, source, ids, mask, pixels), mask)
        compare(ours(model, ids, mask, pixels, momentum=True),
                official_forward(state, source, ids, mask, pixels, suffix="_m"), mask)
    torch.testing.assert_close(model.queues.image_queue, state["image_queue"])
    torch.testing.assert_close(model.queues.text_queue, state["text_queue"])
    assert int(model.queues.queue_ptr) == 8 and float(model.heads.temp) == pytest.approx(0.05)
    assert any("position_ids" in d for d in dropped)
    if source == "albef":
        assert settings["layout"] == "albef" and settings["fusion_layer"] == 1
        assert any("token_type_embeddings" in d for d in dropped)
    else:
        assert settings["layout"] == "simla" and settings["image_vocab"] == IMAGE_VOCAB


def test_simla_mim_and_concept_heads_match_the_official_forward():
    model, state, _, _ = loaded("simla")
    ids, mask, pixels = inputs()
    masked = torch.zeros(3, GRID * GRID, dtype=torch.bool)
    masked[:, [1, 5, 6]] = True
    with torch.no_grad():
        # official: mask_token in place of the masked patch embeddings, then the ViT; BERT embeddings on the
        # image tokens, self-attention among them, cross-attention to the caption's embedding-layer output
        tokens = F.conv2d(pixels, state["visual_encoder.patch_embed.proj.weight"],
                          state["visual_encoder.patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
        w = masked.unsqueeze(-1).float()
        tokens = tokens * (1 - w) + state["visual_encoder.mask_token"] * w
        vit_state = dict(state)
        image = _vit_from_tokens(tokens, vit_state)
        text_memory = ref.embeddings(ids, state, "text_encoder.bert.embeddings")
        hidden = ref.layer_norm(image + state["text_encoder.bert.embeddings.position_embeddings.weight"][:image.size(1)],
                                state, "text_encoder.bert.embeddings.LayerNorm", ref.BERT_EPS)
        for i in range(LAYERS):
            hidden = ref.bert_layer(hidden, None, state, f"text_encoder.bert.encoder.layer.{i}", HEADS,
                                    cross_prefix=f"text_encoder.bert.encoder.layer.{i}.crossattention",
                                    memory=text_memory, memory_mask=mask)
        expected_mim = ref.linear(hidden[:, 1:], state, "mim_head")
        got_mim = model.heads.mim_logits(model.backbone.text_encoder.reconstruct_image(
            model.backbone.image_encoder(pixels, masked), ids, mask))
        torch.testing.assert_close(got_mim, expected_mim, rtol=1e-4, atol=1e-4)
        image_feat = F.normalize(ref.linear(ref.vit(pixels, state, "visual_encoder", HEADS, 1)[:, 0], state,
                                            "vision_proj"), dim=-1)
        torch.testing.assert_close(model.heads.concept_logits(image_feat), ref.linear(image_feat, state, "concept_head"))
        torch.testing.assert_close(model.momentum["concept_head"](image_feat),
                                   ref.linear(image_feat, state, "concept_head_m"))
        torch.testing.assert_close(model.momentum["mim_head"](hidden), ref.linear(hidden, state, "mim_head_m"))


def _vit_from_tokens(tokens, state):
    """The official ViT after the patch embedding (for the masked MIM input)."""
    import math

    x = torch.cat([state["visual_encoder.cls_token"].expand(tokens.size(0), -1, -1), tokens], dim=1)
    x = x + state["visual_encoder.pos_embed"]
    batch, length, width = x.shape
    y = ref.layer_norm(x, state, "visual_encoder.blocks.0.norm1", ref.VIT_EPS)
    q, k, v = ref.linear(y, state, "visual_encoder.blocks.0.attn.qkv").view(batch, length, 3, HEADS, -1).permute(
        2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(width // HEADS)).softmax(-1)
    x = x + ref.linear((attn @ v).transpose(1, 2).reshape(batch, length, width), state, "visual_encoder.blocks.0.attn.proj")
    y = ref.layer_norm(x, state, "visual_encoder.blocks.0.norm2", ref.VIT_EPS)
    x = x + ref.linear(F.gelu(ref.linear(y, state, "visual_encoder.blocks.0.mlp.fc1")), state,
                       "visual_encoder.blocks.0.mlp.fc2")
    return ref.layer_norm(x, state, "visual_encoder.norm", ref.VIT_EPS)


def test_position_embeddings_are_resampled_for_another_resolution():
    from mmf_multilevel.methods.simla.vision import resize_position_embeddings

    state = official_state("albef")
    converted, _, settings = convert_official_state(state, "albef", image_size=128)
    assert settings["image_size"] == 128
    for ours_key, theirs in (("backbone.image_encoder.vit.pos_embed", "visual_encoder.pos_embed"),
                             ("momentum.copies.visual_encoder.vit.pos_embed", "visual_encoder_m.pos_embed")):
        assert converted[ours_key].shape == (1, 65, H)
        torch.testing.assert_close(converted[ours_key],
                                   resize_position_embeddings({"pos_embed": state[theirs]}, (8, 8))["pos_embed"])


def test_retrieval_checkpoints_without_the_mlm_head_and_with_idx_queue():
    state = official_state("albef")
    state = {(k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m.")): v
             for k, v in state.items() if ".cls." not in k}
    state["idx_queue"] = torch.full((1, QUEUE), -100)
    converted, dropped, _ = convert_official_state(state, "albef")
    assert not any(k.startswith("heads.mlm.") for k in converted)
    assert any(d.startswith("idx_queue") for d in dropped)
    model = build({"layout": "albef", "fusion_layer": 1, "mim": False, "psl": False})
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and all(".mlm." in k for k in missing)


def test_wrong_layouts_and_stray_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="--from simla"):
        convert_official_state(official_state("simla"), "albef")
    with pytest.raises(ValueError, match="--from albef"):
        convert_official_state(official_state("albef"), "simla")
    state = official_state("albef")
    state["visual_encoder.head.weight"] = torch.zeros(3, H)
    with pytest.raises(KeyError, match=r"visual_encoder\.head\.weight"):
        convert_official_state(state, "albef")
    state = official_state("albef")
    del state["text_encoder.bert.embeddings.LayerNorm.weight"]
    with pytest.raises(KeyError, match=r"text_encoder\.bert\.embeddings\.LayerNorm\.weight"):
        convert_official_state(state, "albef")


def test_the_command_reads_the_official_container_and_writes_weights_only(tmp_path, capsys):
    source, target = tmp_path / "ALBEF.pth", tmp_path / "albef.pth"
    torch.save({"model": official_state("albef"), "config": {"queue_size": QUEUE}, "epoch": 29}, source)
    assert main(["convert", "--from", "albef", str(source), str(target)]) == 0
    printed = capsys.readouterr().out
    assert "model_config.simla.layout=albef model_config.simla.fusion_layer=1" in printed
    state = torch.load(target, weights_only=True)["model"]
    build({"layout": "albef", "fusion_layer": 1, "mim": False, "psl": False}).load_state_dict(state, strict=True)
    assert main(["convert", "--from", "simla", str(source), str(tmp_path / "x.pth")]) == 2
    assert "--from albef" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()
