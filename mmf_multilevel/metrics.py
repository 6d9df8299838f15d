"""VQA accuracy exactly as the official VQA evaluation computes it, and the MMF metrics built on it.

The official evaluation
=======================

The VQA v2 leaderboard scores an answer ``p`` for a question with human answers ``g_1 … g_n``
(``n = 10`` in VQA v2) as follows.

1. Every string has ``"\\n"`` and ``"\\t"`` replaced by spaces and is stripped.
2. If the stripped human answers are **not all identical**, the prediction and every human answer
   are normalised (``normalize_answer``); if all ``n`` humans wrote the very same string, nothing
   is normalised and the comparison is on the stripped strings.
3. For each human ``i`` the prediction is scored against the other ``n - 1`` humans:
   ``min(#{j != i : g_j == p} / 3, 1)``; the question's accuracy is the mean of those ``n`` values
   (for ``n = 10``: 1, 2, 3, ≥4 matching humans give 0.3, 0.6, 0.9, 1.0).

Normalisation, as the official code does it (where its published description and its code disagree,
the code is what produces leaderboard numbers, so the code's behaviour is reproduced):

- *punctuation*: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if the string
  contains that character next to a space, **or if the string contains a digit-comma-digit anywhere**
  ("1,000" → "1000"; "1,000-2,000" → "10002000"); otherwise it is replaced by a space
  ("red/white" → "red white").  Apostrophes, colons and all other characters are kept.  Then every
  period that is not followed by a digit is removed ("yes." → "yes", "1.5" stays; the official
  pattern's intended "not preceded by a digit" look-behind is malformed and has no effect), and the
  official code removes at most 32 of them (it passes ``re.UNICODE`` where ``re.sub`` expects ``count``).
- *digits and articles*: the text is lower-cased and split on whitespace; the words ``none zero one
  … ten`` become ``0 0 1 … 10``; the words ``a an the`` are dropped; words in the contraction table
  get their apostrophe back ("dont" → "don't", "whats" → "what's"); words are re-joined by one space.
  The official table also has four capitalised keys (``Im``, ``Ive``, ``Id've``, ``I'dve``) that
  can never match lower-cased text, and maps ``somebody'd`` to ``somebodyd``; both are reproduced
  in effect.  Digit tests use ASCII ``0-9`` (the official Python 2 code compiled its patterns without
  ``re.UNICODE``).

``normalize_answer`` is steps 1–2's normalisation; ``vqa_official_accuracy`` is the whole algorithm
for one question, summing in the official order so results are bit-identical.

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

import hashlib
import math
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from mmf.common.registry import registry
from mmf.modules.metrics import BaseMetric

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "VQAOfficialAccuracy",
    "VQASoftScoreAccuracy",
    "accuracy_from_matches",
    "answer_key",
    "clean_whitespace",
    "comparison_forms",
    "encode_answer_keys",
    "normalize_answer",
    "prediction_keys",
    "process_digit_article",
    "process_punctuation",
    "vqa_official_accuracy",
]

# --------------------------------------------------------------------------------------------
# Normalisation tables
# --------------------------------------------------------------------------------------------

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

#: Characters that become a space (or vanish, see ``process_punctuation``).  Not in the set:
#: apostrophe and colon (kept on purpose: possessives, times), period (handled separately), and any
#: other character (``* # & % $ ~ |`` …), which the official evaluation keeps as is.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# Contractions written without their apostrophe(s) get them back.  Most entries are the contraction
# with every apostrophe removed ("don't" <- "dont").
_SIMPLE_CONTRACTIONS = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd "
    "how'll how's isn't it'd it'll ma'am might've mightn't must've mustn't needn't not've o'clock "
    "oughtn't shan't should've shouldn't somebody'll somebody's someone'd someone'll someone's "
    "something'd something'll that's there'd there're there's they'd they'll they're they've wasn't "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'll who's "
    "who've why'll why're why's won't would've wouldn't y'all you'd you'll you're you've"
).split()
# Double contractions ("X'd've", "X'n't've") are repaired when exactly one of their two apostrophes
# is missing; the form with both missing ("couldntve") is not in the official table.
_DOUBLE_CONTRACTIONS = (
    "couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've "
    "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've"
).split()
# The remaining official entries, listed one by one.
_OTHER_CONTRACTIONS = {
    "twas": "'twas",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "let's": "let's",
    "she's": "she's",
    # The official table maps this one the wrong way round; kept for identical scores.
    "somebody'd": "somebodyd",
}


def _build_contractions() -> dict:
    table = {}
    for word in _SIMPLE_CONTRACTIONS:
        table[word.replace("'", "")] = word
    for word in _DOUBLE_CONTRACTIONS:
        first = word.index("'")
        second = word.index("'", first + 1)
        table[word[:first] + word[first + 1 :]] = word  # first apostrophe missing
        table[word[:second] + word[second + 1 :]] = word  # second apostrophe missing
    table.update(_OTHER_CONTRACTIONS)
    return table


#: apostrophe-less spelling -> contraction, as the official evaluation applies it to lower-cased words
CONTRACTIONS = _build_contractions()

_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?![0-9])")
_OFFICIAL_PERIOD_LIMIT = 32  # re.UNICODE == 32, passed positionally as ``count`` by the official code


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, then leading/trailing whitespace is stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation step (see the module docstring for the exact rules)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for char in PUNCTUATION:
        if char not in out:
            continue
        # The decision looks at the input text, not at the partially processed output.
        if delete_all or (char + " ") in text or (" " + char) in text:
            out = out.replace(char, "")
        else:
            out = out.replace(char, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, number words to digits, drop articles, repair contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise one answer exactly as the official VQA evaluation does for non-unanimous questions.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("1,000")
    '1000'
    >>> normalize_answer("dont know")
    "don't know"
    """
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a str, got {type(text).__name__}: {text!r}")
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def comparison_forms(gt_answers: Sequence[str]) -> Tuple[List[str], bool]:
    """The strings the official evaluation compares a prediction with, and whether they are normalised.

    Returns ``(forms, normalized)``: when the stripped human answers are all identical the forms
    are the stripped answers and ``normalized`` is False; otherwise they are the normalised answers.
    A prediction must be put in the same form (``normalize_answer`` or ``clean_whitespace``).
    """
    gt_answers = _check_answers(gt_answers, "gt_answers")
    stripped = [clean_whitespace(answer) for answer in gt_answers]
    if len(set(stripped)) > 1:
        return [process_digit_article(process_punctuation(answer)) for answer in stripped], True
    return stripped, False


