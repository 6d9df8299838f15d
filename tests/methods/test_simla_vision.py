"""SIMLA's image side (mmf_multilevel/methods/simla/vision.py): the ViT's grid and sequence length at
256² and 384², the mask token before the position embedding, position-embedding resampling (timm's
pretrained path and checkpoints of another resolution), BEiT block masking, and the frozen DALL·E dVAE
tokenizer with its converter - on tiny random networks (CPU, no downloads)."""
import os
import random
import sys
import types

import pytest
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from mmf_multilevel.methods.simla import vision
from mmf_multilevel.methods.simla.vision import (
    DALLEEncoder,
    DVAETokenizer,
    SIMLAImageEncoder,
    block_mask,
    convert_dvae,
    draw_mask_blocks,
    map_pixels,
    resize_position_embeddings,
)
from mmf_multilevel.zoo.zoo import UnsafeCheckpointError

TINY = dict(embed_dim=16, depth=1, num_heads=2)


def tiny_encoder(image_size=64, **kwargs):
    torch.manual_seed(0)
    return SIMLAImageEncoder("vit_tiny_patch16_224", image_size=image_size, pretrained=False, **TINY, **kwargs).eval()


def tiny_tokenizer(seed=0):
    return DVAETokenizer.random(n_hid=8, n_blk_per_group=1, vocab_size=8192, seed=seed)


# ---------------------------------------------------------------------------------------- the ViT


@pytest.mark.parametrize("size, grid", [(256, (16, 16)), (384, (24, 24))])
def test_grid_and_sequence_length(size, grid):
    encoder = tiny_encoder(size)
    assert encoder.grid_size == grid and encoder.num_patches == grid[0] * grid[1]
    out = encoder(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1 + grid[0] * grid[1], 16)  # [CLS] + 256 (257 tokens) / + 576 (577 tokens)


def test_defaults_follow_the_official_code():
    assert SIMLAImageEncoder.__init__.__defaults__[:2] == ("deit_base_patch16_224", 256)
    encoder = tiny_encoder()
    assert torch.count_nonzero(encoder.mask_token) == 0  # zeros, as the official code
    assert tiny_encoder(mask_token_init="trunc_normal").mask_token.abs().sum() > 0
    with pytest.raises(ValueError, match="model_config.simla.mask_token_init"):
        tiny_encoder(mask_token_init="normal")
    with pytest.raises(ValueError, match="model_config.simla.image_size"):
        tiny_encoder(image_size=70)


def test_mask_token_goes_in_before_the_position_embedding():
    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.mask_token.normal_()
    images = torch.randn(2, 3, 64, 64)
    other = images.clone()
    other[:, :, 16:32, 32:48] += 1.0  # patch (1, 2) = index 6 of the 4x4 grid
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 6] = True
    with torch.no_grad():
        assert torch.equal(encoder(images, mask), encoder(other, mask))
        assert not torch.allclose(encoder(images), encoder(other))
        assert not torch.allclose(encoder(images, mask), encoder(images))

    seen = {}
    handle = encoder.vit.norm_pre.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    with torch.no_grad():
        encoder(images, mask)
        handle.remove()
        expected = encoder.mask_token[0, 0] + encoder.vit.pos_embed[0, 1 + 6]
        torch.testing.assert_close(seen["x"][:, 1 + 6], expected.expand(2, -1))
        unmasked = encoder.vit.patch_embed(images)[:, 5] + encoder.vit.pos_embed[0, 1 + 5]
        torch.testing.assert_close(seen["x"][:, 1 + 5], unmasked)


def test_mask_is_checked():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match=r"bool of shape \(2, 16\)"):
        encoder(torch.randn(2, 3, 64, 64), torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="model_config.simla.mask_token"):
        tiny_encoder(mask_token=False)(torch.randn(2, 3, 64, 64), torch.zeros(2, 16, dtype=torch.bool))


def test_gradient_reaches_the_mask_token():
    encoder = tiny_encoder().train()
    mask = block_mask(2, grid=(4, 4), num_masked=5, min_block=2, generator=torch.Generator().manual_seed(0))
    encoder(torch.randn(2, 3, 64, 64), mask).square().sum().backward()
    assert encoder.mask_token.grad is not None and encoder.mask_token.grad.abs().sum() > 0


