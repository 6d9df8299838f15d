"""SNLI-VE (visual entailment) on region features: ``datasets=snli_ve``.

Annotations: jsonl, one hypothesis per line: ``{"pair_id", "image_id", "hypothesis",
"label": "entailment" | "neutral" | "contradiction"}``; the official field names
``Flickr30K_ID``, ``sentence2`` and ``gold_label`` are accepted too. ``targets`` is the class
index in that order (three-way classification, ``accuracy`` on val / test).
"""
import torch
from mmf.common.registry import registry

from mmf_multilevel.datasets.base import RegionTaskBuilder, RegionTextDataset, tokenize

LABELS = ("entailment", "neutral", "contradiction")
ALIASES = {"Flickr30K_ID": "image_id", "sentence2": "hypothesis", "gold_label": "label", "pairID": "pair_id"}


class SNLIVEDataset(RegionTextDataset):
    required_fields = ()

    def validate_record(self, record):
        for official, ours in ALIASES.items():
            if official in record and ours not in record:
                record[ours] = record[official]
        for field in ("image_id", "hypothesis", "label"):
            if field not in record:
                return f"missing field '{field}'"
        if not isinstance(record["hypothesis"], str) or not record["hypothesis"].strip():
            return "field 'hypothesis' must be a non-empty string"
        if record["label"] not in LABELS:
            return f"field 'label' must be one of {list(LABELS)}, got {record['label']!r}"
        return None

    def build_sample(self, record, sample):
        sample.update(tokenize(self.text_processor, self.view_text(record["hypothesis"])))
        sample.targets = torch.tensor(LABELS.index(record["label"]), dtype=torch.long)
        return sample


@registry.register_builder("snli_ve")
class SNLIVEBuilder(RegionTaskBuilder):
    name = "snli_ve"
    dataset_class = SNLIVEDataset
    config_file = "snli_ve/defaults.yaml"

    def num_outputs(self, dataset):
        return len(LABELS)
