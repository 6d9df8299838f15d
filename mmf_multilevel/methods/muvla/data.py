"""μ-VLA's pre-training datasets on the weakly aligned corpus (paper §3.2-§3.3).

All of them read the weak-corpus builder's jsonl (``python -m mmf_multilevel.weak_corpus build``; one
record per image: ``captions`` (K retrieved sentences), ``objects`` / ``objects_ids`` (per-region tag
and tag id, feature-row order), ``noun_phrases`` (per caption), ``objects_cs`` / ``objects_cs_arg``
(N x K link score s' and linked phrase index)) plus the region feature cache, and put the task in
``muvla_task`` for the ``muvla`` model:

* ``muvla_region_tag`` (R-T): the text side is the image's tag sequence, every tag word-piece
  carrying its region's 5-d box (``tag_boxes``); 15 % of the tag word-pieces masked (80/10/10,
  ``lm_label_ids``) and 15 % of the real regions selected (``region_selected``), 90 % of those
  zeroed (``region_zeroed``), with their tag ids as MRC labels (``mrc_labels``).
* ``muvla_region_phrase`` (R-P): one of the K captions, uniformly. ``rp_mask_mode: paper`` (default,
  paper §3.3.2): a fair coin picks the modality. Text: linked noun phrase k is masked with
  probability ``0.15 * s'_k`` (s'_k: the best link score of the phrase), all its word-pieces
  together (``rp_text_unit: phrase``) or each on its own (``token``), then 80/10/10. Regions:
  region i is selected with probability ``0.15 * s'_i`` (0 when unlinked), and predicts one
  word-piece of its linked phrase, drawn uniformly (``mrtc_labels``, p-MRTC). When the chosen side
  has nothing linked, the other side is masked (:meth:`RegionPhraseDataset.choose_side`). ``released``: the official recipe, standard 15 %
  MLM over all tokens and the linked-region masking in the same sample.
* ``muvla_image_sentence`` (I-S): one of the K captions; with ``itm_probability`` (0.5) it is
  replaced by a caption of another image (``is_correct = 0``); ``objectives`` ``[mlm, itm]``: 15 %
  MLM (on positive pairs only unless ``mlm_on_negatives``) and ITM. ``muvla_sentence_mlm`` and
  ``muvla_sentence_itm`` are the same dataset with ``[mlm]`` / ``[itm]``: the official code's split
  into two datasets (4 pre-training datasets in all).
* ``muvla_text``: unpaired sentences for MLM alone, no image (U-VisualBERT's text side).

Masks are drawn in the dataset (per sample, in the loader workers); the features stay unmasked in
``image_feature_0`` (the MRFR target), the batch contract (``methods/batch.py``) zeroes the ``region_zeroed`` rows for the network.
"""
import json
import os
import random

import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample
from mmf.datasets.base_dataset import BaseDataset

from mmf_multilevel.datasets.base import RegionTaskBuilder, RegionTextDataset, data_path
from mmf_multilevel.datasets.pretraining import mask_sample_regions
from mmf_multilevel.methods.muvla.network import TASK_IDS
from mmf_multilevel.modules.masking import IGNORE_INDEX, mask_tokens
from mmf_multilevel.modules.visual import normalize_boxes
from mmf_multilevel.registration import register_variants

#: the default configs of these datasets (absolute: RegionTaskBuilder joins them onto the shared folder)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
RP_MASK_MODES = ("paper", "released")
OBJECTIVES = ("mlm", "itm")


def _check_matrix(value, rows, cols, name):
    if not isinstance(value, list) or len(value) != rows:
        return f"field '{name}' must be a list of {rows} rows (one per region in 'objects'), got {type(value).__name__} of length {len(value) if isinstance(value, list) else '-'}"
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != cols:
            return f"field '{name}' row {i} must hold {cols} values (one per caption)"
    return None


