"""Single-answer QA targets (GQA, Visual Genome QA): processor ``qa_single_answer``.

::

    processors:
      answer_processor:
        type: qa_single_answer
        params:
          vocab_file: gqa/answers_1842.txt   # one answer per line; relative paths tried under data_dir
          normalize: false                   # GQA's evaluation compares the strings as they are;
                                             # true applies the VQA normalisation (VG-QA in LXMERT's mix)

Input ``{"answer": "..."}``. Output: ``answer_index`` (LongTensor scalar, -1 when the answer is
not in the vocabulary), ``answers_scores`` (one-hot FloatTensor over the vocabulary, all zero
for such an answer - for ``logit_bce``), ``answers`` ([the answer]). An answer outside the
vocabulary can never be predicted correctly, so the ``gqa_accuracy`` metric counts it wrong
(the official GQA evaluation does the same); MMF's ``accuracy`` on the one-hot targets would
instead count it right whenever the model predicts class 0.
"""
import os

import torch
from mmf.common.registry import registry
from mmf.datasets.processors.processors import BaseProcessor

from mmf_multilevel.evaluation.vqa import normalize_answer
from mmf_multilevel.processors.answers import AnswerVocabulary, VQAOfficialAnswerProcessor


def _get(config, key, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


@registry.register_processor("qa_single_answer")
class QASingleAnswerProcessor(BaseProcessor):
    def __init__(self, config, *args, data_dir=None, **kwargs):
        vocab_file = _get(config, "vocab_file")
        if not vocab_file:
            raise ValueError("qa_single_answer processor: 'vocab_file' is required (one answer per line)")
        self.vocab_file = VQAOfficialAnswerProcessor._resolve(os.fspath(vocab_file), data_dir)
        self.normalize = bool(_get(config, "normalize", False))
        self.vocab = AnswerVocabulary(self.vocab_file, unk_token=None)
        self._index = {}
        for index, word in enumerate(self.vocab.words):
            self._index.setdefault(self._form(word), index)
        self.num_samples = 0
        self.num_oov = 0

    def _form(self, answer):
        return normalize_answer(answer) if self.normalize else answer.strip()

    def get_vocab_size(self):
        return len(self.vocab)

    def get_true_vocab_size(self):
        return len(self.vocab)

    def idx2word(self, index):
        if not 0 <= int(index) < len(self.vocab):
            raise IndexError(f"answer index {index} outside the vocabulary of {len(self.vocab)} ({self.vocab_file})")
        return self.vocab.words[int(index)]

    def word2idx(self, answer):
        index = self._index.get(self._form(answer))
        if index is None:
            raise KeyError(f"answer {answer!r} is not in {self.vocab_file}")
        return index

    def __call__(self, item, *args, **kwargs):
        answer = item.get("answer") if isinstance(item, dict) else None
        if not isinstance(answer, str):
            where = f" (question_id {item['question_id']})" if isinstance(item, dict) and "question_id" in item else ""
            raise TypeError(f"qa_single_answer processor: field 'answer'{where} must be a string, got {answer!r}")
        index = self._index.get(self._form(answer), -1)
        self.num_samples += 1
        scores = torch.zeros(len(self.vocab), dtype=torch.float)
        if index < 0:
            self.num_oov += 1
        else:
            scores[index] = 1.0
        return {"answers": [answer], "answer_index": torch.tensor(index, dtype=torch.long), "answers_scores": scores}