def test_224_weights_resampled_like_timm(tmp_path):
    source = tiny_encoder(224)  # the DeiT-style 14x14 grid
    state = {k[len("vit."):]: v for k, v in source.state_dict().items() if k.startswith("vit.")}
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)

    # timm's own pretrained path (create_model(pretrained=True) with a local file instead of the hub)
    path = str(tmp_path / "deit_tiny.pth")
    torch.save(state, path)
    loaded = SIMLAImageEncoder("vit_tiny_patch16_224", image_size=256, pretrained=True,
                               pretrained_cfg_overlay=dict(file=path), **TINY)
    torch.testing.assert_close(loaded.vit.pos_embed.data, expected)
    torch.testing.assert_close(loaded.vit.blocks[0].attn.qkv.weight.data, state["blocks.0.attn.qkv.weight"])

    # our explicit helper and state-dict loading agree with the independent call
    torch.testing.assert_close(resize_position_embeddings(state, (16, 16))["pos_embed"], expected)
    target = tiny_encoder(256)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.vit.pos_embed.data, expected)


def test_pretraining_checkpoint_into_a_384_finetuning_model():
    pretrained = tiny_encoder(256)
    with torch.no_grad():
        pretrained.mask_token.normal_()
    finetuning = tiny_encoder(384, mask_token=False)  # the official fine-tuning configs: no mask token
    finetuning.load_state_dict(pretrained.state_dict())  # strict: the mask token is dropped, pos_embed resampled
    expected = resample_abs_pos_embed(pretrained.vit.pos_embed.data, new_size=[24, 24], num_prefix_tokens=1)
    torch.testing.assert_close(finetuning.vit.pos_embed.data, expected)
    assert finetuning(torch.randn(1, 3, 384, 384)).shape == (1, 577, 16)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_position_embeddings({"pos_embed": torch.zeros(1, 1 + 12, 4)}, (4, 4))


# ---------------------------------------------------------------------------------------- block masking


def test_block_mask_counts_and_determinism():
    generator = torch.Generator().manual_seed(3)
    masks = block_mask(64, generator=generator)
    assert masks.shape == (64, 256) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert counts.max() <= 75 and counts.float().mean() >= 70  # BEiT: up to 75, short by less than one block
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) == 64  # different images, different masks
    assert torch.equal(block_mask(64, generator=torch.Generator().manual_seed(3)), masks)
    assert not torch.equal(block_mask(64, generator=generator), masks)  # the generator advances
    with pytest.raises(ValueError, match="mim_masked_patches"):
        block_mask(1, grid=(4, 4), num_masked=17)


def test_block_mask_is_a_union_of_rectangles():
    for seed in range(20):
        blocks = draw_mask_blocks(rng=random.Random(seed))
        union = torch.zeros(16, 16, dtype=torch.bool)
        for top, left, h, w in blocks:
            assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 16
            assert h * w <= 75 and 0.3 <= h / w <= 1 / 0.3 + 1  # the aspect range, up to rounding
            added = (~union[top:top + h, left:left + w]).sum()
            assert added > 0
            union[top:top + h, left:left + w] = True
        assert union.sum() <= 75
        generator = torch.Generator().manual_seed(seed)
        rng = vision._rng(torch.Generator().manual_seed(seed))  # block_mask's own draw from the same seed
        expected = torch.zeros(16, 16, dtype=torch.bool)
        for top, left, h, w in draw_mask_blocks(rng=rng):
            expected[top:top + h, left:left + w] = True
        assert torch.equal(block_mask(1, generator=generator)[0], expected.flatten())


# ---------------------------------------------------------------------------------------- the dVAE tokenizer


def test_released_encoder_layout():
    """The released encoder.pkl's layout (the ``dall-e`` 0.1 package's ``Encoder()``): 2 blocks per group,
    widths 256/512/1024/2048, 1x1 id paths where the width changes, 8192 logits."""
    state = DALLEEncoder(device="meta").state_dict()
    assert len(state) == 2 + 4 * 2 * 8 + 3 * 2 + 2
    shapes = {
        "blocks.input.w": (256, 3, 7, 7),
        "blocks.group_1.block_1.res_path.conv_1.w": (64, 256, 3, 3),
        "blocks.group_1.block_1.res_path.conv_4.w": (256, 64, 1, 1),
        "blocks.group_2.block_1.id_path.w": (512, 256, 1, 1),
        "blocks.group_2.block_2.res_path.conv_2.w": (128, 128, 3, 3),
        "blocks.group_4.block_1.id_path.b": (2048,),
        "blocks.group_4.block_2.res_path.conv_4.w": (2048, 512, 1, 1),
        "blocks.output.conv.w": (8192, 2048, 1, 1),
        "blocks.output.conv.b": (8192,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "blocks.group_1.block_1.id_path.w" not in state  # nn.Identity where the width is kept


def test_matches_the_dall_e_package():
    """Against the registry's package itself, where it is importable (it needs ``attrs``)."""
    dall_e_encoder = pytest.importorskip("dall_e.encoder")
    torch.manual_seed(0)
    reference = dall_e_encoder.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    ours = DALLEEncoder.from_state_dict(reference.state_dict())
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()]
    pixels = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ours(map_pixels(pixels)), reference(map_pixels(pixels)))


