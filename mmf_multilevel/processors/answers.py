"""VQA answer processor whose soft targets are the official VQA accuracy of every vocabulary entry.

Registered as ``vqa_official_answer``::

    processors:
      answer_processor:
        type: vqa_official_answer
        params:
          vocab_file: vqa2/answers_3129.txt   # one answer per line; relative paths are tried under data_dir
          num_answers: 10                     # human answers every question must have
          oov: ignore                         # ignore | error_if_all | error
          unk_token: <unk>                    # a line equal to this is reserved (never a target); null: none

Input: ``{"answers": [...]}`` with the question's human answers, as strings or as the official
annotation's dicts (``{"answer": ..., "answer_confidence": ..., "answer_id": ...}``).  An optional
``question_id`` in the same dict is named in error messages.

Output (MMF's answer-processor keys, plus one):

- ``answers``: the human answers as strings, unchanged (for prediction files and MMF's own metrics);
- ``answers_scores``: ``FloatTensor(vocab_size)``; entry ``k`` is the official VQA accuracy of
  predicting vocabulary entry ``k`` (``mmf_multilevel.evaluation.vqa.vqa_official_accuracy(vocab[k], answers)``),
  e.g. 0.3 / 0.6 / 0.9 / 1.0 for an answer given by 1 / 2 / 3 / ≥4 of 10 humans.  Training on it
  optimises the quantity the ``vqa_official_accuracy`` metric reports.  A dataset sets
  ``sample.targets = out["answers_scores"]``;
- ``answers_indices``: ``LongTensor(num_answers)``, the vocabulary index each human answer matches
  under the official comparison, ``-1`` where it matches none;
- ``answers_keys``: ``LongTensor(num_answers)``, the human answers encoded for the
  ``vqa_official_accuracy`` metric (see ``mmf_multilevel.metrics``, built on ``mmf_multilevel.evaluation.vqa``); a dataset sets
  ``sample.answers_keys = out["answers_keys"]``.

Answers outside the vocabulary
------------------------------
A human answer is *in* the vocabulary when some entry equals it under the official comparison
(normalised, or — when all humans wrote the same string — stripped).  By default (``oov: ignore``) an
answer outside the vocabulary gets no target mass and still counts as a human in the leave-one-out
average (so the other answers' scores are exactly the official ones).  A question none of whose
answers is in the vocabulary gets an all-zero target; it is *kept* — the official evaluation counts
it, with accuracy 0 for any vocabulary answer — and counted in ``num_all_oov`` (a warning is logged
the first time).  ``oov: error_if_all`` raises for such a question; ``oov: error`` raises for any
answer outside the vocabulary.  Counters (``num_samples``, ``num_oov_answers``, ``num_all_oov``) are per
process: each DataLoader worker keeps its own.

The vocabulary
--------------
One answer per line, UTF-8; the line is the answer (surrounding whitespace stripped).  The standard
VQA v2 vocabulary has 3,129 answers and no ``<unk>``: the classifier has exactly one output per
line.  Blank lines (other than at the very end), duplicate lines and an empty file are errors naming the
file and line.  Entries are compared through the official normalisation, so an entry not written in
normal form still matches ("Two" matches "2"); two entries that normalise alike ("2" and "two") both
receive the same target and a warning lists them.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Dict, List, Optional

import torch
from mmf.common.registry import registry
from mmf.datasets.processors.processors import BaseProcessor

from mmf_multilevel.evaluation.vqa import (
    NO_MATCH_KEY,
    accuracy_from_matches,
    answer_key,
    clean_whitespace,
    comparison_forms,
    normalize_answer,
)

__all__ = ["AnswerVocabulary", "VQAOfficialAnswerProcessor", "OOV_POLICIES"]

logger = logging.getLogger(__name__)

OOV_POLICIES = ("ignore", "error_if_all", "error")


def _config_get(config, key, default=None):
    """``config[key]`` for a dict or an OmegaConf config; ``default`` when the key is absent."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default) if key in config else default
    return getattr(config, key, default)


