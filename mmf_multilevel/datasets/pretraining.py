"""What the pre-training corpora add to a sample, written once for every corpus and every method.

The masking rule (``docs/ARCHITECTURE.md``): datasets and processors emit model-ready inputs and
targets; a model masks only what depends on its own forward pass. For the region datasets that are
pre-training corpora (captions, VQA v2, GQA, VG-QA) that means:

* **text** - the ``text_processor`` masks it: MMF's ``masked_token`` processor gives ``input_ids``
  with [MASK] / random / kept words and ``lm_label_ids`` (-1 where nothing is predicted); the
  ``bert_tokenizer`` of fine-tuning masks nothing and no ``lm_label_ids`` travel;
* **image-text matching** (:class:`MatchingPairs`) - with probability ``itm_probability`` the text
  (a caption, or a question as LXMERT does) is replaced by the text of another image's record:
  ``is_correct`` 0, else 1. A mismatched sample still carries its MLM / region / QA targets; the
  methods count no loss but ITM on it (SemVLP paper §3.3.1, LXMERT §3.3);
* **masked regions** (:class:`RegionMaskingSamples`) - with ``region_mask_probability`` > 0, each real
  region is selected with that probability; of the selected, ``region_zero_ratio`` are zeroed and
  ``region_random_ratio`` take the feature of another region of the same image
  (:func:`~mmf_multilevel.modules.masking.draw_region_masking`). The sample carries the decisions
  (``region_selected``, ``region_zeroed``, ``region_source``) and ``image_feature_0`` stays the
  original: it is the regression target, and the batch contract
  (``region_inputs`` in the methods' batch.py) applies the decisions once for the network.

Every key is read from the dataset's config (its defaults yaml under ``configs/datasets`` holds the
value); a missing key is an error naming ``dataset_config.<dataset>.<key>``.
"""
import random

import torch

from mmf_multilevel.datasets.base import masks_text, setting, text_fields
from mmf_multilevel.modules.masking import draw_region_masking

__all__ = ["MatchingPairs", "RegionMaskingSamples", "QuestionSamples", "mask_sample_regions", "masks_text", "text_fields"]


def mask_sample_regions(sample, prob, zero_ratio=1.0, random_ratio=0.0):
    """Draw masked-region decisions over ``sample``'s real regions (``image_info_0.max_features`` of its
    ``image_feature_0`` rows) with ``prob`` (a number, or a ``(max_features,)`` tensor of per-region
    probabilities) and set ``region_selected`` / ``region_zeroed`` (bool) and ``region_source`` (long,
    -1 = not replaced); returns ``region_selected``."""
    count = int(sample.image_info_0.max_features)
    real = (torch.arange(sample.image_feature_0.size(0)) < count).unsqueeze(0)
    if isinstance(prob, torch.Tensor):
        prob = prob.unsqueeze(0)
    masking = draw_region_masking(real, prob, zero_ratio=zero_ratio, random_ratio=random_ratio)
    sample.region_selected, sample.region_zeroed, sample.region_source = (row[0] for row in masking)
    return sample.region_selected


class MatchingPairs:
    """Image-text matching pairs: ``init_matching(config)`` reads ``itm_probability``;
    ``draw_text(record, field)`` -> ``(text, is_correct)``: the record's own text, or with probability
    ``itm_probability`` the ``field`` of a record of another image (``is_correct`` 0)."""

    image_field = "image_id"
    itm_probability = 0.0

    def init_matching(self, config):
        self.itm_probability = float(setting(config, "itm_probability", self.dataset_name))
        if not 0.0 <= self.itm_probability <= 1.0:
            raise ValueError(f"dataset_config.{self.dataset_name}.itm_probability must lie in [0, 1], "
                             f"got {self.itm_probability}")

    def _other_image_text(self, image_id, field):
        if len(self.records) < 2:
            return None
        for _ in range(10):
            other = self.records[random.randrange(len(self.records))]
            if str(other[self.image_field]) != image_id:
                return other[field]
        return None

    def draw_text(self, record, field):
        if self.itm_probability > 0 and random.random() < self.itm_probability:
            other = self._other_image_text(str(record[self.image_field]), field)
            if other is not None:
                return other, 0
        return record[field], 1


class RegionMaskingSamples:
    """Masked-region decisions for a region sample (see the module docstring).

    ``init_region_masking(config)`` (called when the region cache is opened) reads ``region_mask_probability``, ``region_zero_ratio`` and
    ``region_random_ratio``; ``add_region_masking(sample)`` sets ``region_selected`` /
    ``region_zeroed`` (bool) and ``region_source`` (long, -1 = not replaced), each ``(max_features,)``,
    when the probability is above 0.
    """

    region_mask_probability = 0.0

    def open_visual(self, config, dataset_type, index):
        # region datasets only: a raw-image twin replaces open_visual and never masks regions
        super().open_visual(config, dataset_type, index)
        self.init_region_masking(config)

    def init_region_masking(self, config):
        name = self.dataset_name
        self.region_mask_probability = float(setting(config, "region_mask_probability", name))
        self.region_zero_ratio = float(setting(config, "region_zero_ratio", name))
        self.region_random_ratio = float(setting(config, "region_random_ratio", name))
        if not 0.0 <= self.region_mask_probability <= 1.0:
            raise ValueError(f"dataset_config.{name}.region_mask_probability must lie in [0, 1], "
                             f"got {self.region_mask_probability}")
        if min(self.region_zero_ratio, self.region_random_ratio) < 0 or self.region_zero_ratio + self.region_random_ratio > 1:
            raise ValueError(f"dataset_config.{name}.region_zero_ratio ({self.region_zero_ratio}) and region_random_ratio "
                             f"({self.region_random_ratio}) must be non-negative and sum to at most 1")

    def add_region_masking(self, sample):
        """Draw the decisions over the sample's real regions (:func:`mask_sample_regions`) when
        ``region_mask_probability`` > 0."""
        if self.region_mask_probability > 0:
            mask_sample_regions(sample, self.region_mask_probability, self.region_zero_ratio, self.region_random_ratio)


class QuestionSamples(MatchingPairs, RegionMaskingSamples):
    """A QA dataset's question as a pre-training sample (VQA v2, GQA, VG-QA): ``add_question(record,
    sample)`` - the record's question, or another image's with ``itm_probability`` (then ``is_correct``
    travels), through the text processor (MLM-masked by ``masked_token``), seen as the image shows it
    (``view_text``), with the masked-region decisions when ``region_mask_probability`` > 0."""

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.init_matching(config)

    def add_question(self, record, sample):
        question, is_correct = self.draw_text(record, "question")
        sample.update(text_fields(self.text_processor, self.view_text(question)))
        if self.itm_probability > 0:
            sample.is_correct = torch.tensor(is_correct, dtype=torch.long)
        self.add_region_masking(sample)
        return sample
