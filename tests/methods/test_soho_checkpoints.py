"""The official SOHO release's key layout (researchmm/soho, mmcv) into ``soho``: a tiny checkpoint built in
that layout, converted by the CLI, loaded into ``soho`` (``pool_before_conv``, no visual token type), and
compared with the official forward pass written here from the official code's description: the grid
features (mmcv ResNet = torchvision's -> 2x2 max-pool -> 1x1 conv -> eval BatchNorm), the dictionary
assignment (squared distance to ``neck.vq.embed``), the BERT text embeddings and the fine-tuning
neck's visual tokens (``LN(features + sine position)``)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf

from mmf_multilevel.methods.soho import testing as tiny
from mmf_multilevel.methods.soho.checkpoints import OFFICIAL_SETTINGS, convert_official_state, main
from mmf_multilevel.methods.soho.model import SOHO
from mmf_multilevel.methods.soho.testing import official_layout_state
from mmf_multilevel.methods.testing import TINY_BERT

pytestmark = pytest.mark.usefixtures("mmf_global_config")

C, K = TINY_BERT["hidden_size"], 16


def soho_model(**overrides):
    config = OmegaConf.merge(OmegaConf.load(SOHO.config_path()).model_config.soho, tiny.tiny_config("vqa"),
                             {"backbone": "resnet18", "vd_size": K, "hidden_dropout_prob": 0.0,
                              "attention_probs_dropout_prob": 0.0, **OFFICIAL_SETTINGS}, overrides)
    model = SOHO(config)
    model.build()
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The official tiny checkpoint (mmcv's file layout) through the CLI, loaded into soho."""
    work = tmp_path_factory.mktemp("soho_official")
    state = official_layout_state()
    torch.save({"meta": {"epoch": 40}, "state_dict": state}, work / "official.pth")
    assert main(["convert", str(work / "official.pth"), str(work / "soho.pth"), "--allow-pickle"]) == 0
    model = soho_model()
    result = model.load_state_dict(torch.load(work / "soho.pth", weights_only=True)["model"], strict=False)
    assert not result.unexpected_keys
    # only BERT's pooler, the dictionary's usage statistics and the heads start fresh
    fresh = {k.rsplit(".", 1)[0] for k in result.missing_keys}
    assert fresh == {"backbone.text.bert.pooler.dense", "backbone.dictionary", "classifier.dense",
                     "classifier.LayerNorm", "classifier.classifier"}, sorted(result.missing_keys)
    return state, model


def official_grid(state, pixels):
    """mmcv ResNet-18 (torchvision's layout, eval BatchNorm) to C5; the neck: 2x2 max-pool, 1x1 conv, BN."""
    resnet = torchvision.models.resnet18(weights=None)
    resnet.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                           strict=False)
    resnet.eval()
    with torch.no_grad():
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(pixels))))
        c5 = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))
        x = F.conv2d(F.max_pool2d(c5, 2, stride=2), state["neck.conv.conv.weight"])
        return F.batch_norm(x, state["neck.conv.bn.running_mean"], state["neck.conv.bn.running_var"],
                            state["neck.conv.bn.weight"], state["neck.conv.bn.bias"], training=False, eps=1e-5)


def official_sine(mask, channels):
    """The official neck's 2-D sine position embedding of a (B, h, w) mask -> (B, channels, h, w)."""
    y = mask.cumsum(1, dtype=torch.float32)
    x = mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    half = channels // 2
    dim = 10000 ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)
    px, py = x[..., None] / dim, y[..., None] / dim
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def test_grid_features_and_dictionary_assignment_match_the_official_forward(converted):
    state, model = converted
    pixels = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(3))  # C5 4 x 6: even sides
    expected = official_grid(state, pixels)
    with torch.no_grad():
        image = model.backbone.encode_image(pixels, quantise=True)
    grid = image["features"].transpose(1, 2).reshape(expected.shape)
    torch.testing.assert_close(grid, expected, rtol=1e-4, atol=1e-4)
    flat = expected.permute(0, 2, 3, 1).reshape(-1, C)
    embed = state["neck.vq.embed"]
    distances = flat.pow(2).sum(1, keepdim=True) + embed.pow(2).sum(1) - 2 * flat @ embed.t()
    assert torch.equal(image["ids"].view(-1), distances.argmin(1))
    assert len(set(distances.argmin(1).tolist())) > 1  # the comparison is not over a single entry


