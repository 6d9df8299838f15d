"""Image-caption pre-training corpora on region features: COCO Captions, Visual Genome,
Conceptual Captions, SBU (``coco_captions``, ``vg_captions``, ``conceptual_captions``,
``sbu_captions``; any other corpus in the same format works with ``captions``).

Annotations: jsonl, one caption per line: ``{"image_id": "...", "caption": "..."}``
(extra fields are kept). Regions: the feature cache (``mmf_multilevel.features``), keyed by image id.

Each sample is masked for MLM by the ``text_processor`` (MMF's ``masked_token`` by
default: ``input_ids``, ``lm_label_ids`` with -1 where not masked, ``segment_ids``,
``input_mask``) and, with probability ``itm_probability``, its caption is replaced by
the caption of another image (``is_correct = 0``) for image-text matching.
"""
import os
import random

from mmf.common.registry import registry
from mmf.datasets.base_dataset_builder import BaseDatasetBuilder

from mmf_multilevel.datasets.base import RegionTextDataset
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


class CaptionSamples:
    """The text side of a caption corpus, shared by the region and the raw-image datasets.

    ``validate_record`` checks the caption; ``add_caption(record, sample, view)`` MLM-masks it through
    the ``text_processor`` - replaced, with probability ``itm_probability``, by a caption of another
    image (``is_correct = 0``) - after ``view`` (the raw-image datasets swap left/right there when
    the image was flipped); with ``itm_targets`` it also sets ``targets = is_correct`` for MMF's
    losses and metrics.
    """

    image_field = "image_id"

    def init_captions(self, config):
        self.itm_probability = float(config.get("itm_probability") or 0.0)
        self.itm_targets = bool(config.get("itm_targets", False))

    def validate_record(self, record):
        return _check_caption(record)

    def _mismatched_caption(self, image_id):
        if len(self.records) < 2:
            return None
        for _ in range(10):
            other = self.records[random.randrange(len(self.records))]
            if str(other[self.image_field]) != image_id:
                return other["caption"]
        return None

    def add_caption(self, record, sample, view=None):
        import torch

        caption, is_correct = record["caption"], 1
        if self.itm_probability > 0 and random.random() < self.itm_probability:
            other = self._mismatched_caption(str(record[self.image_field]))
            if other is not None:
                caption, is_correct = other, 0
        if view is not None:
            caption = view(caption)
        processed = self.text_processor({"text_a": caption, "text": caption, "is_correct": is_correct})
        processed.pop("tokens", None)
        processed.pop("text", None)
        sample.update(processed)
        if "is_correct" not in sample:
            sample.is_correct = torch.tensor(is_correct)
        if self.itm_targets:  # MMF's losses and metrics read `targets`: image-text matching as 2-way classification
            sample.targets = torch.as_tensor(sample.is_correct).long()
        sample.caption = caption
        return sample


class CaptionDataset(CaptionSamples, RegionTextDataset):
    required_fields = ("image_id", "caption")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.init_captions(config)

    def build_sample(self, record, sample):
        return self.add_caption(record, sample, self.view_text)


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
