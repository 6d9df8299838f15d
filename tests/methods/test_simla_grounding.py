"""SIMLA's weakly supervised grounding (``training_head_type: grounding``, ``grounding.py``) on the tiny
configuration: the Grad-CAM map against the official computation written out here (the attention's gradient
caught by a tensor hook, as the official ``save_attn_gradients``), the box scoring against a loop over pixels,
the map in original-image coordinates, a proposal on the hot region winning, the layer key honoured, and the
evaluation forward under MMF's ``no_grad``."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mmf_multilevel.methods.simla import testing
from mmf_multilevel.methods.simla.grounding import (
    box_scores,
    check_gradcam_layer,
    gradcam_from_attention,
    grounding_scores,
    image_heatmap,
    itm_gradcam,
    proposal_scores,
)

pytestmark = pytest.mark.usefixtures("mmf_global_config")


def build(seed=0, **overrides):
    from mmf.common.registry import registry

    cls = registry.get_model_class("simla")
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.simla, testing.tiny_config("grounding"),
                             overrides)
    torch.manual_seed(seed)
    model = cls(config)
    model.build()
    model.init_losses()
    return model.eval()


def official_gradcam(model, batch, layer):
    """The official ``Grounding.py`` (``gradcam_mode='itm'``), written out: the cross-attention probabilities of
    ``layer`` saved by a forward hook, their gradient by a tensor hook when ``itm_logit[:, 1].sum()`` is
    backpropagated; ``cam[..., 1:] * mask`` times ``grad[..., 1:].clamp(min=0) * mask``, averaged over the heads,
    then over *all* L positions (padding included). Returns ``(maps (B, gh, gw), per-token maps, mask)`` with the
    token loop and head loop spelt out."""
    encoder = model.backbone.text_encoder
    saved = {}

    def keep(module, inputs, output):
        probs = output[1]
        saved["attention"] = probs
        probs.register_hook(lambda grad: saved.__setitem__("gradient", grad))

    handle = encoder.cross_attention[str(layer)].register_forward_hook(keep)
    try:
        image = model.backbone.image_encoder(batch.image.float()).detach()
        hidden = encoder.fuse(batch.input_ids, batch.input_mask, image, output_cross_attentions=True)[0]
        model.zero_grad()
        model.heads.itm_head(hidden[:, 0])[:, 1].sum().backward()
    finally:
        handle.remove()
    attention, gradient = saved["attention"].detach(), saved["gradient"].detach()
    batch_size, heads, length, keys = attention.shape
    grid = model.backbone.image_encoder.grid_size
    mask = batch.input_mask.float()
    maps = torch.zeros(batch_size, grid[0] * grid[1])
    tokens = torch.zeros(batch_size, length, grid[0] * grid[1])
    for b in range(batch_size):
        for t in range(length):
            row = torch.zeros(keys - 1)
            for h in range(heads):
                row += (attention[b, h, t, 1:] * mask[b, t]) * (gradient[b, h, t, 1:].clamp(min=0) * mask[b, t])
            tokens[b, t] = row / heads
            maps[b] += tokens[b, t] / length
    return maps.view(batch_size, *grid), tokens.view(batch_size, length, *grid), mask, gradient


@pytest.mark.parametrize("layer", [0, 1])
def test_gradcam_equals_the_official_computation(layer):
    model = build()
    batch = testing.tiny_batch("grounding", batch=4)
    expected, tokens, mask, gradient = official_gradcam(model, batch, layer)
    # the batch has padding and the gradient negative entries: the mask and the clamp are exercised
    assert (mask == 0).any() and (gradient < 0).any()
    image = model.backbone.image_encoder(batch.image)
    cam = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, image, batch.input_ids, batch.input_mask,
                      layer, model.backbone.image_encoder.grid_size)
    torch.testing.assert_close(cam.token_maps, tokens, rtol=1e-5, atol=1e-9)
    # the official divides by the padded length L, here by each expression's real token count: a positive
    # factor per expression, the same ranking of its proposals
    length = batch.input_ids.size(1)
    scale = length / mask.sum(dim=1)
    torch.testing.assert_close(cam.maps, expected * scale.view(-1, 1, 1), rtol=1e-5, atol=1e-9)
    assert cam.maps.shape == (4, 4, 4) and (cam.maps >= 0).all() and cam.maps.sum() > 0
    # the map is the real tokens' average of the per-token maps
    real = mask.bool()
    for b in range(4):
        torch.testing.assert_close(cam.maps[b], cam.token_maps[b][real[b]].mean(dim=0))
    # no parameter gradient is left behind by itm_gradcam (the official zero_grad + backward is replaced)
    model.zero_grad(set_to_none=True)
    itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, image, batch.input_ids, batch.input_mask, layer,
                model.backbone.image_encoder.grid_size)
    assert all(p.grad is None for p in model.parameters())


def test_in_the_last_layer_only_the_cls_row_has_a_gradient():
    """Only the last layer's [CLS] output reaches the ITM head: there the words' rows of the map are zero, which is
    why the maps are read from a layer before the last (the official 8 of 12; the demo's 0 of 2)."""
    model = build()
    batch = testing.tiny_batch("grounding", batch=4)
    image = model.backbone.image_encoder(batch.image)
    last = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, image, batch.input_ids, batch.input_mask,
                       1, (4, 4))
    assert last.token_maps[:, 0].sum() > 0 and not last.token_maps[:, 1:].any()
    first = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, image, batch.input_ids, batch.input_mask,
                        0, (4, 4))
    assert first.token_maps[:, 1:].sum() > 0


