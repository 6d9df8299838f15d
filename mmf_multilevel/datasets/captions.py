"""Image-caption pre-training corpora on region features: COCO Captions, Visual Genome,
Conceptual Captions, SBU (``coco_captions``, ``vg_captions``, ``conceptual_captions``,
``sbu_captions``; any other corpus in the same format works with ``captions``).

Annotations: jsonl, one caption per line: ``{"image_id": "...", "caption": "..."}``
(extra fields are kept). Regions: the feature cache (``mmf_multilevel.features``), keyed by image id.

Each sample is masked for MLM by the ``text_processor`` (MMF's ``masked_token`` by
default: ``input_ids``, ``lm_label_ids`` with -1 where not masked, ``segment_ids``,
``input_mask``); with probability ``itm_probability`` its caption is replaced by
the caption of another image (``is_correct = 0``) for image-text matching; with
``region_mask_probability`` > 0 it carries masked-region decisions (``region_selected``,
``region_zeroed``, ``region_source``; see ``mmf_multilevel.datasets.pretraining``).
"""
import os

from mmf.common.registry import registry
from mmf.datasets.base_dataset_builder import BaseDatasetBuilder

from mmf_multilevel.datasets.base import RegionTextDataset, setting, text_fields
from mmf_multilevel.datasets.pretraining import MatchingPairs, RegionMaskingSamples
from mmf_multilevel.paths import DATASET_CONFIG_DIR
from mmf_multilevel.registration import register_variants

CONFIG_DIR = DATASET_CONFIG_DIR


def _check_caption(record):
    caption = record.get("caption")
    if not isinstance(caption, str):
        return f"field 'caption' must be a string, got {type(caption).__name__}"
    if not caption.strip():
        return "empty caption"
    return None


class CaptionSamples(MatchingPairs):
    """The text side of a caption corpus, shared by the region and the raw-image datasets.

    ``validate_record`` checks the caption; ``add_caption(record, sample, view)`` puts it through the
    ``text_processor`` (MLM-masked by ``masked_token``) - replaced, with probability ``itm_probability``,
    by a caption of another image (``is_correct = 0``, :class:`~mmf_multilevel.datasets.pretraining.MatchingPairs`) -
    after ``view`` (the raw-image datasets swap left/right there when the image was flipped); with
    ``itm_targets`` it also sets ``targets = is_correct`` for MMF's losses and metrics.
    """

    def init_captions(self, config):
        self.init_matching(config)
        self.itm_targets = bool(setting(config, "itm_targets", self.dataset_name))

    def validate_record(self, record):
        return _check_caption(record)

    def add_caption(self, record, sample, view=None):
        import torch

        caption, is_correct = self.draw_text(record, "caption")
        if view is not None:
            caption = view(caption)
        sample.update(text_fields(self.text_processor, caption))
        sample.is_correct = torch.tensor(is_correct, dtype=torch.long)
        if self.itm_targets:  # MMF's losses and metrics read `targets`: image-text matching as 2-way classification
            sample.targets = sample.is_correct.clone()
        sample.caption = caption
        return sample


class CaptionDataset(CaptionSamples, RegionMaskingSamples, RegionTextDataset):
    """Captions on region features; masked regions drawn per sample (``region_mask_probability``)."""

    required_fields = ("image_id", "caption")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.init_captions(config)

    def build_sample(self, record, sample):
        self.add_caption(record, sample, self.view_text)
        self.add_region_masking(sample)
        return sample


class CaptionBuilder(BaseDatasetBuilder):
    name = "captions"

    def __init__(self):
        super().__init__(self.name)

    @classmethod
    def config_path(cls):
        return os.path.join(CONFIG_DIR, "captions", f"{cls.name}.yaml")

    def build(self, config, dataset_type="train", *args, **kwargs):
        return None

    def load(self, config, dataset_type="train", *args, **kwargs):
        if dataset_type not in config.annotations:
            raise KeyError(f"dataset_config.{self.dataset_name}.annotations has no '{dataset_type}' split")
        return CaptionDataset(self.dataset_name, config, dataset_type)

    def update_registry_for_model(self, config):
        return None


register_variants(registry.register_builder, CaptionBuilder, {
    name: {"name": name} for name in ("captions", "coco_captions", "vg_captions", "conceptual_captions", "sbu_captions")
}, suffix="Builder")