class _TextMixin:
    """Tokenising, padding and BERT masking through the dataset's ``text_processor`` tokenizer."""

    @property
    def tokenizer(self):
        tokenizer = getattr(self.text_processor, "_tokenizer", None)
        if tokenizer is None:
            raise TypeError(f"dataset_config.{self.dataset_name}.processors.text_processor must be a BERT tokenizer "
                            "processor (bert_tokenizer / masked_token) whose tokenizer the μ-VLA datasets use")
        return tokenizer

    @property
    def max_seq_length(self):
        return int(getattr(self.text_processor, "_max_seq_length", None) or 60)

    def _ids(self, pieces):
        return self.tokenizer.convert_tokens_to_ids(pieces)

    def _finish_text(self, sample, pieces):
        """``[CLS] pieces [SEP]`` padded to ``max_seq_length``: input_ids, input_mask, segment_ids."""
        tok = self.tokenizer
        length = self.max_seq_length
        ids = [tok.cls_token_id] + self._ids(pieces) + [tok.sep_token_id]
        ids = ids + [tok.pad_token_id or 0] * (length - len(ids))
        mask = [1] * (len(pieces) + 2) + [0] * (length - len(pieces) - 2)
        sample.input_ids = torch.tensor(ids, dtype=torch.long)
        sample.input_mask = torch.tensor(mask, dtype=torch.long)
        sample.segment_ids = torch.zeros(length, dtype=torch.long)
        return sample

    def _mask_text(self, sample, prob):
        """BERT 80/10/10 corruption of ``sample.input_ids`` (``prob``: a number or per-token tensor)."""
        tok = self.tokenizer
        masked, labels = mask_tokens(
            sample.input_ids, attention_mask=sample.input_mask, vocab_size=len(tok), mask_token_id=tok.mask_token_id,
            prob=prob, special_token_ids=[tok.cls_token_id, tok.sep_token_id],
        )
        sample.input_ids, sample.lm_label_ids = masked, labels
        return sample

    def _no_text_labels(self, sample):
        sample.lm_label_ids = torch.full_like(sample.input_ids, IGNORE_INDEX)
        return sample


    def _finish(self, sample):
        sample.muvla_task = torch.tensor(TASK_IDS[self.task], dtype=torch.long)
        return sample


