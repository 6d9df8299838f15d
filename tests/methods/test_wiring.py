"""The wiring between a batch, the adapters and the losses - each test names the regression it
catches (they were red against a copy of the code with that defect put in):

* the region-feature regression target must be the original features, never the masked ones;
* SemVLP's adapter computes MLM / masked-object losses on matched pairs only;
* masked-object labels are the cache's detector labels (``objects``, else argmax ``cls_prob``);
* SemVLP's two-stream cross-attention honours the text padding mask.
"""
import pytest
import torch
from omegaconf import OmegaConf

from mmf_multilevel.methods.muvla import model as muvla_model
from mmf_multilevel.methods.muvla import testing as muvla_testing
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.semvlp import model as semvlp_model
from mmf_multilevel.methods.semvlp import testing as semvlp_testing

pytestmark = pytest.mark.usefixtures("mmf_global_config")


def build(module, testing, name, **overrides):
    cls = semvlp_model.SemVLP if name == "semvlp" else muvla_model.MuVLA
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config[name], testing.tiny_config("pretraining"),
                             overrides)
    torch.manual_seed(0)
    model = cls(config)
    model.build()
    model.init_losses()
    model.train()
    model.on_update_start(TrainingProgress(update=0, epoch=1))  # update 0: single-stream (alternate)
    return model


def spy_on_losses(monkeypatch, module):
    seen = {}
    original = module.pretraining_losses

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "pretraining_losses", spy)
    return seen


def test_semvlp_regresses_the_original_features_not_the_masked_ones(monkeypatch):
    model = build(semvlp_model, semvlp_testing, "semvlp")
    seen = spy_on_losses(monkeypatch, semvlp_model)
    fed = {}
    hook = model.backbone.objects.register_forward_hook(lambda m, args, out: fed.update(features=args[0].clone()))
    batch = semvlp_testing.tiny_batch("pretraining")
    torch.manual_seed(3)
    model(batch)
    hook.remove()
    selected = seen["object_selected"]
    assert selected.any()
    assert torch.equal(seen["object_targets"], batch.image_feature_0.float())  # the target: unmasked
    assert (fed["features"][selected] == 0).all()  # what the network saw: masked
    assert not (seen["object_targets"][selected] == 0).all()


def test_muvla_regresses_the_original_features_not_the_zeroed_ones(monkeypatch):
    model = build(muvla_model, muvla_testing, "muvla", pretraining=dict(is_mrm=True))
    seen = spy_on_losses(monkeypatch, muvla_model)
    batch = muvla_testing.tiny_batch("pretraining")
    batch.region_selected = torch.zeros(3, muvla_testing.REGIONS, dtype=torch.bool)
    batch.region_selected[:, 1] = True
    batch.region_zeroed = batch.region_selected.clone()
    batch.region_source = torch.full((3, muvla_testing.REGIONS), -1)
    batch.mrc_labels = torch.ones(3, muvla_testing.REGIONS, dtype=torch.long)
    fed = {}
    hook = model.backbone.regions.register_forward_hook(lambda m, args, out: fed.update(features=args[0].clone()))
    model(batch)
    hook.remove()
    assert torch.equal(seen["region_targets"], batch.image_feature_0.float())
    assert (fed["features"][:, 1] == 0).all() and not (seen["region_targets"][:, 1] == 0).all()


def test_semvlp_counts_no_mlm_or_object_loss_on_mismatched_pairs():
    """Changing everything about the mismatched pair (its words, labels, features, boxes) leaves the
    MLM and masked-object losses unchanged: they only come from matched pairs (paper §3.3.1)."""
    model = build(semvlp_model, semvlp_testing, "semvlp")
    model.eval()  # no dropout; the masks are the batch's (drawn by the dataset)
    batch = semvlp_testing.tiny_batch("pretraining")
    assert batch.is_correct.tolist() == [1, 0, 1]

    def losses(b):
        torch.manual_seed(11)
        out = model.pretraining_forward(b)["losses"]
        return {k.rsplit("/", 1)[-1]: v for k, v in out.items()}

    before = losses(batch)
    changed = semvlp_testing.tiny_batch("pretraining")
    g = torch.Generator().manual_seed(5)
    changed.lm_label_ids[1] = torch.where(changed.lm_label_ids[1] >= 0,
                                          torch.randint(5, 40, changed.lm_label_ids[1].shape, generator=g), -1)
    changed.image_feature_0[1] = torch.rand(changed.image_feature_0[1].shape, generator=g) * 7
    changed.image_info_0.objects[1] = (changed.image_info_0.objects[1] + 1) % semvlp_testing.CLASSES
    after = losses(changed)
    for name in ("mlm", "mrfr", "mrc"):
        torch.testing.assert_close(after[name], before[name], msg=name)
    assert not torch.equal(after["itm"], before["itm"])  # ITM does see the mismatched pair


@pytest.mark.parametrize("source", ["objects", "cls_prob"])
def test_semvlp_object_labels_are_the_detector_labels(monkeypatch, source):
    model = build(semvlp_model, semvlp_testing, "semvlp")
    seen = spy_on_losses(monkeypatch, semvlp_model)
    batch = semvlp_testing.tiny_batch("pretraining")
    expected = batch.image_info_0.objects.clone()
    if source == "cls_prob":  # no objects field: the argmax of the class probabilities
        expected = batch.image_info_0.cls_prob.argmax(-1)
        del batch.image_info_0["objects"]
    model(batch)
    assert torch.equal(seen["object_labels"], expected)


@pytest.mark.parametrize("mode", ["two", "single"])
def test_semvlp_text_padding_never_reaches_the_objects(mode):
    """Whatever sits in the padded text positions, no real output changes: the self-attention and the
    two-stream cross-attention both honour the text mask."""
    model = build(semvlp_model, semvlp_testing, "semvlp")
    model.eval()
    batch = semvlp_testing.tiny_batch("classification")
    padded = batch.input_mask == 0
    assert padded.any()
    with torch.no_grad():
        base = model.encode(batch, mode=mode)
        other = semvlp_testing.tiny_batch("classification")
        other.input_ids = other.input_ids.masked_fill(padded, 17)  # real words where the mask says padding
        other.segment_ids = other.segment_ids.masked_fill(padded, 1)
        moved = model.encode(other, mode=mode)
    torch.testing.assert_close(moved["objects"], base["objects"])
    torch.testing.assert_close(moved["pooled"], base["pooled"])
    real = batch.input_mask.bool()
    torch.testing.assert_close(moved["text"][real], base["text"][real])
