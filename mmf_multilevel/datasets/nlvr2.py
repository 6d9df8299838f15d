"""NLVR2 on region features: ``datasets=nlvr2``.

Annotations: jsonl, one statement per line, as the official files:
``{"identifier": "dev-850-0-0", "sentence": "...", "left_image": "dev-850-0-img0",
"right_image": "dev-850-0-img1", "label": true}`` (``label`` may also be the official
``"True"``/``"False"`` strings; without ``left_image``/``right_image`` the ids are derived from
the identifier as in the official release: ``<split>-<set>-<pair>-img0/1``).

The model sees (image, statement) twice. Two input layouts, ``input_layout``:

* ``paired`` (default): ``img0`` and ``img1`` each carry ``image_feature_0`` / ``image_info_0``
  for the left and right image, the statement's tokens once - what a paired head reads
  (VisualBERT's ``nlvr2`` head, UNITER's pair head: encode each pair, concatenate the pooled
  outputs, classify);
* ``concatenated``: one ``image_feature_0`` of ``2 x max_features`` rows (left then right),
  ``image_info_0.max_features`` = 2 x max_features with ``image_mask`` marking real regions
  and ``image_segment_ids`` (0 left, 1 right) - one sequence with both images (UNITER's triplet).

``targets``: 1 when the statement is true, else 0 (two-way classification, ``accuracy``).
"""
import re

import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample

from mmf_multilevel.datasets.base import RegionTaskBuilder, RegionTextDataset, setting, tokenize

LAYOUTS = ("paired", "concatenated")
_IDENTIFIER = re.compile(r"^(?P<prefix>.+)-(?P<sentence>\d+)$")


def parse_label(value):
    """``True``/``False`` as bool, or None when the value is neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def statement_labels(scores):
    """Per row of the two-way ``scores`` (B x 2: false, true), whether the statement is judged true: the argmax is
    1, as ``accuracy`` scores it against ``targets`` and the submission file writes it."""
    return scores.argmax(dim=1) == 1


def pair_visual_fields(sample, layout, left, right, attach, region_fields):
    """The two images of an NLVR2 sample in ``sample``, laid out as ``layout`` says (see the module docstring):
    ``paired`` - ``attach(side_sample, image)`` fills ``img0`` with ``left`` and ``img1`` with ``right``;
    ``concatenated`` - ``region_fields(image)`` -> ``(image_feature_0, image_info_0)`` of each (padded to
    ``max_features`` rows), the left's rows first. ``left`` / ``right`` are whatever the two callables take:
    the dataset's image ids, the predictor's query images."""
    if layout == "paired":
        sample.img0, sample.img1 = Sample(), Sample()
        attach(sample.img0, left)
        attach(sample.img1, right)
        return sample
    (f0, i0), (f1, i1) = region_fields(left), region_fields(right)
    rows = int(f0.shape[0])  # max_features: both are padded to it
    sample.image_feature_0 = torch.cat([f0, f1])
    info = Sample()
    info.max_features = torch.tensor(2 * rows, dtype=torch.long)
    info.num_boxes = torch.stack([i0.num_boxes, i1.num_boxes])
    info.bbox = torch.cat([i0.bbox, i1.bbox])
    info.image_width = torch.stack([i0.image_width, i1.image_width])
    info.image_height = torch.stack([i0.image_height, i1.image_height])
    positions = torch.arange(rows)
    sample.image_mask = torch.cat([positions < i0.max_features, positions < i1.max_features]).long()
    sample.image_segment_ids = torch.cat([torch.zeros(rows, dtype=torch.long), torch.ones(rows, dtype=torch.long)])
    sample.image_info_0 = info
    return sample


class NLVR2Dataset(RegionTextDataset):
    required_fields = ("identifier", "sentence")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        self.layout = str(setting(config, "input_layout", dataset_name))
        if self.layout not in LAYOUTS:
            raise ValueError(f"dataset_config.{dataset_name}.input_layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        super().__init__(dataset_name, config, dataset_type, index)

    def image_ids_of(self, record):
        if "left_image" in record and "right_image" in record:
            return (str(record["left_image"]), str(record["right_image"]))
        match = _IDENTIFIER.match(str(record["identifier"]))
        prefix = match.group("prefix") if match else str(record["identifier"])
        return (f"{prefix}-img0", f"{prefix}-img1")

    def validate_record(self, record):
        if not isinstance(record.get("sentence"), str) or not record["sentence"].strip():
            return "field 'sentence' must be a non-empty string"
        if "label" in record and parse_label(record["label"]) is None:
            return f"field 'label' must be true/false (or \"True\"/\"False\"), got {record['label']!r}"
        if "label" not in record and self.dataset_type != "test":
            return f"missing field 'label' (required in the {self.dataset_type} split)"
        for side in ("left_image", "right_image"):
            if side in record and (not isinstance(record[side], (str, int)) or str(record[side]) == ""):
                return f"field '{side}' must be an image id"
        return None

    def __getitem__(self, idx):
        record = self.records[idx]
        left, right = self.image_ids_of(record)
        sample = Sample()
        sample.id = torch.tensor(idx, dtype=torch.long)
        sample.update(tokenize(self.text_processor, record["sentence"]))
        pair_visual_fields(sample, self.layout, left, right, self.attach_visual, self.region_fields)
        if "label" in record:
            sample.targets = torch.tensor(int(parse_label(record["label"])), dtype=torch.long)
        return sample

    def format_for_prediction(self, report):
        """The official submission: ``identifier,prediction`` rows with True/False."""
        predictions = statement_labels(report.scores).tolist()
        return [
            {"identifier": str(self.records[i]["identifier"]), "prediction": "True" if p else "False"}
            for i, p in zip(report.id.tolist(), predictions)
        ]


@registry.register_builder("nlvr2")
class NLVR2Builder(RegionTaskBuilder):
    name = "nlvr2"
    dataset_class = NLVR2Dataset
    config_file = "nlvr2/defaults.yaml"

    def num_outputs(self, dataset):
        return 2
