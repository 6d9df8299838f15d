"""MVPTR's grounding picture (mmf_multilevel/methods/mvptr/picture.py): the phrase-region scores against an
independent computation from the network's stages, and the drawing (one panel per phrase, every real region
a box, the best ones thick, coloured by score)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mmf_multilevel.methods.mvptr.picture import draw_grounding, grounding_scores
from mmf_multilevel.methods.mvptr.testing import tiny_batch, tiny_config

pytestmark = pytest.mark.usefixtures("mmf_global_config")


def model():
    from mmf.common.registry import registry

    cls = registry.get_model_class("mvptr")
    torch.manual_seed(0)
    built = cls(OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.mvptr, tiny_config("pretraining")))
    built.build()
    return built.eval()


def test_scores_are_the_cosine_of_phrase_and_region_outputs_of_the_pair():
    net_model = model()
    batch = tiny_batch("pretraining")
    positions, scores, region_mask = grounding_scores(net_model, batch)
    net = net_model.backbone
    from mmf_multilevel.methods.batch import region_inputs

    regions = region_inputs(batch, "mvptr", 16, "6d")
    with torch.no_grad():
        text = net.encode_text(batch.input_ids[:1], batch.input_mask[:1])
        visual, vmask = net.encode_visual(batch.tag_ids[:1], batch.tag_mask[:1], regions.features[:1],
                                          regions.boxes[:1], regions.mask[:1])
        states, _, mask = net.fuse(text, batch.input_mask[:1], visual, vmask)
    width = batch.input_ids.size(1)
    want_positions = batch.phrase_slots[0].nonzero().view(-1)
    assert positions.tolist() == want_positions.tolist() and len(positions) == 2
    for p, position in enumerate(want_positions.tolist()):
        for k in range(regions.features.size(1)):
            want = F.cosine_similarity(states[0, position], states[0, width + k], dim=0)
            assert scores[p, k].item() == pytest.approx(want.item(), abs=1e-5)
    assert region_mask.tolist() == regions.mask[0].bool().tolist()


def test_drawing_has_a_panel_per_phrase_and_the_best_boxes_thick():
    boxes = np.array([[10, 10, 50, 40], [60, 20, 90, 70], [5, 50, 40, 95]], dtype=float)
    scores = np.array([[0.9, 0.1, -0.2], [0.0, 0.5, 0.7]])
    figure = draw_grounding(None, (100, 100), boxes, ["circle", "circle red"], scores, top=1)
    panels = [a for a in figure.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["circle", "circle red"]
    for p, axes in enumerate(panels):
        widths = [patch.get_linewidth() for patch in axes.patches]
        assert len(widths) == 3 and sorted(widths) == [1.0, 1.0, 3.0]
        thick = max(axes.patches, key=lambda patch: patch.get_linewidth())
        assert tuple(thick.get_xy()) == tuple(boxes[int(np.argmax(scores[p]))][:2])
        assert [t.get_text() for t in axes.texts] == [f"{scores[p].max():.2f}"]
    with pytest.raises(ValueError, match="one name per score row"):
        draw_grounding(None, (100, 100), boxes, ["a"], scores)
