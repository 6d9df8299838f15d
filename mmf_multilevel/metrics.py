"""The MMF metrics of this package (registered with MMF's registry).

The official VQA evaluation they build on is :mod:`mmf_multilevel.evaluation.vqa` (framework-free).

MMF's metrics, measured against it
==================================

``tests/test_vqa_eval.py`` runs MMF rc10's own classes on hand-made questions.  What they show:

``vqa_accuracy`` (``VQAAccuracy`` + the ``vqa_answer`` processor's ``answers_scores``) uses the
right leave-one-out formula, so for a prediction that matches 1, 2, 3, 4 of 10 humans it also gives
0.3, 0.6, 0.9, 1.0 (as float32), but it differs from the official evaluation in:

- **answer normalisation**: the human answers go through the configured ``preprocessor``
  (``simple_word`` in MMF's VQA configs: lower-case, delete ``,`` and ``?``, split ``'s``) and are
  then looked up verbatim.  "Two", "2" and "two." are three different answers to it, "dont" does not
  match "don't", "a dog" does not match "dog", "it's" becomes "it 's" and never matches the
  vocabulary entry "it's".  The official evaluation counts all of these as the same answer.
- **fewer than 10 answers**: ``_increase_to_ten`` repeats the answers until there are 10 (5 answers
  with 2 "yes" become 4 "yes" → 1.0 instead of the official 0.533…); an empty list never returns.
- **the unanimous rule**: MMF always preprocesses; the official code does not normalise when all 10
  humans agree.
- **column 0 is always masked** (``_masked_unk_softmax(…, mask_idx=0)``): correct only for a vocabulary
  whose first entry is ``<unk>``; with the standard 3,129-answer vocabulary it makes the first answer
  impossible to predict.
- the batch value is a float32 sum; the official evaluation works in float64.

``vqa_evalai_accuracy`` compares strings with ``EvalAIAnswerProcessor``, which first deletes every
``,`` and ``?`` and splits ``'s`` (so "red,white" → "redwhite" instead of "red white", and "it's"
→ "it 's"), and normalises even unanimous answers.  It also reads ``answers``, a list, which MMF's
evaluation loop does not accumulate across batches: past the first batch it indexes out of range.

Hence ``vqa_official_accuracy`` below, registered with MMF.

Data contract
=============

MMF rc10's evaluation concatenates only *tensor* fields named in ``required_params`` across batches
(``Report.accumulate_tensor_fields``); a list of answer strings would silently keep the first batch
only.  The raw human answers therefore travel as a tensor: ``answers_keys`` (``LongTensor``, one row
of ``num_answers`` per question) holds, for each human answer, a 63-bit hash of the exact string the
official comparison uses for that question (the stripped answer for a unanimous question, the
normalised answer otherwise; the two cases hash in separate domains, see ``answer_key``).  The metric
maps the predicted index to its vocabulary string, forms both keys of that string, and counts the
humans it matches — the official comparison, with no length limit, and a tensor that collates, concatenates
and all-gathers like any other.  ``0`` marks an empty slot; ``-1`` is a key that matches nothing.  The
``vqa_official_answer`` processor (``mmf_multilevel.processors.answers``) produces ``answers_keys``
(equal to ``encode_answer_keys(answers)``).  When a sample list has no ``answers_keys`` but carries the raw answers as
``answers`` (a list of lists of strings, one per question), the metric scores those strings directly.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from mmf.common.registry import registry
from mmf.modules.metrics import BaseMetric

from mmf_multilevel.evaluation.vqa import (  # noqa: F401  (re-exported: the metrics' definitions)
    ARTICLES,
    CONTRACTIONS,
    EMPTY_KEY,
    NUMBER_WORDS,
    PUNCTUATION,
    accuracy_from_matches,
    answer_key,
    clean_whitespace,
    comparison_forms,
    encode_answer_keys,
    normalize_answer,
    prediction_keys,
    process_digit_article,
    process_punctuation,
    vqa_official_accuracy,
)
from mmf_multilevel.registration import register_variants

__all__ = ["VQAOfficialAccuracy", "VQASoftScoreAccuracy"]


# --------------------------------------------------------------------------------------------
# MMF metrics
# --------------------------------------------------------------------------------------------


def _answer_processor(sample_list, processor_key: Optional[str], metric_name: str):
    dataset_name = sample_list.get("dataset_name") if hasattr(sample_list, "get") else None
    key = processor_key or f"{dataset_name}_answer_processor"
    processor = registry.get(key, no_warning=True)
    if processor is None:
        raise RuntimeError(
            f"{metric_name}: no answer processor registered as '{key}'; the metric maps predicted indices "
            "to answers through the dataset's 'answer_processor' (or pass params.processor_key)"
        )
    return processor


def _predicted_indices(scores: torch.Tensor, vocab_size: int, metric_name: str) -> torch.Tensor:
    if scores.dim() == 1 and not scores.is_floating_point():
        indices = scores
    elif scores.dim() == 2:
        if scores.size(1) != vocab_size:
            raise ValueError(
                f"{metric_name}: model 'scores' have {scores.size(1)} columns but the answer vocabulary has "
                f"{vocab_size} entries"
            )
        indices = scores.argmax(dim=1)
    else:
        raise ValueError(
            f"{metric_name}: 'scores' must be (batch, vocabulary) logits or (batch,) indices, got shape "
            f"{tuple(scores.shape)}"
        )
    return indices.detach().long().cpu()


def _mean(values: Sequence[float]) -> float:
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


@registry.register_metric("vqa_official_accuracy")
class VQAOfficialAccuracy(BaseMetric):
    """VQA accuracy identical to the official VQA evaluation.

    **Key**: ``vqa_official_accuracy``.  Predicts ``argmax(scores)`` over the answer vocabulary, turns
    it into the answer string through the dataset's answer processor
    (``registry.get(f"{dataset_name}_answer_processor")``, its ``idx2word``) and scores it against the
    question's human answers with the official rules (``vqa_official_accuracy``); returns the mean over
    the questions as a float64 tensor.

    Needs ``answers_keys`` in the sample list (``LongTensor`` batch × num_answers, written by the
    ``vqa_official_answer`` processor; see the module docstring), or — for a direct call on one batch —
    ``answers`` as a list of lists of human answer strings.

    Args:
        processor_key: registry key of the answer processor, default ``<dataset_name>_answer_processor``.
            (MMF rc10's ``Metrics`` drops a metric's ``params`` from the config — it reads them from the
            type name — so in rc10 this takes effect only when the metric is constructed directly.)
    """

    def __init__(self, processor_key: Optional[str] = None, *args, **kwargs):
        super().__init__("vqa_official_accuracy")
        self.required_params = ["scores", "answers_keys"]
        self.processor_key = processor_key
        self._key_tables = {}

    def _vocab_key_table(self, processor) -> torch.Tensor:
        """(vocab_size, 2) keys of every vocabulary entry: stripped and normalised."""
        owner = processor.__dict__.get("processor", processor)  # unwrap MMF's Processor wrapper
        cached = self._key_tables.get(id(owner))
        table = cached[1] if cached is not None and cached[0] is owner else None
        if table is None:
            if hasattr(processor, "vocab_keys"):
                table = processor.vocab_keys()
            else:  # any MMF answer processor with idx2word (e.g. MMF's own ``vqa_answer``)
                table = torch.tensor(
                    [prediction_keys(processor.idx2word(i)) for i in range(processor.get_vocab_size())],
                    dtype=torch.long,
                )
            self._key_tables[id(owner)] = (owner, table)
        return table

    def calculate(self, sample_list, model_output, *args, **kwargs):
        processor = _answer_processor(sample_list, self.processor_key, self.name)
        vocab_size = processor.get_vocab_size()
        predicted = _predicted_indices(model_output["scores"], vocab_size, self.name)
        batch = predicted.size(0)
        if batch == 0:
            raise ValueError(f"{self.name}: empty batch")
        keys = sample_list.get("answers_keys") if hasattr(sample_list, "get") else None
        if keys is not None:
            values = self._from_keys(keys, predicted, processor)
        else:
            values = self._from_strings(sample_list, predicted, processor)
        return model_output["scores"].new_tensor(_mean(values), dtype=torch.float64)

    def _from_keys(self, keys, predicted, processor) -> List[float]:
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"{self.name}: 'answers_keys' must be a (batch, num_answers) LongTensor, got {shape}")
        if keys.size(0) != predicted.size(0):
            raise ValueError(
                f"{self.name}: 'answers_keys' has {keys.size(0)} rows but 'scores' has {predicted.size(0)}"
            )
        keys = keys.detach().long().cpu()
        pred_keys = self._vocab_key_table(processor)[predicted]  # (batch, 2)
        matches = (keys.unsqueeze(2) == pred_keys.unsqueeze(1)).any(dim=2)  # (batch, slots)
        present = keys != EMPTY_KEY
        values = []
        for row, (hits, used) in enumerate(zip(matches.tolist(), present.tolist())):
            row_hits = [hit for hit, slot_used in zip(hits, used) if slot_used]
            if not row_hits:
                raise ValueError(f"{self.name}: question {row} of the batch has no human answers in 'answers_keys'")
            values.append(accuracy_from_matches(row_hits))
        return values

    def _from_strings(self, sample_list, predicted, processor) -> List[float]:
        answers = sample_list.get("answers") if hasattr(sample_list, "get") else None
        if not isinstance(answers, (list, tuple)) or not all(
            isinstance(row, (list, tuple)) and all(isinstance(a, str) for a in row) for row in answers
        ):
            fields = sorted(sample_list.keys()) if hasattr(sample_list, "keys") else []
            raise KeyError(
                f"{self.name} needs 'answers_keys' (LongTensor batch x num_answers, from the vqa_official_answer "
                f"processor) or 'answers' (a list of lists of human answer strings) in the sample list; "
                f"it has {fields}"
            )
        if len(answers) != predicted.size(0):
            raise ValueError(
                f"{self.name}: 'answers' holds {len(answers)} questions but 'scores' has {predicted.size(0)} rows "
                "(MMF's evaluation loop keeps only the first batch of a list field: carry 'answers_keys')"
            )
        return [
            vqa_official_accuracy(processor.idx2word(int(index)), row)
            for index, row in zip(predicted.tolist(), answers)
        ]


@registry.register_metric("vqa_soft_score_accuracy")
class VQASoftScoreAccuracy(BaseMetric):
    """The soft target of the predicted answer, averaged: ``mean(targets[i, argmax(scores[i])])``.

    **Key**: ``vqa_soft_score_accuracy``.  Fast and tensor-only.  With targets from the
    ``vqa_official_answer`` processor (each entry is the official accuracy of that vocabulary entry) it
    equals ``vqa_official_accuracy`` up to the float32 rounding of the targets.  Unlike MMF's
    ``vqa_accuracy`` it masks no column unless told to (``params.mask_index``), because the standard
    3,129-answer vocabulary has no ``<unk>`` entry.
    """

    def __init__(self, mask_index: Optional[int] = None, *args, **kwargs):
        super().__init__("vqa_soft_score_accuracy")
        self.required_params = ["scores", "targets"]
        self.mask_index = mask_index

    def calculate(self, sample_list, model_output, *args, **kwargs):
        scores = model_output["scores"]
        targets = sample_list["targets"]
        if scores.dim() != 2 or targets.shape != scores.shape:
            raise ValueError(
                f"{self.name}: 'scores' {tuple(scores.shape)} and 'targets' {tuple(targets.shape)} must both be "
                "(batch, vocabulary)"
            )
        if self.mask_index is not None:
            scores = scores.clone()
            scores[:, self.mask_index] = -math.inf
        predicted = scores.argmax(dim=1, keepdim=True)
        picked = targets.gather(1, predicted).squeeze(1).double()
        return picked.mean()


# --------------------------------------------------------------------------- GQA / VG-QA
@registry.register_metric("gqa_accuracy")
class GQAAccuracy(BaseMetric):
    """Exact-match accuracy of ``argmax(scores)`` against ``answer_index`` (``qa_single_answer``).

    An answer outside the vocabulary (``answer_index`` -1) is always wrong, as in the official GQA
    evaluation, whatever the model predicts.
    """

    def __init__(self, *args, **kwargs):
        super().__init__("gqa_accuracy")
        self.required_params = ["scores", "answer_index"]

    def calculate(self, sample_list, model_output, *args, **kwargs):
        scores = model_output["scores"]
        gold = sample_list["answer_index"].to(scores.device).view(-1)
        if scores.dim() != 2 or scores.size(0) != gold.numel():
            raise ValueError(f"gqa_accuracy: scores must be batch x vocabulary, got {tuple(scores.shape)} for {gold.numel()} answers")
        if gold.numel() == 0:
            raise ValueError("gqa_accuracy: empty batch")
        hits = (scores.argmax(dim=1) == gold) & (gold >= 0)
        return hits.double().mean()


# --------------------------------------------------------------------------- RefCOCO+
@registry.register_metric("refcoco_accuracy")
class RefCOCOAccuracy(BaseMetric):
    """Share of expressions whose top-scoring real proposal has IoU > 0.5 with the gold box.

    ``scores``: batch x proposals (one score per proposal; padding is never chosen), with the
    sample fields ``proposal_boxes``, ``num_proposals`` and ``gold_box`` of ``refcoco_plus``.
    """

    def __init__(self, threshold=0.5, *args, **kwargs):
        super().__init__("refcoco_accuracy")
        self.threshold = float(threshold)
        self.required_params = ["scores", "proposal_boxes", "num_proposals", "gold_box"]

    def calculate(self, sample_list, model_output, *args, **kwargs):
        from mmf_multilevel.evaluation.grounding import grounding_hits

        scores = model_output["scores"].float().cpu()
        proposals = sample_list["proposal_boxes"].float().cpu()
        if scores.dim() != 2 or scores.shape != proposals.shape[:2]:
            raise ValueError(
                f"refcoco_accuracy: scores must be batch x proposals {tuple(proposals.shape[:2])}, got {tuple(scores.shape)}"
            )
        hits = grounding_hits(scores, proposals, sample_list["num_proposals"].cpu(), sample_list["gold_box"].float().cpu(), self.threshold)
        return hits.double().mean()


# --------------------------------------------------------------------------- retrieval
def _gather_varsize(tensor):
    """All ranks' ``tensor`` (first dimension may differ), concatenated in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes)])