def test_tokens_line_up_with_the_vit_grid():
    tokenizer = tiny_tokenizer()
    pixels = torch.rand(2, 3, 128, 128)  # the official image_size // 2 view
    tokens = tokenizer(pixels)
    assert tokens.shape == (2, 256) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < 8192
    assert tokens.shape[1] == tiny_encoder(256).num_patches
    logits = tokenizer.encoder(0.8 * pixels + 0.1)  # map_pixels with eps 0.1
    assert torch.equal(tokens, logits.argmax(1).flatten(1))


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = tiny_encoder()
        self.tokenizer = tiny_tokenizer()


def test_tokenizer_is_frozen_and_outside_the_model():
    model = Parent().train()
    tokenizer = model.tokenizer
    assert all(not p.requires_grad for p in tokenizer.encoder.parameters())
    assert not tokenizer.encoder.training
    assert not any(k.startswith("tokenizer") for k in model.state_dict())
    assert set(model.state_dict()) == {"visual." + k for k in model.visual.state_dict()}
    tokenizer_ids = {id(p) for p in tokenizer.encoder.parameters()}
    assert not tokenizer_ids & {id(p) for p in model.parameters()}
    tokenizer.encoder.train()  # even if someone flips it
    tokens = tokenizer(torch.rand(1, 3, 32, 32).requires_grad_())
    assert not tokenizer.encoder.training and not tokens.requires_grad


def test_converter_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv("MMF_ZOO_ALLOW_PICKLE", raising=False)
    tokenizer = tiny_tokenizer(seed=5)
    pickled = str(tmp_path / "encoder.pkl")
    torch.save(tokenizer.encoder, pickled)  # a pickled module, as the released file
    out = str(tmp_path / "encoder.pth")
    assert vision.main(["convert-dvae", pickled, out, "--allow-pickle"]) == 0
    torch.load(out, weights_only=True)  # weights only
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    pixels = torch.rand(2, 3, 64, 64)
    assert torch.equal(DVAETokenizer.from_file(out)(pixels), tokenizer(pixels))


def test_converter_reads_dall_e_pickles_without_the_package(tmp_path, monkeypatch):
    """encoder.pkl names ``dall_e.encoder.Encoder`` etc.; the converter unpickles it without ``dall_e``."""
    monkeypatch.setenv("MMF_ZOO_ALLOW_PICKLE", "1")
    fakes = {name: types.ModuleType(name) for name in ("dall_e", "dall_e.encoder", "dall_e.utils")}
    mapping = {}
    for module, ours, name in [("dall_e.encoder", DALLEEncoder, "Encoder"),
                               ("dall_e.encoder", vision._EncoderBlock, "EncoderBlock"),
                               ("dall_e.utils", vision._Conv2d, "Conv2d")]:
        fake = type(name, (ours,), {"__module__": module, "__qualname__": name})
        setattr(fakes[module], name, fake)
        mapping[ours] = fake
    encoder = tiny_tokenizer(seed=7).encoder
    for module in encoder.modules():
        module.__class__ = mapping.get(type(module), type(module))
    pickled = str(tmp_path / "encoder.pkl")
    with monkeypatch.context() as patch:
        for name, module in fakes.items():
            patch.setitem(sys.modules, name, module)
        torch.save(encoder, pickled)
    out = str(tmp_path / "encoder.pth")
    with monkeypatch.context() as patch:
        for name in fakes:  # not importable while converting, even where the real package is installed
            patch.setitem(sys.modules, name, None)
        state = convert_dvae(pickled, out)
    assert state.keys() == encoder.state_dict().keys()
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = encoder(map_pixels(pixels)).argmax(1).flatten(1)
    assert torch.equal(DVAETokenizer.from_file(out)(pixels), expected)


def test_converter_refuses_a_pickle_without_the_opt_in(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MMF_ZOO_ALLOW_PICKLE", raising=False)
    pickled = str(tmp_path / "encoder.pkl")
    torch.save(tiny_tokenizer().encoder, pickled)
    out = str(tmp_path / "encoder.pth")
    assert vision.main(["convert-dvae", pickled, out]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not os.path.exists(out)
    with pytest.raises(UnsafeCheckpointError, match="MMF_ZOO_ALLOW_PICKLE=1"):
        convert_dvae(pickled, out)
    with pytest.raises(ValueError, match="convert-dvae"):
        DVAETokenizer.from_file(pickled)  # the tokenizer itself never unpickles modules
    with pytest.raises(ValueError, match="blocks.input.w"):
        DALLEEncoder.from_state_dict({"w": torch.zeros(1)})