def test_gradcam_from_attention_drops_the_image_cls_column_and_refuses_mismatches():
    attention = torch.zeros(1, 2, 3, 5)
    gradient = torch.ones(1, 2, 3, 5)
    attention[..., 0] = 100.0  # the image [CLS] column: never part of the map
    attention[0, :, :, 4] = 1.0
    maps, _ = gradcam_from_attention(attention, gradient, torch.ones(1, 3), (2, 2))
    assert maps.tolist() == [[[0.0, 0.0], [0.0, 1.0]]]
    with pytest.raises(ValueError, match=r"1 \+ 3x3"):
        gradcam_from_attention(attention, gradient, torch.ones(1, 3), (3, 3))
    with pytest.raises(ValueError, match="text mask"):
        gradcam_from_attention(attention, gradient, torch.ones(1, 4), (2, 2))


def test_box_scores_equal_a_loop_over_pixels():
    """The official ``grounding_eval`` loop: ``mask[int(y):int(y+h), int(x):int(x+w)].sum() / (w*h)**0.5`` with
    ``x, y, w, h`` from each proposal, boxes partly outside the map included."""
    generator = torch.Generator().manual_seed(0)
    heat = torch.rand(37, 53, generator=generator) - 0.2
    corner = torch.rand(40, 2, generator=generator) * torch.tensor([60.0, 45.0])
    size = torch.rand(40, 2, generator=generator) * 30 + 0.5
    boxes = torch.cat([corner, corner + size], dim=1)
    boxes[0] = torch.tensor([0.0, 0.0, 53.0, 37.0])
    boxes[1] = torch.tensor([10.7, 3.2, 10.9, 3.9])  # inside one pixel column's start: an empty slice
    ours = box_scores(heat, boxes)
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        x, y, w, h = x1, y1, x2 - x1, y2 - y1
        expected = heat[int(y):int(y + h), int(x):int(x + w)].double().sum() / (w * h) ** 0.5
        assert float(ours[k]) == pytest.approx(float(expected), rel=1e-5, abs=1e-6), k
    assert float(box_scores(heat, torch.tensor([[5.0, 5.0, 5.0, 9.0]]))) == -math.inf  # no area: never chosen
    assert float(box_scores(heat, boxes[:1], exponent=1.0)) == pytest.approx(float(heat.double().sum()) / (53 * 37))


