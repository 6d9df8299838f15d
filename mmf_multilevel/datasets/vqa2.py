"""VQA v2 on region features: ``datasets=vqa2``.

Annotations: jsonl, one question per line:
``{"question_id": 1, "image_id": "COCO_val2014_000000000042", "question": "...",
"answers": ["yes", ... 10 human answers ...]}`` (``answers`` absent on test-std/dev).
The ``answer_processor`` turns the 10 answers into soft targets over the answer
vocabulary (``targets``); the raw answers travel with the sample for the official
VQA accuracy metric.

This builder replaces rc10's own ``vqa2`` builder, which depends on MMF's dataset zoo
files and configs that the rc10 package does not ship.
"""
import os

import torch
from mmf.common.registry import registry
from mmf.datasets.base_dataset_builder import BaseDatasetBuilder

from mmf_multilevel.datasets.base import RegionTextDataset

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "datasets")


class VQA2Dataset(RegionTextDataset):
    required_fields = ("question_id", "image_id", "question")

    def validate_record(self, record):
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            return "field 'question' must be a non-empty string"
        answers = record.get("answers")
        if answers is not None:
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not answers:
                return "field 'answers' must be a non-empty list of strings"
        elif self.dataset_type != "test":
            return f"missing field 'answers' (required in the {self.dataset_type} split)"
        return None

    def build_sample(self, record, sample):
        processed = self.text_processor({"text": record["question"]})
        processed.pop("tokens", None)
        processed.pop("text", None)
        processed.pop("lm_label_ids", None)
        sample.update(processed)
        sample.question_id = torch.tensor(int(record["question_id"]), dtype=torch.long)
        if record.get("answers") is not None:
            answers = self.answer_processor({"answers": record["answers"], "question_id": record["question_id"]})
            sample.targets = answers["answers_scores"]
            sample.update({k: v for k, v in answers.items() if k not in ("answers_scores",)})
        return sample

    def format_for_prediction(self, report):
        processor = self.answer_processor
        answers = report.scores.argmax(dim=1).tolist()
        return [
            {"question_id": int(qid), "answer": processor.idx2word(index)}
            for qid, index in zip(report.question_id.tolist(), answers)
        ]


@registry.register_builder("vqa2")
class VQA2Builder(BaseDatasetBuilder):
    def __init__(self):
        super().__init__("vqa2")

    @classmethod
    def config_path(cls):
        return os.path.join(CONFIG_DIR, "vqa2", "defaults.yaml")

    def build(self, config, dataset_type="train", *args, **kwargs):
        return None

    def load(self, config, dataset_type="train", *args, **kwargs):
        if dataset_type not in config.annotations:
            raise KeyError(f"dataset_config.{self.dataset_name}.annotations has no '{dataset_type}' split")
        self.dataset = VQA2Dataset(self.dataset_name, config, dataset_type)
        return self.dataset

    def update_registry_for_model(self, config):
        # classification heads size themselves from the answer vocabulary
        registry.register(f"{self.dataset_name}_num_final_outputs", self.dataset.answer_processor.get_vocab_size())