def test_text_embeddings_match_the_official_bert(converted):
    state, model = converted
    ids = torch.tensor([[tiny.CLS, 7, 9, 11, tiny.SEP], [tiny.CLS, 5, 6, tiny.SEP, 0]])
    e = "language.bert.embeddings."
    expected = (state[f"{e}word_embeddings.weight"][ids] + state[f"{e}position_embeddings.weight"][:5]
                + state[f"{e}token_type_embeddings.weight"][0])
    expected = F.layer_norm(expected, (C,), state[f"{e}LayerNorm.weight"], state[f"{e}LayerNorm.bias"], eps=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.text.embed(ids), expected, rtol=1e-5, atol=1e-5)


def test_fine_tuning_visual_tokens_match_the_official_neck(converted):
    """The official fine-tuning neck: LN(conv features + sine position), no token type."""
    state, model = converted
    pixels = torch.randn(1, 3, 128, 192, generator=torch.Generator().manual_seed(4))
    features = official_grid(state, pixels)
    mask = torch.ones(1, *features.shape[-2:])
    tokens = (features + official_sine(mask, C)).flatten(2).transpose(1, 2)
    expected = F.layer_norm(tokens, (C,), state["neck.ln.weight"], state["neck.ln.bias"], eps=1e-12)
    with torch.no_grad():
        image = model.backbone.encode_image(pixels, quantise=False)
        ours = model.backbone.visual_embeddings(image["features"], image["mask"], image["grid"])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_a_conv_bias_without_a_norm_is_taken_as_it_is():
    state = official_layout_state(conv_norm=False)
    out, _ = convert_official_state(state)
    assert torch.equal(out["backbone.encoder.proj.bias"], state["neck.conv.conv.bias"])
    assert torch.equal(out["backbone.encoder.proj.weight"], state["neck.conv.conv.weight"])


def test_pretraining_target_refuses_the_official_visual_token_layers():
    state = official_layout_state()
    del state["neck.mask_emb.weight"]
    with pytest.raises(ValueError, match=r"neck\.pos_line\.(weight|bias)"):
        convert_official_state(state, target="pretraining")
    state = official_layout_state(pos_line=False)  # the learned mask vector alone is the official token's too
    with pytest.raises(ValueError, match=r"neck\.mask_emb\.weight"):
        convert_official_state(state, target="pretraining")
    del state["neck.mask_emb.weight"]
    out, dropped = convert_official_state(state, target="pretraining")
    assert "backbone.dictionary.embedding" in out and bool(out["backbone.dictionary.initialised"])
    assert sorted(d.split()[0] for d in dropped) == sorted(
        ["neck.vq.cluster_size", "neck.vq.cluster_sum", "neck.vq.embed_avg", "head.match_class.weight",
         "mask_l_fc.weight"])
    # the fine-tuning target drops them, listed
    _, dropped = convert_official_state(official_layout_state())
    assert {"neck.pos_line.weight", "neck.pos_line.bias", "neck.mask_emb.weight"} <= {d.split()[0] for d in dropped}


@pytest.mark.parametrize("key", ["neck.vq.embed", "neck.conv.conv.weight", "neck.ln.bias",
                                 "language.bert.embeddings.LayerNorm.weight", "backbone.conv1.weight",
                                 "neck.conv.bn.running_var"])
def test_a_missing_official_key_is_an_error_naming_it(key):
    state = official_layout_state()
    del state[key]
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        convert_official_state(state)


def test_an_unknown_key_is_an_error_naming_it(tmp_path, capsys):
    state = official_layout_state()
    state["head.vqa_classifier.weight"] = torch.zeros(3, C)
    with pytest.raises(KeyError, match=r"head\.vqa_classifier\.weight"):
        convert_official_state(state)
    torch.save({"state_dict": state}, tmp_path / "official.pth")
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "out.pth")]) == 2
    assert "head.vqa_classifier.weight" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()


def test_an_untied_mlm_decoder_is_an_error():
    state = official_layout_state()
    state["mask_l_fc.weight"] = state["mask_l_fc.weight"] + 1
    with pytest.raises(ValueError, match="mask_l_fc.weight"):
        convert_official_state(state)