def test_the_heatmap_is_in_original_image_pixels():
    grid_map = torch.rand(4, 4, generator=torch.Generator().manual_seed(1))
    # no batch padding: the official upsampling to the original size
    heat = image_heatmap(grid_map, (64, 64), (64, 64), (90, 120))
    expected = F.interpolate(grid_map.view(1, 1, 4, 4), size=(90, 120), mode="bicubic", align_corners=False)[0, 0]
    torch.testing.assert_close(heat, expected)
    # the picture in the top half of a padded batch tensor: grid rows 0-1 cover it, rows 2-3 the padding
    hot = torch.zeros(4, 4)
    hot[1, 3] = 1.0
    heat = image_heatmap(hot, (64, 64), (32, 64), (90, 120))
    assert heat.shape == (90, 120)
    row, col = divmod(int(heat.argmax()), 120)
    assert 45 <= row < 90 and 90 <= col < 120


def test_a_proposal_covering_the_hot_region_wins_and_the_metric_counts_it():
    from mmf_multilevel.metrics import RefCOCOAccuracy

    maps = torch.full((2, 4, 4), 0.01)
    maps[0, 0, 0] = 1.0  # the top-left of image 0
    maps[1, 3, 2:] = 1.0  # the bottom middle-right of image 1
    original = torch.tensor([[80, 160], [120, 120]])
    boxes = torch.zeros(2, 5, 4)
    boxes[0, :3] = torch.tensor([[100.0, 40.0, 160.0, 80.0], [0.0, 0.0, 40.0, 20.0], [0.0, 0.0, 160.0, 80.0]])
    boxes[1, :3] = torch.tensor([[60.0, 90.0, 120.0, 120.0], [0.0, 0.0, 60.0, 60.0], [0.0, 0.0, 120.0, 120.0]])
    scores = proposal_scores(maps, (64, 64), torch.tensor([[64, 64]] * 2), original, boxes)
    assert scores.argmax(dim=1).tolist() == [1, 0]
    assert torch.isinf(scores[:, 3:]).all()  # padding
    batch = {"proposal_boxes": boxes, "num_proposals": torch.tensor([3, 3]),
             "gold_box": torch.stack([boxes[0, 1], boxes[1, 0]])}
    assert float(RefCOCOAccuracy().calculate(batch, {"scores": scores})) == 1.0
    batch["gold_box"] = torch.stack([boxes[0, 0], boxes[1, 0]])
    assert float(RefCOCOAccuracy().calculate(batch, {"scores": scores})) == 0.5


def test_the_evaluation_forward_scores_proposals_with_the_configured_layer_under_no_grad():
    batch = testing.tiny_batch("grounding", batch=4)
    batch.dataset_type = "val"
    outputs = {}
    for layer in (0, 1):
        model = build(gradcam_layer=layer)
        with torch.no_grad():  # as MMF's evaluation loop
            out = model(batch)
        assert {k.split("/")[-1] for k in out["losses"]} == {"itc", "itm"}
        assert out["scores"].shape == (4, 6)
        assert torch.isfinite(out["scores"][:, :5]).all() and torch.isinf(out["scores"][:, 5:]).all()
        assert all(p.grad is None for p in model.parameters())
        image = model.backbone.image_encoder(batch.image)
        cam = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, image, batch.input_ids,
                          batch.input_mask, layer, (4, 4))
        expected = proposal_scores(cam.maps, (64, 64), batch.image_size, torch.tensor([[90, 120]] * 4),
                                   batch.proposal_boxes)
        torch.testing.assert_close(out["scores"], expected)
        torch.testing.assert_close(grounding_scores(model, batch), expected)
        outputs[layer] = out["scores"][:, :5]
    assert not torch.allclose(outputs[0], outputs[1])