class WeakCorpusDataset(_TextMixin, RegionTextDataset):
    """Base of the μ-VLA datasets: one weak-corpus record per image (see the module docstring)."""

    required_fields = ("image_id", "captions", "objects")
    task = None

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.mlm_probability = float(config.get("mlm_probability", 0.15))
        self.region_mask_probability = float(config.get("region_mask_probability", 0.15))
        self.region_zero_ratio = float(config.get("region_zero_ratio", 0.9))
        for key in ("mlm_probability", "region_mask_probability", "region_zero_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"dataset_config.{dataset_name}.{key} must lie in [0, 1], got {getattr(self, key)}")

    # ------------------------------------------------------------------ records
    def validate_record(self, record):
        captions = record.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            return "field 'captions' must be a non-empty list of non-empty strings"
        objects = record.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            return "field 'objects' must be a list of tag strings (one per region)"
        ids = record.get("objects_ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) != len(objects)):
            return f"field 'objects_ids' must list one tag id per region ({len(objects)})"
        phrases = record.get("noun_phrases")
        if phrases is not None and (not isinstance(phrases, list) or len(phrases) != len(captions)):
            return f"field 'noun_phrases' must hold one list per caption ({len(captions)})"
        for key in ("objects_cs", "objects_cs_arg"):
            if record.get(key) is not None:
                problem = _check_matrix(record[key], len(objects), len(captions), key)
                if problem:
                    return problem
        return None

    # ------------------------------------------------------------------ regions
    def _num_regions(self, sample):
        return int(sample.image_info_0.max_features)

    def _region_boxes(self, sample):
        info = sample.image_info_0
        boxes = normalize_boxes(info.bbox, int(info.image_width), int(info.image_height), mode="5d")
        boxes[self._num_regions(sample):] = 0
        return boxes

    def _mask_regions(self, sample, prob):
        """Select regions with ``prob`` (``(max_features,)``, 0 for padding); zero ``region_zero_ratio``
        of them, keep the rest. Sets ``region_selected``, ``region_zeroed`` and ``region_source`` (the
        shared masked-region decisions, ``mmf_multilevel.datasets.pretraining``)."""
        return mask_sample_regions(sample, prob, zero_ratio=self.region_zero_ratio)

    def _real_prob(self, sample, p):
        prob = torch.zeros(self.max_features)
        prob[: self._num_regions(sample)] = p
        return prob

# ====================================================================================== R-T
class RegionTagDataset(WeakCorpusDataset):
    task = "region_tag"

    def build_sample(self, record, sample):
        count = self._num_regions(sample)
        boxes = self._region_boxes(sample)
        pieces, piece_boxes = [], []
        budget = self.max_seq_length - 2
        for i, tag in enumerate(record["objects"][:count]):
            for piece in self.tokenizer.tokenize(tag):
                if len(pieces) == budget:
                    break
                pieces.append(piece)
                piece_boxes.append(boxes[i])
        self._finish_text(sample, pieces)
        tag_boxes = torch.zeros(self.max_seq_length, 5)
        if pieces:
            tag_boxes[1: 1 + len(pieces)] = torch.stack(piece_boxes)
        sample.tag_boxes = tag_boxes
        self._mask_text(sample, self.mlm_probability)
        self._mask_regions(sample, self._real_prob(sample, self.region_mask_probability))
        labels = torch.full((self.max_features,), -1, dtype=torch.long)
        ids = record.get("objects_ids")
        if ids is None:
            raise KeyError(f"{self.annotation_path}: image {record['image_id']!r} has no 'objects_ids' (the MRC labels of R-T)")
        n = min(count, len(ids))
        labels[:n] = torch.as_tensor(ids[:n], dtype=torch.long)
        sample.mrc_labels = labels
        return self._finish(sample)


# ====================================================================================== R-P
def _find(pieces, phrase, used):
    """Start of the first occurrence of ``phrase`` in ``pieces`` not overlapping ``used``, or -1."""
    n = len(phrase)
    for start in range(len(pieces) - n + 1):
        if pieces[start: start + n] == phrase and not any(used[start: start + n]):
            return start
    return -1


class RegionPhraseDataset(WeakCorpusDataset):
    task = "region_phrase"
    required_fields = ("image_id", "captions", "objects", "noun_phrases", "objects_cs", "objects_cs_arg")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.mask_mode = str(config.get("rp_mask_mode", "paper"))
        if self.mask_mode not in RP_MASK_MODES:
            raise ValueError(f"dataset_config.{dataset_name}.rp_mask_mode must be one of {list(RP_MASK_MODES)}, got {self.mask_mode!r}")
        self.text_unit = str(config.get("rp_text_unit", "phrase"))
        if self.text_unit not in ("phrase", "token"):
            raise ValueError(f"dataset_config.{dataset_name}.rp_text_unit must be 'phrase' or 'token', got {self.text_unit!r}")

    def phrase_scores(self, record, j):
        """s'_k of every noun phrase k of caption j: the best link score of a region linked to it."""
        scores = [0.0] * len(record["noun_phrases"][j])
        for row, args in zip(record["objects_cs"], record["objects_cs_arg"]):
            k = int(args[j])
            if 0 <= k < len(scores):
                scores[k] = max(scores[k], float(row[j]))
        return scores

    def build_sample(self, record, sample):
        j = random.randrange(len(record["captions"]))
        tok = self.tokenizer
        pieces = tok.tokenize(self.view_text(record["captions"][j]))[: self.max_seq_length - 2]
        self._finish_text(sample, pieces)
        count = self._num_regions(sample)
        phrases = record["noun_phrases"][j]

        # text side: word-pieces of linked phrases with probability 0.15 * s'_k
        token_prob = torch.zeros(self.max_seq_length)
        used = [False] * len(pieces)
        has_text = False  # a linked phrase is in the (truncated) text
        for k, score in enumerate(self.phrase_scores(record, j)):
            if score <= 0:
                continue
            phrase = tok.tokenize(phrases[k])
            start = _find(pieces, phrase, used) if phrase else -1
            if start < 0:
                continue
            for p in range(start, start + len(phrase)):
                used[p] = True
            has_text = True
            p_mask = min(1.0, self.mlm_probability * score)
            if self.text_unit == "phrase":  # the phrase as a whole: all its pieces or none
                p_mask = 1.0 if random.random() < p_mask else 0.0
            token_prob[1 + start: 1 + start + len(phrase)] = p_mask
        # region side: 0.15 * s'_i for tagged regions; untagged real rows 0 (paper) / 0.15 (released)
        region_prob = torch.zeros(self.max_features)
        tagged = min(count, len(record["objects"]))
        scores = torch.tensor([float(row[j]) for row in record["objects_cs"][:tagged]])
        region_prob[:tagged] = (self.region_mask_probability * scores).clamp(max=1.0)
        if self.mask_mode == "released":
            region_prob[tagged:count] = self.region_mask_probability

        side = self.choose_side(has_text, bool((region_prob[:tagged] > 0).any()))
        if side == "both":
            self._mask_text(sample, self.mlm_probability)
        elif side == "text":
            self._mask_text(sample, token_prob)
            region_prob = torch.zeros(self.max_features)
        else:
            self._no_text_labels(sample)
        selected = self._mask_regions(sample, region_prob)
        sample.mrtc_labels = self.mrtc_labels(record, j, selected)
        return self._finish(sample)

    def choose_side(self, has_text: bool, has_regions: bool) -> str:
        """The modality this sample masks: ``both`` (``released``), else a fair coin between ``text`` and
        ``regions``, falling back to the other side when the chosen one has nothing linked."""
        if self.mask_mode == "released":
            return "both"
        side = "text" if random.random() < 0.5 else "regions"
        if side == "text" and not has_text and has_regions:
            return "regions"
        if side == "regions" and not has_regions and has_text:
            return "text"
        return side

    def mrtc_labels(self, record, j, selected):
        """Per selected tagged region: one word-piece of its linked noun phrase, drawn uniformly."""
        labels = torch.full((self.max_features,), IGNORE_INDEX, dtype=torch.long)
        phrases = record["noun_phrases"][j]
        for i in selected.nonzero().view(-1).tolist():
            if i >= len(record["objects_cs_arg"]):
                continue
            k = int(record["objects_cs_arg"][i][j])
            if k < 0 or k >= len(phrases) or float(record["objects_cs"][i][j]) <= 0:
                continue
            pieces = self.tokenizer.tokenize(phrases[k])
            if pieces:
                labels[i] = self._ids([random.choice(pieces)])[0]
        return labels


# ====================================================================================== I-S
class ImageSentenceDataset(WeakCorpusDataset):
    task = "image_sentence"
    default_objectives = ("mlm", "itm")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        objectives = config.get("objectives")
        self.objectives = tuple(objectives) if objectives is not None else self.default_objectives
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ValueError(f"dataset_config.{dataset_name}.objectives must be a non-empty subset of {list(OBJECTIVES)}, "
                             f"got {list(self.objectives)}")
        default_p = 0.5 if "itm" in self.objectives else 0.0
        value = config.get("itm_probability")
        self.itm_probability = default_p if value is None else float(value)
        self.mlm_on_negatives = bool(config.get("mlm_on_negatives", False))
        if "itm" in self.objectives and len(self.records) < 2 and self.itm_probability > 0:
            raise ValueError(f"{self.annotation_path}: ITM negatives need at least two images")

    def _negative_caption(self, image_id):
        for _ in range(20):
            other = self.records[random.randrange(len(self.records))]
            if str(other["image_id"]) != image_id:
                return random.choice(other["captions"])
        return None

    def build_sample(self, record, sample):
        caption, matched = random.choice(record["captions"]), 1
        if "itm" in self.objectives and random.random() < self.itm_probability:
            other = self._negative_caption(str(record["image_id"]))
            if other is not None:
                caption, matched = other, 0
        pieces = self.tokenizer.tokenize(self.view_text(caption))[: self.max_seq_length - 2]
        self._finish_text(sample, pieces)
        if "mlm" in self.objectives:
            if matched or self.mlm_on_negatives:
                self._mask_text(sample, self.mlm_probability)
            else:
                self._no_text_labels(sample)
        if "itm" in self.objectives:
            sample.is_correct = torch.tensor(matched, dtype=torch.long)
        return self._finish(sample)


class SentenceMLMDataset(ImageSentenceDataset):
    default_objectives = ("mlm",)


class SentenceITMDataset(ImageSentenceDataset):
    default_objectives = ("itm",)


# ====================================================================================== text only
class TextCorpusDataset(_TextMixin, BaseDataset):
    """Unpaired text for MLM alone (U-VisualBERT's BookCorpus side): a ``.txt`` file (one sentence a
    line) or a jsonl with ``text`` (or ``caption`` / ``sentence``) per line; no image input."""

    task = "text"
    TEXT_FIELDS = ("text", "caption", "sentence")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type)
        annotations = config.annotations[dataset_type]
        if isinstance(annotations, str):
            annotations = [annotations]
        self.annotation_path = data_path(annotations[index], config.get("data_dir"))
        self.mlm_probability = float(config.get("mlm_probability", 0.15))
        self.sentences = self._read(self.annotation_path)

    @classmethod
    def _read(cls, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"text corpus not found: {path}")
        sentences = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if path.endswith(".jsonl"):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                    text = next((record[k] for k in cls.TEXT_FIELDS if isinstance(record.get(k), str)), None)
                    if text is None or not text.strip():
                        raise ValueError(f"{path}:{number}: no non-empty 'text' (or 'caption' / 'sentence') field")
                    line = text.strip()
                sentences.append(line)
        if not sentences:
            raise ValueError(f"{path}: the text corpus holds no sentence")
        return sentences

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, idx):
        sample = Sample()
        sample.id = torch.tensor(idx, dtype=torch.long)
        pieces = self.tokenizer.tokenize(self.sentences[idx])[: self.max_seq_length - 2]
        self._finish_text(sample, pieces)
        self._mask_text(sample, self.mlm_probability)
        return self._finish(sample)


@registry.register_builder("muvla_text")
class TextCorpusBuilder(RegionTaskBuilder):
    name = "muvla_text"
    dataset_class = TextCorpusDataset
    config_file = os.path.join(CONFIG_DIR, "muvla_text.yaml")


# ====================================================================================== builders
register_variants(registry.register_builder, RegionTaskBuilder, {
    name: {"name": name, "dataset_class": dataset_class, "config_file": os.path.join(CONFIG_DIR, f"{name}.yaml")}
    for name, dataset_class in (
        ("muvla_region_tag", RegionTagDataset),
        ("muvla_region_phrase", RegionPhraseDataset),
        ("muvla_image_sentence", ImageSentenceDataset),
        ("muvla_sentence_mlm", SentenceMLMDataset),
        ("muvla_sentence_itm", SentenceITMDataset),
    )
}, suffix="Builder")
