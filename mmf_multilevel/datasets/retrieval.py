"""Image-text retrieval on region features: ``datasets=coco_retrieval`` (COCO 5k test, Karpathy
split) and ``datasets=flickr30k_retrieval`` (Flickr30K 1k test).

Annotations: jsonl, one image per line: ``{"image_id": "...", "captions": ["...", ...]}``.

* ``train``: one sample per (image, caption); with probability ``itm_probability`` the caption is
  replaced by one of another image (``targets`` 0, else 1) for a matching head. Every sample also
  carries ``image_index`` and ``text_index`` so a model that mines hard negatives in the batch
  (``mmf_multilevel.modules.task_heads.sample_hard_negatives``) can tell which pairs match.
* ``val`` / ``test`` (``eval_pairs: all``): one sample per (image, caption) pair of the gallery -
  ``num_images x num_captions`` of them, fed through the model in ordinary batches (so no more
  than one batch of pairs is ever in memory) - with ``pair_image_index``, ``pair_text_index`` and
  ``targets`` (1 for a matching pair). The ``retrieval_*`` metrics gather the scores of all
  ranks and report text→image (``ir_r1/5/10``) and image→text (``tr_r1/5/10``) recall and RSUM.
  Two-stage scoring (contrastive top-k, then the matching head) needs a model with embeddings:
  ``mmf_multilevel.evaluation.retrieval.two_stage_scores``.
* ``eval_pairs: aligned``: ``val`` / ``test`` read as ``train`` does, without swaps (one sample per
  caption with its own image, ``image_index`` / ``text_index``): the validation losses of a model that
  mines negatives in the batch, when the gallery is ranked by a separate command.
"""
import random

import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample

from mmf_multilevel.datasets.base import RegionTaskBuilder, RegionTextDataset, setting, tokenize


class RetrievalDataset(RegionTextDataset):
    required_fields = ("image_id", "captions")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.itm_probability = float(setting(config, "itm_probability", dataset_name))
        self.eval_pairs = str(setting(config, "eval_pairs", dataset_name))
        if self.eval_pairs not in ("all", "aligned"):
            raise ValueError(f"dataset_config.{dataset_name}.eval_pairs must be 'all' or 'aligned', got {self.eval_pairs!r}")
        self.texts = [(i, caption) for i, record in enumerate(self.records) for caption in record["captions"]]
        if not self.texts:
            raise ValueError(f"{self.annotation_path}: the retrieval gallery has no captions")
        self.text_image = torch.tensor([i for i, _ in self.texts], dtype=torch.long)
        # "aligned" evaluation reads the split as training does (one sample per caption with its own image,
        # no swap): the validation losses of a model that mines its negatives in the batch
        self.training = dataset_type == "train" or self.eval_pairs == "aligned"
        if dataset_type != "train" and self.eval_pairs == "aligned":
            self.itm_probability = 0.0
        self._tokens = {}

    def validate_record(self, record):
        captions = record.get("captions")
        if not isinstance(captions, list) or not captions:
            return "field 'captions' must be a non-empty list of strings"
        for position, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                return f"field 'captions'[{position}] must be a non-empty string"
        return None

    @property
    def num_images(self):
        return len(self.records)

    @property
    def num_texts(self):
        return len(self.texts)

    def ground_truth(self):
        """``(num_images, num_texts)`` bool: caption ``t`` describes image ``i`` (each caption one image)."""
        gt = torch.zeros(self.num_images, self.num_texts, dtype=torch.bool)
        gt[self.text_image, torch.arange(self.num_texts)] = True
        return gt

    def __len__(self):
        return self.num_texts if self.training else self.num_images * self.num_texts

    def _text(self, index):
        tokens = self._tokens.get(index)
        if tokens is None:
            tokens = tokenize(self.text_processor, self.texts[index][1])
            if not self.training:  # the gallery's captions are tokenised once, then reused
                self._tokens[index] = tokens
        return tokens

    def __getitem__(self, idx):
        if self.training:
            image, text = self.texts[idx][0], idx
            if self.itm_probability > 0 and self.num_images > 1 and random.random() < self.itm_probability:
                while True:
                    text = random.randrange(self.num_texts)
                    if self.texts[text][0] != image:
                        break
        else:
            image, text = divmod(idx, self.num_texts)
        sample = Sample()
        record = self.records[image]
        sample.id = torch.tensor(idx, dtype=torch.long)
        flipped = self.attach_visual(sample, record["image_id"])
        sample.update(tokenize(self.text_processor, self.view_text(self.texts[text][1])) if flipped else self._text(text))
        match = int(self.texts[text][0] == image)
        sample.targets = torch.tensor(match, dtype=torch.long)
        if self.training:
            sample.image_index = torch.tensor(image, dtype=torch.long)
            sample.text_index = torch.tensor(text, dtype=torch.long)
        else:
            sample.pair_image_index = torch.tensor(image, dtype=torch.long)
            sample.pair_text_index = torch.tensor(text, dtype=torch.long)
        return sample


@registry.register_builder("coco_retrieval")
class COCORetrievalBuilder(RegionTaskBuilder):
    name = "coco_retrieval"
    dataset_class = RetrievalDataset
    config_file = "retrieval/coco_retrieval.yaml"

    def num_outputs(self, dataset):
        return 2


@registry.register_builder("flickr30k_retrieval")
class Flickr30kRetrievalBuilder(COCORetrievalBuilder):
    name = "flickr30k_retrieval"
    config_file = "retrieval/flickr30k_retrieval.yaml"
