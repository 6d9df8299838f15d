"""VQA accuracy exactly as the official VQA evaluation computes it (framework-free; the MMF metrics
built on it are in ``mmf_multilevel.metrics``).

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
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
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