class AnswerVocabulary:
    """The answer list of a vocabulary file, with the lookup tables of the official comparison.

    Args:
        path: the vocabulary file (one answer per line).
        unk_token: a line equal to this is kept (so indices match the file) but reserved: it never
            receives target mass and predicting it scores 0.  ``None`` reserves nothing.
    """

    def __init__(self, path: str, unk_token: Optional[str] = "<unk>"):
        self.path = path
        self.words = self._read(path)
        self.unk_token = unk_token
        self.unk_index = None
        self.by_normalized: Dict[str, List[int]] = {}
        self.by_stripped: Dict[str, List[int]] = {}
        for index, word in enumerate(self.words):
            if unk_token is not None and word == unk_token:
                self.unk_index = index
                continue
            self.by_normalized.setdefault(normalize_answer(word), []).append(index)
            self.by_stripped.setdefault(clean_whitespace(word), []).append(index)
        self.collisions = {form: idx for form, idx in self.by_normalized.items() if len(idx) > 1}
        if self.collisions:
            shown = "; ".join(
                f"{form!r} <- " + ", ".join(repr(self.words[i]) for i in idx)
                for form, idx in list(self.collisions.items())[:5]
            )
            logger.warning(
                "answer vocabulary %s: %d groups of entries normalise to the same answer and share their "
                "targets (%s%s)", path, len(self.collisions), shown, " …" if len(self.collisions) > 5 else ""
            )

    @staticmethod
    def _read(path: str) -> List[str]:
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"answer vocabulary file not found: {path}") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"answer vocabulary path is a directory, expected a file: {path}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise ValueError(f"answer vocabulary {path}, line {line}: not valid UTF-8 ({error.reason})") from None
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            raise ValueError(f"answer vocabulary {path} is empty: expected one answer per line")
        words: List[str] = []
        first_line: Dict[str, int] = {}
        for number, line in enumerate(lines, start=1):
            word = line.strip()
            if not word:
                raise ValueError(f"answer vocabulary {path}, line {number}: blank line, expected an answer")
            if word in first_line:
                raise ValueError(
                    f"answer vocabulary {path}, line {number}: duplicate entry {word!r} (first on line "
                    f"{first_line[word]}); each answer must appear once"
                )
            first_line[word] = number
            words.append(word)
        return words

    def __len__(self) -> int:
        return len(self.words)

    def lookup(self, form: str, normalized: bool) -> List[int]:
        """Vocabulary indices whose official comparison form equals ``form``."""
        table = self.by_normalized if normalized else self.by_stripped
        return table.get(form, [])


