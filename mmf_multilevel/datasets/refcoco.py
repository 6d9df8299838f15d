"""RefCOCO+ (UNC splits val / testA / testB) on region features: ``datasets=refcoco_plus``.

Annotations: jsonl, one referring expression per line: ``{"ref_id", "image_id", "expression",
"bbox": [x, y, w, h]}`` (COCO box convention, pixels). The region cache holds the detector's
proposals of each image; the model scores every proposal, and a prediction is a hit when the
top-scoring proposal has IoU > 0.5 with the gold box (``refcoco_accuracy``).

Sample fields: the expression's tokens, ``image_feature_0`` / ``image_info_0`` (proposals),
``proposal_boxes`` (``max_features x 4`` xyxy, zero-padded), ``num_proposals``, ``gold_box``
(xyxy) and, with ``supervision: box`` (default), ``targets`` = the index of the proposal with the
highest IoU with the gold box (softmax cross-entropy over proposals) and ``label_mask`` = the
proposals with IoU > 0.5. ``supervision: none`` is the weakly supervised variant (SIMLA, ALBEF):
no box enters training - samples carry ``is_correct = 1`` and ``image_index`` (the position of the
expression's image among the split's sorted image ids: expressions of one image are positives of each
other in an image-text contrastive loss, as the official ALBEF/SIMLA grounding data gives them) for
(image, expression) matching losses - while evaluation still uses the gold box.
"""
import torch
from mmf.common.registry import registry

from mmf_multilevel.datasets.base import RegionTaskBuilder, RegionTextDataset, setting, tokenize
from mmf_multilevel.evaluation.grounding import pairwise_iou, xywh_to_xyxy

SUPERVISION = ("box", "none")


def proposal_fields(sample):
    """``proposal_boxes`` (the ``max_features x 4`` xyxy boxes of ``image_info_0``, zero-padded) and
    ``num_proposals`` of a sample whose ``image_info_0`` holds its image's proposals: what the model scores and
    ``refcoco_accuracy`` picks from. Returns the number of real proposals."""
    info = sample.image_info_0
    count = int(info.max_features)
    sample.proposal_boxes = info.bbox
    sample.num_proposals = torch.tensor(count, dtype=torch.long)
    return count


class RefCOCODataset(RegionTextDataset):
    required_fields = ("ref_id", "image_id", "expression", "bbox")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        self.supervision = str(setting(config, "supervision", dataset_name))
        if self.supervision not in SUPERVISION:
            raise ValueError(f"dataset_config.{dataset_name}.supervision must be one of {list(SUPERVISION)}, got {self.supervision!r}")
        self.iou_threshold = float(setting(config, "iou_threshold", dataset_name))
        super().__init__(dataset_name, config, dataset_type, index)

    def validate_record(self, record):
        if not isinstance(record.get("expression"), str) or not record["expression"].strip():
            return "field 'expression' must be a non-empty string"
        box = record.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            return f"field 'bbox' must be [x, y, w, h], got {box!r}"
        if box[2] <= 0 or box[3] <= 0:
            return f"field 'bbox' has a non-positive width or height: {box!r}"
        return None

    def build_sample(self, record, sample):
        sample.update(tokenize(self.text_processor, self.view_text(record["expression"])))
        info = sample.image_info_0
        count = int(info.max_features)
        gold = xywh_to_xyxy(record["bbox"])
        width, height = int(info.image_width), int(info.image_height)
        if gold[0] < 0 or gold[1] < 0 or gold[2] > width + 1 or gold[3] > height + 1:
            raise ValueError(
                f"{self.annotation_path}: ref_id {record['ref_id']}: gold box {record['bbox']} (x, y, w, h) lies outside "
                f"the {width}x{height} image {record['image_id']!r}"
            )
        sample.ref_id = torch.tensor(int(record["ref_id"]), dtype=torch.long)
        proposal_fields(sample)
        sample.gold_box = gold
        iou = pairwise_iou(info.bbox[:count], gold.unsqueeze(0)).squeeze(1) if count else torch.zeros(0)
        mask = torch.zeros(self.max_features, dtype=torch.bool)
        mask[:count] = iou > self.iou_threshold
        sample.label_mask = mask
        if self.supervision == "box":
            sample.targets = torch.tensor(int(iou.argmax()) if count else -100, dtype=torch.long)
        else:
            sample.is_correct = torch.tensor(1, dtype=torch.long)
            sample.image_index = torch.tensor(self.image_position(record["image_id"]), dtype=torch.long)
        return sample

    def image_position(self, image_id) -> int:
        """The index of ``image_id`` among the split's image ids, sorted (built once)."""
        positions = getattr(self, "_image_positions", None)
        if positions is None:
            ids = sorted({str(r["image_id"]) for r in self.records})
            positions = self._image_positions = {image_id: i for i, image_id in enumerate(ids)}
        return positions[str(image_id)]


@registry.register_builder("refcoco_plus")
class RefCOCOPlusBuilder(RegionTaskBuilder):
    name = "refcoco_plus"
    dataset_class = RefCOCODataset
    config_file = "refcoco_plus/defaults.yaml"
