"""GQA and Visual Genome QA on region features: ``datasets=gqa`` and ``datasets=vgqa``.

Annotations: jsonl, one question per line: ``{"question_id", "image_id", "question",
"answer"}`` (``answer`` absent in a test split). The ``qa_single_answer`` processor maps the
answer onto the vocabulary: ``targets`` (one-hot, for ``logit_bce``) and ``answer_index``
(-1 outside the vocabulary, for the ``gqa_accuracy`` metric).

With ``vqa2`` these make LXMERT's in-domain QA pre-training mix: point the three answer
processors at one shared vocabulary file and train on ``datasets=vqa2,gqa,vgqa`` (MMF samples
the datasets in proportion to their size); every dataset's targets then index the same
classifier outputs. As pre-training corpora they take the same ``masked_token`` text processor,
``itm_probability`` and ``region_mask_probability`` keys as ``vqa2`` (``mmf_multilevel.datasets.pretraining``).
"""
from mmf.common.registry import registry

from mmf_multilevel.datasets.base import RegionTaskBuilder, RegionTextDataset
from mmf_multilevel.datasets.pretraining import QuestionSamples


class SingleAnswerQADataset(QuestionSamples, RegionTextDataset):
    required_fields = ("question_id", "image_id", "question")

    def validate_record(self, record):
        if not isinstance(record.get("question"), str) or not record["question"].strip():
            return "field 'question' must be a non-empty string"
        if "answer" in record:
            if not isinstance(record["answer"], str) or not record["answer"].strip():
                return "field 'answer' must be a non-empty string"
        elif self.dataset_type != "test":
            return f"missing field 'answer' (required in the {self.dataset_type} split)"
        return None

    def build_sample(self, record, sample):
        self.add_question(record, sample)
        if "answer" in record:
            out = self.answer_processor({"answer": self.view_text(record["answer"]), "question_id": record["question_id"]})
            sample.targets = out["answers_scores"]
            sample.answer_index = out["answer_index"]
        return sample

    def format_for_prediction(self, report):
        """GQA's submission format: ``[{"questionId", "prediction"}]``."""
        processor = self.answer_processor
        return [
            {"questionId": str(self.records[i]["question_id"]), "prediction": processor.idx2word(index)}
            for i, index in zip(report.id.tolist(), report.scores.argmax(dim=1).tolist())
        ]


@registry.register_builder("gqa")
class GQABuilder(RegionTaskBuilder):
    name = "gqa"
    dataset_class = SingleAnswerQADataset
    config_file = "gqa/defaults.yaml"

    def num_outputs(self, dataset):
        return dataset.answer_processor.get_vocab_size()


@registry.register_builder("vgqa")
class VGQABuilder(GQABuilder):
    name = "vgqa"
    config_file = "gqa/vgqa.yaml"