def pair_match_scores(scores):
    """One matching score per pair: the log-odds of a 2-way head, or a single logit."""
    if scores.dim() == 2 and scores.size(1) == 2:
        return scores[:, 1] - scores[:, 0]
    if scores.dim() == 2 and scores.size(1) == 1:
        return scores[:, 0]
    if scores.dim() == 1:
        return scores
    raise ValueError(f"retrieval metrics: expected scores of shape P x 2 or P x 1, got {tuple(scores.shape)}")


class _RetrievalMetric(BaseMetric):
    """Recall@K of image-text retrieval over all (image, caption) pairs of an evaluation split.

    Needs the whole split's pairs at once (MMF accumulates ``scores``, ``pair_image_index``,
    ``pair_text_index`` and ``targets`` over the evaluation batches); the pairs of all ranks are
    gathered first, so the value is that of the whole gallery on every rank. Ties between scores
    count against the model (see ``mmf_multilevel.evaluation.retrieval``).
    """

    key = None
    _cache = {}

    def __init__(self, *args, **kwargs):
        super().__init__(f"retrieval_{self.key}")
        self.required_params = ["scores", "pair_image_index", "pair_text_index", "targets"]

    @classmethod
    def _all(cls, sample_list, model_output):
        import weakref

        from mmf_multilevel.evaluation.retrieval import ranks, retrieval_metrics

        scores = model_output["scores"]
        cached = cls._cache.get("scores")
        if cached is not None and cached() is scores:  # the other recall keys of the same evaluation
            return cls._cache["values"]
        match = _gather_varsize(pair_match_scores(scores.detach().float().cpu()))
        image = _gather_varsize(sample_list["pair_image_index"].view(-1).cpu())
        text = _gather_varsize(sample_list["pair_text_index"].view(-1).cpu())
        target = _gather_varsize(sample_list["targets"].view(-1).cpu())
        if image.numel() == 0:
            raise ValueError("retrieval metrics: the evaluation gallery is empty")
        num_images, num_texts = int(image.max()) + 1, int(text.max()) + 1
        matrix = torch.full((num_images, num_texts), float("nan"))
        gt = torch.zeros((num_images, num_texts), dtype=torch.bool)
        matrix[image, text] = match
        gt[image, text] = target.bool()
        missing = int(torch.isnan(matrix).sum())
        if missing:
            raise ValueError(
                f"retrieval metrics: {missing} of the {num_images} x {num_texts} pairs were not scored; evaluate "
                "the whole split (eval_pairs: all) without evaluation.max_batches"
            )
        values = retrieval_metrics(*ranks(matrix, gt))
        cls._cache.clear()
        cls._cache.update(scores=weakref.ref(scores), values=values)
        return values

    def calculate(self, sample_list, model_output, *args, **kwargs):
        return torch.tensor(self._all(sample_list, model_output)[self.key], dtype=torch.float64)


register_variants(registry.register_metric, _RetrievalMetric, {
    f"retrieval_{key}": {"key": key} for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
})