@registry.register_processor("vqa_official_answer")
class VQAOfficialAnswerProcessor(BaseProcessor):
    """Human answers → official-VQA-accuracy soft targets, match indices and metric keys.

    See the module docstring for the configuration, the outputs and the policy for answers outside
    the vocabulary.  ``data_dir`` (passed by MMF's dataset) is where a relative ``vocab_file`` is
    looked for first.
    """

    def __init__(self, config, *args, data_dir: Optional[str] = None, **kwargs):
        vocab_file = _config_get(config, "vocab_file")
        if vocab_file is None or not str(vocab_file).strip():
            raise ValueError("vqa_official_answer processor: 'vocab_file' is required (one answer per line)")
        num_answers = _config_get(config, "num_answers", 10)
        self.num_answers = int(10 if num_answers is None else num_answers)
        if self.num_answers < 1:
            raise ValueError(f"vqa_official_answer processor: 'num_answers' must be >= 1, got {self.num_answers}")
        self.oov = str(_config_get(config, "oov", "ignore") or "ignore")
        if self.oov not in OOV_POLICIES:
            raise ValueError(
                f"vqa_official_answer processor: 'oov' must be one of {', '.join(OOV_POLICIES)}, got {self.oov!r}"
            )
        unk_token = _config_get(config, "unk_token", "<unk>")
        self.vocab_file = self._resolve(str(vocab_file), data_dir)
        self.vocab = AnswerVocabulary(self.vocab_file, unk_token=unk_token)
        self._vocab_keys: Optional[torch.Tensor] = None
        self.num_samples = 0
        self.num_oov_answers = 0
        self.num_all_oov = 0

    @staticmethod
    def _resolve(vocab_file: str, data_dir: Optional[str]) -> str:
        vocab_file = os.path.expanduser(vocab_file)
        if os.path.isabs(vocab_file):
            return vocab_file
        candidates = []
        if data_dir:
            candidates.append(os.path.join(os.path.expanduser(str(data_dir)), vocab_file))
        candidates.append(os.path.abspath(vocab_file))
        for candidate in candidates:
            if os.path.exists(candidate):
                return candidate
        raise FileNotFoundError(
            f"answer vocabulary file not found: {vocab_file!r} (looked for {', '.join(candidates)})"
        )

    # -- MMF answer-processor interface ---------------------------------------------------------

    def get_vocab_size(self) -> int:
        """Number of classifier outputs: one per vocabulary line."""
        return len(self.vocab)

    def get_true_vocab_size(self) -> int:
        """Same as ``get_vocab_size`` (no dynamic answer space such as OCR copying)."""
        return len(self.vocab)

    def idx2word(self, index: int) -> str:
        if not 0 <= int(index) < len(self.vocab):
            raise IndexError(f"answer index {index} outside the vocabulary of {len(self.vocab)} ({self.vocab_file})")
        return self.vocab.words[int(index)]

    def word2idx(self, answer: str) -> int:
        """Index of the vocabulary entry equal to ``answer`` after official normalisation.

        Raises ``KeyError`` naming the answer and the vocabulary file when there is none.
        """
        matches = self.vocab.lookup(normalize_answer(answer), True)
        if not matches:
            raise KeyError(f"answer {answer!r} (normalised {normalize_answer(answer)!r}) is not in {self.vocab_file}")
        return matches[0]

    def vocab_keys(self) -> torch.Tensor:
        """``LongTensor(vocab_size, 2)``: each entry's stripped and normalised keys (used by the metric)."""
        if self._vocab_keys is None:
            rows = []
            for index, word in enumerate(self.vocab.words):
                if index == self.vocab.unk_index:
                    rows.append((NO_MATCH_KEY, NO_MATCH_KEY))
                else:
                    rows.append((answer_key(clean_whitespace(word), False), answer_key(normalize_answer(word), True)))
            self._vocab_keys = torch.tensor(rows, dtype=torch.long)
        return self._vocab_keys

    # -- processing -----------------------------------------------------------------------------

    def _answers_of(self, item) -> List[str]:
        where = f" (question_id {item['question_id']})" if isinstance(item, Mapping) and "question_id" in item else ""
        if not isinstance(item, Mapping) or "answers" not in item:
            got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise KeyError(f"vqa_official_answer processor expects a dict with an 'answers' list, got {got}")
        answers = item["answers"]
        if isinstance(answers, (str, bytes, Mapping)) or not isinstance(answers, Iterable):
            raise TypeError(
                f"vqa_official_answer processor: field 'answers'{where} must be a list of {self.num_answers} "
                f"answers, got {type(answers).__name__}"
            )
        answers = list(answers)  # lists, tuples, numpy arrays from MMF .npy imdbs
        if len(answers) != self.num_answers:
            raise ValueError(
                f"vqa_official_answer processor: field 'answers'{where} has {len(answers)} answers, expected "
                f"{self.num_answers} (num_answers)"
            )
        texts = []
        for position, answer in enumerate(answers):
            if isinstance(answer, Mapping):
                answer = answer.get("answer")
            if not isinstance(answer, str):
                raise TypeError(
                    f"vqa_official_answer processor: field 'answers'[{position}]{where} must be a string (or a "
                    f"dict with an 'answer' string), got {type(answer).__name__}: {answer!r}"
                )
            texts.append(answer)
        return texts

    def __call__(self, item, *args, **kwargs):
        answers = self._answers_of(item)
        forms, normalized = comparison_forms(answers)

        answers_indices = torch.full((self.num_answers,), -1, dtype=torch.long)
        matched: Dict[str, List[bool]] = {}
        oov_positions = []
        for position, form in enumerate(forms):
            indices = self.vocab.lookup(form, normalized)
            if indices:
                answers_indices[position] = indices[0]
                if form not in matched:
                    matched[form] = [other == form for other in forms]
            else:
                oov_positions.append(position)

        self.num_samples += 1
        self.num_oov_answers += len(oov_positions)
        if oov_positions:
            self._handle_oov(item, answers, forms, oov_positions)

        scores = torch.zeros(len(self.vocab), dtype=torch.float)
        for form, hits in matched.items():
            accuracy = accuracy_from_matches(hits)
            for index in self.vocab.lookup(form, normalized):
                scores[index] = accuracy

        return {
            "answers": list(answers),
            "answers_indices": answers_indices,
            "answers_scores": scores,
            "answers_keys": torch.tensor([answer_key(form, normalized) for form in forms], dtype=torch.long),
        }

    def _handle_oov(self, item, answers, forms, oov_positions):
        where = f"question_id {item['question_id']}" if "question_id" in item else "a question"
        all_oov = len(oov_positions) == len(forms)
        if self.oov == "error" or (self.oov == "error_if_all" and all_oov):
            missing = ", ".join(f"{answers[p]!r}" for p in oov_positions)
            what = "none of its answers is" if all_oov else "answers not"
            raise ValueError(
                f"vqa_official_answer processor: {where}: {what} in the answer vocabulary {self.vocab_file}: "
                f"{missing} (oov: {self.oov}; oov: ignore trains on the answers that are in it)"
            )
        if all_oov:
            self.num_all_oov += 1
            if self.num_all_oov == 1:
                logger.warning(
                    "%s has no answer in the answer vocabulary %s (%s); its target is all zero and it counts "
                    "with accuracy 0, as in the official evaluation (further cases are counted in num_all_oov)",
                    where, self.vocab_file, ", ".join(repr(a) for a in answers[:3]),
                )
