"""SOHO's pre-training corpora: each image with two matched and two mismatched texts in a batch
(paper §4.1 and Appendix A.2: "an image will be paired with four texts in each batch during
pre-training, including two positive pairs and two negative pairs"; the image goes through the CNN once).

* ``soho_coco_captions``, ``soho_vg_captions`` (and ``soho_captions``, a corpus given entirely by its
  config): one sample per **image**, an epoch being one pass over the images. A sample holds the
  picture and ``captions_per_image`` of its captions drawn without replacement (with replacement when it
  has fewer), each through the ``masked_token`` text processor (``input_ids`` / ``lm_label_ids`` of shape
  ``(captions_per_image, T)``).
* :meth:`SOHOCaptionsDataset.collate_fn` pads the images to the batch's largest
  (:func:`~mmf_multilevel.datasets.images.collate_images`) and lays the texts out as pairs
  (:func:`~mmf_multilevel.methods.soho.pretraining.compose_itm_pairs`): per image ``num_positive`` of
  its own captions (``is_correct`` 1) and ``num_negative`` captions of other images of the batch
  (``is_correct`` 0), with ``pair_image_index`` naming each text's image, all under ``pairs`` (MMF's
  ``SampleList`` wants one row per image at its top level) - what the ``soho`` model reads.
  The masked words travel with the texts; the model puts them back for the matching pass and predicts
  them on matched pairs only.
"""
import os
import random

import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample

from mmf_multilevel.datasets.base import setting, text_fields
from mmf_multilevel.datasets.captions import _check_caption
from mmf_multilevel.datasets.images import ImageTextDataset, collate_images
from mmf_multilevel.methods.soho.pretraining import compose_itm_pairs
from mmf_multilevel.registration import register_variants

__all__ = ["SOHOCaptionsDataset", "CONFIG_DIR", "TEXT_FIELDS"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
#: the per-caption tensors a sample stacks and the collation lays out as pairs
TEXT_FIELDS = ("input_ids", "input_mask", "segment_ids", "lm_label_ids")


class SOHOCaptionsDataset(ImageTextDataset):
    """A caption corpus (jsonl ``{"image_id", "caption"}``, one record per caption) read per image."""

    required_fields = ("image_id", "caption")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.captions_per_image = int(setting(config, "captions_per_image", dataset_name))
        self.num_positive = int(setting(config, "num_positive", dataset_name))
        self.num_negative = int(setting(config, "num_negative", dataset_name))
        if self.captions_per_image < 1 or not 0 <= self.num_positive <= self.captions_per_image:
            raise ValueError(f"dataset_config.{dataset_name}: captions_per_image must be positive and num_positive "
                             f"within [0, captions_per_image], got {self.captions_per_image} / {self.num_positive}")
        if self.num_negative < 0:
            raise ValueError(f"dataset_config.{dataset_name}.num_negative must be non-negative, got {self.num_negative}")
        groups = {}
        for record in self.records:
            groups.setdefault(str(record[self.image_field]), []).append(record["caption"])
        self.images = list(groups.items())

    def validate_record(self, record):
        return _check_caption(record)

    def __len__(self):
        return len(self.images)

    def _build(self, idx):
        image_id, captions = self.images[idx]
        sample = Sample()
        sample.id = torch.tensor(idx, dtype=torch.long)
        sample.image_id = image_id
        flipped = self.image_fields(image_id, sample)
        k = self.captions_per_image
        picks = random.sample(captions, k) if len(captions) >= k else random.choices(captions, k=k)
        texts = [text_fields(self.text_processor, self.text_for_image(caption, flipped)) for caption in picks]
        for key in TEXT_FIELDS:
            if key in texts[0]:
                sample[key] = torch.stack([torch.as_tensor(text[key]) for text in texts])
        return sample

    def collate_fn(self, samples):
        """Images padded to the batch's largest; the texts as pairs under ``pairs`` (a nested
        ``SampleList``: its tensors have one row per pair, the batch's one row per image)."""
        from mmf.common.sample import SampleList

        batch = collate_images(samples, self.dataset_name, self.dataset_type)
        count = len(samples)
        layout = compose_itm_pairs(count, self.captions_per_image, self.num_positive,
                                   self.num_negative if count > 1 else 0)
        pairs = SampleList()
        for key in TEXT_FIELDS:
            if key in batch:
                flat = batch.pop(key).reshape(count * self.captions_per_image, -1)
                pairs[key] = flat[layout["pair_text_index"]]
        pairs.pair_image_index = layout["pair_image_index"]
        pairs.is_correct = layout["is_correct"]
        batch.pairs = pairs
        return batch


def _builders():
    from mmf_multilevel.datasets.captions import CaptionBuilder

    class SOHOCaptionsBuilder(CaptionBuilder):
        name = "soho_captions"

        @classmethod
        def config_path(cls):
            return os.path.join(CONFIG_DIR, f"{cls.name}.yaml")

        def load(self, config, dataset_type="train", *args, **kwargs):
            if dataset_type not in config.annotations:
                raise KeyError(f"dataset_config.{self.dataset_name}.annotations has no '{dataset_type}' split")
            return SOHOCaptionsDataset(self.dataset_name, config, dataset_type)

    names = ("soho_captions", "soho_coco_captions", "soho_vg_captions")
    return register_variants(registry.register_builder, SOHOCaptionsBuilder, {name: {"name": name} for name in names},
                             suffix="Builder")


_builders()