def test_training_gives_the_retrieval_losses_and_no_grad_cam():
    model = build().train()
    batch = testing.tiny_batch("grounding", batch=4)
    del batch["proposal_boxes"]  # no box in training
    out = model(batch)
    assert set(out["losses"]) == {"train/simla_contract/itc", "train/simla_contract/itm"}
    assert out["scores"].shape == (4, 2)


def test_bad_settings_and_batches_are_named():
    with pytest.raises(ValueError, match=r"model_config.simla.gradcam_layer must be a 0-based layer index in \[0, 1\]"):
        build(gradcam_layer=8)
    model = build()
    batch = testing.tiny_batch("grounding", batch=4)
    batch.dataset_type = "val"
    del batch["proposal_boxes"]
    with pytest.raises(KeyError, match="'proposal_boxes'"):
        with torch.no_grad():
            model(batch)


def test_the_heatmap_of_a_non_square_input_and_of_a_picture_padded_on_the_right():
    grid_map = torch.rand(3, 4, generator=torch.Generator().manual_seed(2))

    def bicubic(size):
        return F.interpolate(grid_map.view(1, 1, 3, 4), size=size, mode="bicubic", align_corners=False)[0, 0]

    torch.testing.assert_close(image_heatmap(grid_map, (48, 64), (48, 64), (90, 120)), bicubic((90, 120)))
    # the picture in the left half: upsampled to the input at the original's scale (90 x 240), cropped
    torch.testing.assert_close(image_heatmap(grid_map, (48, 64), (48, 32), (90, 120)), bicubic((90, 240))[:90, :120])
    torch.testing.assert_close(image_heatmap(grid_map, (48, 64), (24, 64), (90, 120)), bicubic((180, 120))[:90, :120])
    assert image_heatmap(grid_map, (48, 64), (48, 64), (1, 1)).shape == (1, 1)  # a one-pixel picture
    for content, original in (((0, 64), (90, 120)), ((48, 0), (90, 120)), ((48, 64), (0, 120)), ((48, 64), (90, 0))):
        with pytest.raises(ValueError, match="image_heatmap: empty picture"):
            image_heatmap(grid_map, (48, 64), content, original)


def test_proposal_scores_use_the_exponent_given():
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[[0.0, 0.0, 60.0, 40.0], [10.0, 5.0, 30.0, 80.0]]] * 2)
    sizes, original = torch.tensor([[64, 64]] * 2), torch.tensor([[90, 120]] * 2)
    scores = proposal_scores(maps, (64, 64), sizes, original, boxes, exponent=1.0)
    for b in range(2):
        heat = image_heatmap(maps[b], (64, 64), (64, 64), (90, 120))
        torch.testing.assert_close(scores[b], box_scores(heat, boxes[b], 1.0))
    assert not torch.allclose(scores, proposal_scores(maps, (64, 64), sizes, original, boxes))


def test_box_scores_clip_boxes_at_the_top_left_and_score_tiny_and_inverted_boxes_as_the_official_loop():
    heat = torch.rand(20, 30, generator=torch.Generator().manual_seed(4))
    # partly above / left of the map: the rows and columns inside it (not a wrap-around from the far side)
    expected = float(heat[:12, :10].double().sum()) / ((10 + 5.5) * (12 + 3.2)) ** 0.5
    assert float(box_scores(heat, torch.tensor([[-5.5, -3.2, 10.0, 12.0]]))) == pytest.approx(expected, rel=1e-6)
    # a box smaller than a pixel that straddles a pixel corner: that pixel over the box's own area
    tiny = float(box_scores(heat, torch.tensor([[10.9, 3.9, 11.1, 4.1]])))
    assert tiny == pytest.approx(float(heat[3, 10]) / (0.2 * 0.2) ** 0.5, rel=1e-5)
    # x2 < x1 and y2 < y1: a positive area but the official slices are empty
    assert float(box_scores(heat, torch.tensor([[12.0, 9.0, 4.0, 2.0]]))) == 0.0


