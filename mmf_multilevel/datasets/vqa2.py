"""VQA v2 on region features: ``datasets=vqa2``.

Annotations: jsonl, one question per line:
``{"question_id": 1, "image_id": "COCO_val2014_000000000042", "question": "...",
"answers": ["yes", ... 10 human answers ...]}`` (``answers`` absent on test-std/dev).
The ``answer_processor`` turns the 10 answers into soft targets over the answer
vocabulary (``targets``); the raw answers travel with the sample for the official
VQA accuracy metric.

As a pre-training QA corpus (SemVLP, LXMERT) the question can be MLM-masked (a ``masked_token``
text processor), swapped for another image's question with probability ``itm_probability``
(``is_correct``; the targets stay the record's, and no QA loss counts on a mismatched pair) and the
regions masked (``region_mask_probability``): ``mmf_multilevel.datasets.pretraining``.

This builder replaces rc10's own ``vqa2`` builder, which depends on MMF's dataset zoo
files and configs that the rc10 package does not ship.
"""

import torch
from mmf.common.registry import registry

from mmf_multilevel.datasets.base import RegionTaskBuilder, RegionTextDataset
from mmf_multilevel.datasets.pretraining import QuestionSamples


class VQA2Dataset(QuestionSamples, RegionTextDataset):
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
        self.add_question(record, sample)
        sample.question_id = torch.tensor(int(record["question_id"]), dtype=torch.long)
        if record.get("answers") is not None:
            answers = self.answer_processor({"answers": [self.view_text(a) for a in record["answers"]], "question_id": record["question_id"]})
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
class VQA2Builder(RegionTaskBuilder):
    name = "vqa2"
    dataset_class = VQA2Dataset
    config_file = "vqa2/defaults.yaml"

    def num_outputs(self, dataset):
        # classification heads size themselves from the answer vocabulary
        return dataset.answer_processor.get_vocab_size()