def accuracy_from_matches(matches: Sequence[bool]) -> float:
    """Leave-one-out VQA accuracy from which human answers match the prediction (in annotation order).

    For each human ``i``: ``min(#matches among the other humans / 3, 1)``; returns the mean.
    Sums left to right like the official code, so the float result is bit-identical to it.
    """
    matches = [bool(hit) for hit in matches]
    if not matches:
        raise ValueError("VQA accuracy needs at least one human answer, got none")
    total_matches = sum(matches)
    total = 0.0
    for hit in matches:
        total += min(1.0, float(total_matches - hit) / 3)
    return total / len(matches)


def vqa_official_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers, exactly as the official VQA evaluation.

    Args:
        prediction: the model's answer string.
        gt_answers: the human answers for the question (10 in VQA v2), in annotation order.

    Returns:
        A float in [0, 1], e.g. 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / ≥4 of 10 humans matching.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}: {prediction!r}")
    forms, normalized = comparison_forms(gt_answers)
    predicted = normalize_answer(prediction) if normalized else clean_whitespace(prediction)
    return accuracy_from_matches([form == predicted for form in forms])


def _check_answers(gt_answers, what: str) -> List[str]:
    if isinstance(gt_answers, str) or not isinstance(gt_answers, Iterable):
        raise TypeError(f"{what} must be a list of answer strings, got {type(gt_answers).__name__}: {gt_answers!r}")
    gt_answers = list(gt_answers)
    if not gt_answers:
        raise ValueError(f"{what} is empty: VQA accuracy needs at least one human answer")
    for position, answer in enumerate(gt_answers):
        if not isinstance(answer, str):
            raise TypeError(f"{what}[{position}] must be a str, got {type(answer).__name__}: {answer!r}")
    return gt_answers


# --------------------------------------------------------------------------------------------
# Tensor encoding of the human answers (survives MMF collation and accumulation)
# --------------------------------------------------------------------------------------------

EMPTY_KEY = 0  #: an unused answer slot
NO_MATCH_KEY = -1  #: a key no answer has (e.g. the row of a reserved ``<unk>`` vocabulary entry)
_KEY_MASK = (1 << 63) - 1


def answer_key(form: str, normalized: bool) -> int:
    """A positive 63-bit key of a comparison form; normalised and stripped forms hash in separate domains.

    Equal forms in the same domain always give equal keys, in every process (the digest is keyed,
    not Python's salted ``hash``).  Two different forms share a key with probability 2**-63.
    """
    person = b"vqa-normalized" if normalized else b"vqa-stripped"
    digest = hashlib.blake2b(form.encode("utf-8", "surrogatepass"), digest_size=8, person=person).digest()
    return (int.from_bytes(digest, "little") & _KEY_MASK) or 1


def encode_answer_keys(gt_answers: Sequence[str], num_slots: Optional[int] = None) -> torch.Tensor:
    """``LongTensor(num_slots)`` of the official comparison keys of the human answers (``EMPTY_KEY`` pads)."""
    forms, normalized = comparison_forms(gt_answers)
    num_slots = len(forms) if num_slots is None else num_slots
    if len(forms) > num_slots:
        raise ValueError(f"{len(forms)} human answers do not fit in {num_slots} slots")
    keys = torch.full((num_slots,), EMPTY_KEY, dtype=torch.long)
    keys[: len(forms)] = torch.tensor([answer_key(form, normalized) for form in forms], dtype=torch.long)
    return keys


def prediction_keys(prediction: str) -> Tuple[int, int]:
    """The (stripped, normalised) keys of a predicted answer; it matches a human key if either is equal."""
    return answer_key(clean_whitespace(prediction), False), answer_key(normalize_answer(prediction), True)


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
        from mmf_multilevel.evaluation.retrieval import ranks, retrieval_metrics

        import weakref

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


for _key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"):
    registry.register_metric(f"retrieval_{_key}")(type(f"Retrieval_{_key}", (_RetrievalMetric,), {"key": _key}))