def test_grounding_scores_read_the_picture_sizes_the_exponent_and_name_what_is_missing():
    """A padded batch (two pictures in the top half or the left half of the 64x64 tensor), a non-default box
    exponent, and a batch without ``image_size`` (the whole tensor is the picture)."""
    model = build(grounding_box_exponent=1.0)
    batch = testing.tiny_batch("grounding", batch=4)
    batch.dataset_type = "val"
    batch.image_size = torch.tensor([[32, 64], [64, 32], [64, 64], [64, 64]])
    original = torch.tensor([[90, 120]] * 4)
    cam = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, model.backbone.image_encoder(batch.image),
                      batch.input_ids, batch.input_mask, int(model.settings.gradcam_layer), (4, 4))
    expected = proposal_scores(cam.maps, (64, 64), batch.image_size, original, batch.proposal_boxes, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(grounding_scores(model, batch), expected)
        assert not torch.allclose(expected[:2, :5], proposal_scores(cam.maps, (64, 64), torch.tensor([[64, 64]] * 4),
                                                                    original, batch.proposal_boxes, 1.0)[:2, :5])
        del batch["image_size"]
        torch.testing.assert_close(grounding_scores(model, batch), proposal_scores(
            cam.maps, (64, 64), torch.tensor([[64, 64]] * 4), original, batch.proposal_boxes, 1.0))
        torch.testing.assert_close(cam.match_logits, model.heads.itm_head(model.backbone.text_encoder.fuse(
            batch.input_ids, batch.input_mask, model.backbone.image_encoder(batch.image))[:, 0])[:, 1])
        for key in ("image_height", "image_width"):
            info = batch.image_info_0
            kept = info[key]
            del info[key]
            with pytest.raises(KeyError, match="simla grounding needs 'image_info_0.image_height' and "
                                               "'image_info_0.image_width'"):
                grounding_scores(model, batch)
            info[key] = kept
        boxes = batch.proposal_boxes
        batch.proposal_boxes = None
        with pytest.raises(KeyError, match="simla grounding needs 'proposal_boxes' in the batch"):
            grounding_scores(model, batch)
        batch.proposal_boxes = boxes
        image = batch.image
        del batch["image"]
        with pytest.raises(KeyError, match="^.simla needs 'image'"):
            grounding_scores(model, batch)
        batch.image = image
        del batch["input_ids"]
        with pytest.raises(KeyError, match="simla"):
            grounding_scores(model, batch)


def test_gradcam_of_a_frozen_model_a_one_token_text_and_a_non_square_grid():
    model = build()
    batch = testing.tiny_batch("grounding", batch=4)
    image = model.backbone.image_encoder(batch.image)
    plain = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, image, batch.input_ids, batch.input_mask,
                        1, (4, 4))
    model.requires_grad_(False)  # no parameter in the graph: the image tokens carry it
    with torch.no_grad():
        frozen = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, image, batch.input_ids,
                             batch.input_mask, 1, (4, 4))
    torch.testing.assert_close(frozen.maps, plain.maps)
    attention = torch.rand(2, 3, 4, 1 + 3 * 4, generator=torch.Generator().manual_seed(1))
    gradient = torch.randn(2, 3, 4, 1 + 3 * 4, generator=torch.Generator().manual_seed(2))
    one = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]])
    maps, tokens = gradcam_from_attention(attention, gradient, one, (3, 4))
    expected = (attention[..., 1:] * gradient[..., 1:].clamp(min=0)).mean(1)
    assert maps.shape == (2, 3, 4) and tokens.shape == (2, 4, 3, 4)
    torch.testing.assert_close(maps[0], expected[0, 0].view(3, 4))  # one real token: its own row
    torch.testing.assert_close(maps[1], expected[1, :2].mean(0).view(3, 4))
    for bad in (1.5, True, 2, -1):
        with pytest.raises(ValueError, match="gradcam_layer must be a 0-based layer index in \\[0, 1\\]"):
            check_gradcam_layer(bad, 2)
