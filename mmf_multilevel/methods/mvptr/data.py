"""MVPTR's pre-training corpus: captions with their phrase concepts, region features and object tags
(paper §3.1 "Model Input", §4.1 for the lengths).

``mvptr_captions`` reads the phrase-concept tool's ``captions.jsonl`` (``python -m
mmf_multilevel.methods.mvptr.concepts``: ``image_id``, ``input_ids`` with [CLS]/[SEP], ``phrase_ids``,
``phrase_positions``) and the region feature cache, one sample per caption:

* **text** (``input_ids`` / ``input_mask`` / ``segment_ids``, ``max_tokens + max_phrases`` = 35 + 5
  slots): ``[CLS] w_1..w_N c_1..c_M [SEP] pad``, N <= ``max_tokens - 2`` word-pieces, M <=
  ``max_phrases`` phrase concepts in the tool's order, truncated from the end (``phrase_spare_slots``:
  the official code also lets phrases use the word slots a short caption leaves free);
  ``phrase_slots`` marks the phrase positions (WPG reads their multimodal outputs).
  A record without ``input_ids`` (a plain caption corpus) is tokenised here and has no phrases.
* **MLM with chain masking** (paper §3.3, "Masked Language Modeling"): word-pieces are selected with
  ``mlm_probability`` (BERT 80/10/10, ``lm_label_ids`` = the original ids there); every phrase built
  from a selected word-piece becomes ``[MASK]`` whatever that piece's 80/10/10 outcome, so the phrase
  never leaks the word; each other phrase is selected with ``phrase_mask_probability`` (80 % ``[MASK]``,
  10 % a random concept id of the vocabulary, 10 % unchanged), as the official code does. Phrases are
  never predicted (their labels are ignored): the paper's MLM vocabulary holds word-pieces only.
* **tags** (``tag_ids`` / ``tag_mask``, ``max_tags`` = 20 slots, paper §3.1): ``[CLS] tag pieces [SEP]
  pad``. The tags are the image's detected class names (the region cache's ``objects`` over *all* its
  detections, named by the cache header's ``info.object_names`` or the ``tag_vocab`` file), each name
  once and sorted - the official code joins a set, whose order is arbitrary - word-piece tokenised
  and truncated to 18 pieces. Images without a tag get ``[CLS] [SEP]``; how many there are is counted
  when the dataset opens (``untagged_images``) and warned about.
* **MCR masking** (paper §3.2, "Masked Concept Recovering"): tag word-pieces selected with
  ``mcr_mask_probability`` (the paper's 0.25; the official code uses 0.15) and corrupted 80/10/10;
  ``mcr_label_ids`` holds the original word-piece ids there (the MCR targets are word-pieces, as the
  official code predicts them through the tied word decoder).
* **regions**: ``image_feature_0`` / ``image_info_0`` (the first ``max_features`` = 50 regions); the
  model builds the 6-d boxes through the batch contract. ``image_index`` numbers the caption's image
  (captions of one image share it), so that in-batch negatives never pair a caption with its own image.

``use_phrases: false`` and ``use_tags: false`` give the paper's Table 4 "w/o phrases" / "w/o tags" inputs.
"""
import json
import os
import warnings

import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample

from mmf_multilevel.datasets.base import RegionTaskBuilder, RegionTextDataset, data_path, setting
from mmf_multilevel.datasets.retrieval import RetrievalDataset
from mmf_multilevel.modules.masking import IGNORE_INDEX, mask_tokens
from mmf_multilevel.registration import register_variants
from mmf_multilevel.weak_corpus.inputs import _clean

__all__ = ["MVPTRInputs", "MVPTRQueryInputs", "MVPTRTaskMixin", "MVPTRCaptionsDataset", "MVPTRRetrievalDataset", "CONFIG_DIR",
           "chain_mask_phrases", "tag_names"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def chain_mask_phrases(phrase_ids, phrase_positions, selected_tokens, *, mask_token_id, concept_ids, prob,
                       generator=None):
    """Chain masking of one caption's phrase concepts (paper §3.3).

    ``phrase_ids`` ``(M,)``; ``phrase_positions``: for each phrase, the token positions it was built
    from; ``selected_tokens`` ``(T,)`` bool, the word-pieces MLM selected. A phrase with a selected
    token becomes ``mask_token_id``; every other phrase is selected with ``prob`` and then becomes
    ``mask_token_id`` (80 %), a uniform draw of ``concept_ids`` (10 %) or stays (10 %).
    Returns ``(masked phrase ids (M,), chained (M,) bool)``."""
    phrase_ids = torch.as_tensor(phrase_ids, dtype=torch.long)
    count, length = phrase_ids.numel(), selected_tokens.numel()
    chained = torch.zeros(count, dtype=torch.bool)
    for j, positions in enumerate(phrase_positions[:count]):
        chained[j] = any(0 <= p < length and bool(selected_tokens[p]) for p in positions)
    out = phrase_ids.clone()
    out[chained] = mask_token_id
    draw = torch.rand(count, generator=generator)
    other = (~chained) & (draw < prob)
    outcome = torch.rand(count, generator=generator)
    out[other & (outcome < 0.8)] = mask_token_id
    replace = other & (outcome >= 0.8) & (outcome < 0.9)
    if replace.any():
        pool = torch.as_tensor(concept_ids, dtype=torch.long)
        out[replace] = pool[torch.randint(len(pool), (int(replace.sum()),), generator=generator)]
    return out, chained


def tag_names(objects, names):
    """The sorted, de-duplicated class names of an image's detections (``objects``: class ids)."""
    found = set()
    for index in objects:
        index = int(index)
        if not 0 <= index < len(names):
            raise IndexError(f"detected class id {index} is outside the {len(names)} object names")
        found.add(names[index])
    return sorted(found)


class MVPTRInputs:
    """MVPTR's inputs for any region dataset: the ``[CLS] words phrases [SEP]`` text layout (with MLM and
    chain masking when the masking rates are above 0) and the ``[CLS] tags [SEP]`` sequence (with MCR
    masking likewise). Pre-training (:class:`MVPTRCaptionsDataset`) masks; the downstream datasets
    (:class:`MVPTRRetrievalDataset`) use the same layout unmasked."""

    def init_mvptr_inputs(self, config, masking=True):
        name = self.dataset_name
        get = lambda key: setting(config, key, name)  # noqa: E731
        self.max_tokens = int(get("max_tokens"))
        self.max_phrases = int(get("max_phrases"))
        self.max_tags = int(get("max_tags"))
        self.phrase_spare_slots = bool(get("phrase_spare_slots"))
        self.use_phrases = bool(get("use_phrases"))
        self.use_tags = bool(get("use_tags"))
        for key in ("mlm_probability", "phrase_mask_probability", "mcr_mask_probability"):
            value = float(get(key)) if masking else 0.0
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"dataset_config.{name}.{key} must lie in [0, 1], got {value}")
            setattr(self, key, value)
        if self.max_tokens < 3 or self.max_phrases < 0 or self.max_tags < 2:
            raise ValueError(f"dataset_config.{name}: max_tokens >= 3, max_phrases >= 0 and max_tags >= 2 "
                             f"are needed, got {self.max_tokens} / {self.max_phrases} / {self.max_tags}")
        data_dir = get("data_dir")
        masked_phrases = self.use_phrases and self.phrase_mask_probability > 0
        self.concept_ids = self._read_concepts(data_path(get("concepts"), data_dir)) if masked_phrases else []
        self.object_names = self._read_object_names(data_path(config.get("tag_vocab"), data_dir)) if self.use_tags else []
        self.untagged_images = self._count_untagged() if self.use_tags and bool(get("count_untagged")) else None
        self._objects = None

    # ------------------------------------------------------------------ downstream phrases
    def init_phrases(self, config, dataset_type, texts, key_of, what="texts"):
        """The phrases of a downstream dataset's texts from ``dataset_config.<name>.phrases`` (a path, or one per
        split; null: none): the concept tool's ``captions.jsonl`` over the same annotation file, run with the
        pre-training ``--concepts``. ``texts()``: ``[(key, text)]``, every text of this split with the key its tool
        line has (called only when a file is read); ``key_of(line)``: that key of a tool line (raising ``KeyError``
        / ``ValueError`` when the line has none). A tool line whose text differs from the dataset's is an error (the file was made from other
        annotations, or keyed by another ``--id-field``); a text without a tool line gets no phrases, and how many
        there are is counted (``texts_without_phrases``) and warned about once, when the dataset opens.
        Sets ``phrase_records``: key -> tool line, for :meth:`phrase_record`."""
        self.phrase_records, self.texts_without_phrases, self.phrases_path = {}, None, None
        entry = config.get("phrases") if self.use_phrases else None
        key = f"dataset_config.{self.dataset_name}.phrases"
        if entry is not None and not isinstance(entry, str):  # one file per split
            entry, key = entry.get(dataset_type), f"{key}.{dataset_type}"
        if not entry:
            return
        if self.max_phrases == 0 and not self.phrase_spare_slots:
            raise ValueError(f"{key} is set but dataset_config.{self.dataset_name}.max_phrases is 0 (and phrase_spare_slots "
                             "false): its phrases would take no slot; set max_phrases (the paper's 5), or phrases: null")
        path = self.phrases_path = data_path(entry, setting(config, "data_dir", self.dataset_name))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: {path} does not exist (the concept tool's captions.jsonl over this split's "
                                    "annotations, run with --concepts <the pre-training id2phrase.json>: python -m "
                                    "mmf_multilevel.methods.mvptr.concepts); null reads the texts without phrases")
        lines = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"a JSON {type(record).__name__}, not an object")
                    lines[key_of(record)] = (record, lineno)
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: expected a line of the concept tool's captions.jsonl with "
                                     f"'id', 'text', 'input_ids', 'phrase_ids' ({key}; {type(exc).__name__}: {exc})") from None
        missing, texts = 0, texts()
        for text_key, text in texts:
            found = lines.get(text_key)
            if found is None:
                missing += 1
                continue
            record, lineno = found
            if record.get("text") != _clean(text, False):
                raise ValueError(f"{path}:{lineno}: id {record.get('id')!r} holds the text {record.get('text')!r:.80} but "
                                 f"{self.annotation_path} has {text!r:.80} there ({key} was made from other annotations, "
                                 "or with another --id-field / --task)")
            self.phrase_records[text_key] = record
        self.texts_without_phrases = missing
        if missing:
            warnings.warn(f"{self.dataset_name} ({dataset_type}): {missing} of {len(texts)} {what} have no line in {path} "
                          f"({key}; the concept tool skipped them, see its summary.json): they are read without phrases")

    def phrase_record(self, key, image_id, text):
        """The record :meth:`mvptr_text` lays out for a downstream text: its concept-tool line (word-pieces and
        phrases) when :meth:`init_phrases` found one, else the plain text (no phrases)."""
        record = self.phrase_records.get(key)
        return record if record is not None else {"image_id": image_id, "text": text}

    # ------------------------------------------------------------------ vocabularies
    def _read_concepts(self, path):
        """The concept ids of ``id2phrase.json`` (the random replacements of phrase masking)."""
        from mmf_multilevel.methods.mvptr.concepts import read_id2phrase

        return sorted(read_id2phrase(path, f"dataset_config.{self.dataset_name}.concepts",
                                     "; use_phrases: false trains without phrases"))

    def _read_object_names(self, path):
        """Class names: the ``tag_vocab`` file (one a line, line k = class k), else the cache header's
        ``info.object_names`` (the extractor writes them)."""
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"dataset_config.{self.dataset_name}.tag_vocab: {path} does not exist")
            with open(path, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
            if not names:
                raise ValueError(f"dataset_config.{self.dataset_name}.tag_vocab: {path} holds no class name")
            return names
        names = self.reader.object_names
        if not names:
            raise KeyError(f"{self.features_path}: the cache header has no info.object_names (the detector's class "
                           f"names); set dataset_config.{self.dataset_name}.tag_vocab to a file of class names (one a "
                           "line, line k = class id k), or use_tags: false")
        return names

    def _count_untagged(self):
        ids = sorted({str(record["image_id"]) for record in self.records})
        untagged = []
        for image_id in ids:
            objects = self.reader.get(image_id).get("objects")
            if objects is None or len(objects) == 0:
                untagged.append(image_id)
        if untagged:
            shown = ", ".join(repr(i) for i in untagged[:5]) + (" ..." if len(untagged) > 5 else "")
            warnings.warn(f"{self.dataset_name}: {len(untagged)} of {len(ids)} images in {self.features_path} have no "
                          f"detected object (their tag sequence is [CLS] [SEP]): {shown}")
        return len(untagged)

    # ------------------------------------------------------------------ tokens
    @property
    def tokenizer(self):
        tokenizer = getattr(self.text_processor, "_tokenizer", None)
        if tokenizer is None:
            raise TypeError(f"dataset_config.{self.dataset_name}.processors.text_processor must be a BERT tokenizer "
                            "processor (bert_tokenizer) whose tokenizer the MVPTR dataset uses")
        return tokenizer

    def attach_visual(self, sample, image_id):
        cached = self.reader.get(str(image_id))
        sample.image_feature_0, sample.image_info_0 = self.record_fields(cached, image_id)
        self._objects = cached.get("objects")
        return False

    def _words(self, record):
        """The caption's word-pieces without [CLS]/[SEP], and whether they came from the concept tool."""
        tok = self.tokenizer
        if "input_ids" in record:
            ids = [int(i) for i in record["input_ids"]]
            if len(ids) < 2 or ids[0] != tok.cls_token_id or ids[-1] != tok.sep_token_id:
                raise ValueError(f"{self.annotation_path}: image {record['image_id']!r}: input_ids must start with "
                                 f"[CLS] ({tok.cls_token_id}) and end with [SEP] ({tok.sep_token_id}) of the "
                                 "dataset's tokenizer (the concept tool's --vocab must be the same vocab.txt)")
            return ids[1:-1], True
        text = record.get("text", record.get("caption"))
        if not isinstance(text, str):
            raise KeyError(f"{self.annotation_path}: image {record['image_id']!r} has neither input_ids nor a "
                           "text/caption field")
        return tok.convert_tokens_to_ids(tok.tokenize(text)), False

    def mvptr_text(self, record, sample):
        """``record`` (a concept-tool line, or one with ``text``/``caption``) -> the text fields of ``sample``:
        ``input_ids``, ``input_mask``, ``segment_ids``, ``lm_label_ids``, ``phrase_slots``."""
        tok = self.tokenizer
        words, with_phrases = self._words(record)
        words = words[: self.max_tokens - 2]
        phrases, positions = [], []
        if self.use_phrases and with_phrases:
            phrases = [int(i) for i in record.get("phrase_ids", [])]
            positions = [list(p) for p in record.get("phrase_positions", [[]] * len(phrases))]
            if len(positions) != len(phrases):
                raise ValueError(f"{self.annotation_path}: image {record['image_id']!r}: phrase_positions must hold one "
                                 f"list per phrase id ({len(phrases)})")
            budget = self.max_phrases + (self.max_tokens - 2 - len(words) if self.phrase_spare_slots else 0)
            phrases, positions = phrases[:budget], positions[:budget]
        slots = self.max_tokens + self.max_phrases
        ids = torch.full((slots,), tok.pad_token_id or 0, dtype=torch.long)
        n, m = len(words), len(phrases)
        ids[0] = tok.cls_token_id
        ids[1:1 + n] = torch.as_tensor(words, dtype=torch.long)
        ids[1 + n + m] = tok.sep_token_id
        mask = torch.zeros(slots, dtype=torch.long)
        mask[: n + m + 2] = 1
        word_mask = torch.zeros(slots, dtype=torch.long)
        word_mask[1:1 + n] = 1
        masked, labels = mask_tokens(ids, attention_mask=word_mask, vocab_size=len(tok), mask_token_id=tok.mask_token_id,
                                     prob=self.mlm_probability)
        phrase_slots = torch.zeros(slots, dtype=torch.long)
        if m:
            # positions count from [CLS] = 0 in the tool's input_ids and here alike
            chained_ids, _ = chain_mask_phrases(phrases, positions, labels != IGNORE_INDEX, mask_token_id=tok.mask_token_id,
                                                concept_ids=self.concept_ids, prob=self.phrase_mask_probability)
            masked[1 + n:1 + n + m] = chained_ids
            phrase_slots[1 + n:1 + n + m] = 1
        sample.input_ids, sample.lm_label_ids = masked, labels
        sample.input_mask, sample.segment_ids = mask, torch.zeros(slots, dtype=torch.long)
        sample.phrase_slots = phrase_slots
        return sample

    def add_tags(self, sample):
        """``tag_ids``, ``tag_mask``, ``mcr_label_ids`` of the image :meth:`attach_visual` read last."""
        tok = self.tokenizer
        pieces = []
        if self.use_tags and self._objects is not None:
            for name in tag_names(self._objects, self.object_names):
                pieces.extend(tok.tokenize(name))
        pieces = pieces[: self.max_tags - 2]
        ids = torch.full((self.max_tags,), tok.pad_token_id or 0, dtype=torch.long)
        ids[0], ids[len(pieces) + 1] = tok.cls_token_id, tok.sep_token_id
        if pieces:
            ids[1:1 + len(pieces)] = torch.as_tensor(tok.convert_tokens_to_ids(pieces), dtype=torch.long)
        mask = torch.zeros(self.max_tags, dtype=torch.long)
        mask[: len(pieces) + 2] = 1
        maskable = mask.clone()
        maskable[0] = maskable[len(pieces) + 1] = 0
        sample.tag_ids, sample.mcr_label_ids = mask_tokens(ids, attention_mask=maskable, vocab_size=len(tok),
                                                           mask_token_id=tok.mask_token_id, prob=self.mcr_mask_probability)
        sample.tag_mask = mask


class MVPTRQueryInputs(MVPTRInputs):
    """MVPTR's inputs for one query outside a dataset (:mod:`mmf_multilevel.predict`), laid out by the datasets'
    own code with the dataset's settings (``dataset_config.<name>``), unmasked: the text as ``[CLS] words [SEP]``
    (a raw text has no line in a concept tool's file; the datasets read a text their phrase file lacks the same
    way) and the ``[CLS] tags [SEP]`` of the query image's detections. ``object_names``: a callable giving the
    region source's class names (its cache header's ``info.object_names``), read when ``tag_vocab`` is not set."""

    def __init__(self, dataset_name, config, text_processor, object_names=None, source="the region source"):
        self.dataset_name = dataset_name
        self.text_processor = text_processor
        self.annotation_path = f"the query of {dataset_name}"
        self._object_names, self._source = object_names, source
        self.init_mvptr_inputs(config, masking=False)

    def _read_object_names(self, path):
        if path is not None:
            return super()._read_object_names(path)
        names = self._object_names() if self._object_names is not None else None
        if not names:
            raise KeyError(f"{self._source} names no object classes (info.object_names of a region cache header, or "
                           f"a detector's --object-vocab): set dataset_config.{self.dataset_name}.tag_vocab to a file "
                           "of class names (one a line, line k = class id k), or use_tags: false")
        return list(names)

    def _count_untagged(self):
        return None

    def text_sample(self, text: str) -> Sample:
        """``input_ids``, ``input_mask``, ``segment_ids``, ``lm_label_ids`` (all ignored), ``phrase_slots``."""
        return self.mvptr_text({"image_id": "query", "text": text}, Sample())

    def add_query_tags(self, record: dict, sample) -> None:
        """``tag_ids``, ``tag_mask``, ``mcr_label_ids`` of a region record (its ``objects``, every detection)."""
        self._objects = record.get("objects")
        self.add_tags(sample)


class MVPTRCaptionsDataset(MVPTRInputs, RegionTextDataset):
    """Concept-annotated captions (``captions.jsonl`` of the concept tool) over a region cache."""

    required_fields = ("image_id",)

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.init_mvptr_inputs(config, masking=True)
        # each caption's image as an integer (``image_index``): in-batch negatives never pair one image twice
        self.image_indices = {key: i for i, key in enumerate(sorted({str(r["image_id"]) for r in self.records}))}

    def build_sample(self, record, sample):
        self.mvptr_text(record, sample)
        sample.image_index = torch.tensor(self.image_indices[str(record["image_id"])], dtype=torch.long)
        self.add_tags(sample)
        return sample


class MVPTRRetrievalDataset(MVPTRInputs, RetrievalDataset):
    """COCO / Flickr30K retrieval (``datasets/retrieval.py``: one image a line with its ``captions``) in
    MVPTR's layout, unmasked: captions ``[CLS] words phrases [SEP]`` - the phrases from ``phrases``, the
    concept tool's ``captions.jsonl`` over the same annotation file with the pre-training vocabulary
    (``--concepts``), matched by image and caption position - and the image's tags. Training samples carry
    ``image_index`` / ``text_index`` for in-batch hard negatives; the gallery pairs are scored as
    ``coco_retrieval``'s."""

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.init_mvptr_inputs(config, masking=False)
        self.caption_position = [k for record in self.records for k, _ in enumerate(record["captions"])]
        texts = [((str(self.records[i]["image_id"]), k), caption)
                 for (i, caption), k in zip(self.texts, self.caption_position)]
        self.init_phrases(config, dataset_type, lambda: texts, self._phrase_key, what="captions")

    @staticmethod
    def _phrase_key(line):
        """A tool line's (image, caption position): its ``image_id`` and the ``k`` of its id ``<line>.<k>``."""
        return str(line["image_id"]), int(str(line["id"]).rsplit(".", 1)[1])

    def _text(self, index):
        fields = self._tokens.get(index)
        if fields is None:
            image_index, caption = self.texts[index]
            image_id = str(self.records[image_index]["image_id"])
            record = self.phrase_record((image_id, self.caption_position[index]), image_id, caption)
            fields = self.mvptr_text(record, Sample())
            if not self.training:  # the gallery's captions are laid out once, then reused (as coco_retrieval)
                self._tokens[index] = fields
        return fields

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        self.add_tags(sample)
        return sample


class MVPTRTaskMixin(MVPTRInputs):
    """A region task dataset (VQA v2, SNLI-VE, RefCOCO+) in MVPTR's layout: the task's own targets, its text (the
    ``text_field`` of the record: question, hypothesis, expression) as ``[CLS] words phrases [SEP]`` - the
    phrases from ``phrases``, the concept tool's ``captions.jsonl`` over the same annotation file (``--task``
    names the text and id fields; ``--concepts`` applies the pre-training vocabulary), matched by the record's
    ``id_field`` (question_id, pair_id, ref_id) - and the image's tags, all unmasked. ``phrases: null`` (or
    ``use_phrases: false``) lays the text out as ``[CLS] words [SEP]``."""

    text_field = None
    id_field = None

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.init_mvptr_inputs(config, masking=False)
        self.init_phrases(config, dataset_type, self._keyed_texts, lambda line: str(line["id"]),
                          what={"hypothesis": "hypotheses"}.get(self.text_field, f"{self.text_field}s"))

    def _keyed_texts(self):
        out = []
        for record in self.records:
            key = record.get(self.id_field)
            if key is None or isinstance(key, bool) or not isinstance(key, (int, str)):
                raise ValueError(f"{self.annotation_path}: the record of {self.text_field} {record[self.text_field]!r:.60} has "
                                 f"no string or integer '{self.id_field}', the id its phrases are matched by "
                                 f"(dataset_config.{self.dataset_name}.phrases); phrases: null reads it without phrases")
            out.append((str(key), record[self.text_field]))
        return out

    def build_sample(self, record, sample):
        super().build_sample(record, sample)
        text = record[self.text_field]
        viewed = self.view_text(text)
        # a text the sample's view rewrites (left/right after a flip) no longer matches its tool line
        key = str(record[self.id_field]) if viewed == text else None
        self.mvptr_text(self.phrase_record(key, record["image_id"], viewed), sample)
        self.add_tags(sample)
        return sample


# registration runs once, when the module is imported: mutation testing imports every module before it
# activates a mutant, so it cannot reach this code (tests/methods/test_mvptr_data.py checks what it registers)
def _builders():  # pragma: no mutate block
    class MVPTRCaptionsBuilder(RegionTaskBuilder):
        name = "mvptr_captions"
        dataset_class = MVPTRCaptionsDataset

        @classmethod
        def config_path(cls):
            return os.path.join(CONFIG_DIR, f"{cls.name}.yaml")

    class MVPTRRetrievalBuilder(MVPTRCaptionsBuilder):
        dataset_class = MVPTRRetrievalDataset

        def num_outputs(self, dataset):
            return 2

    register_variants(registry.register_builder, MVPTRCaptionsBuilder, {"mvptr_captions": {"name": "mvptr_captions"}},
                      suffix="Builder")
    from mmf_multilevel.datasets.refcoco import RefCOCOPlusBuilder
    from mmf_multilevel.datasets.snli_ve import SNLIVEBuilder
    from mmf_multilevel.datasets.vqa2 import VQA2Builder

    # the text and id fields the concept tool's --task reads (TASK_FIELDS), after the datasets' own validation
    # (SNLI-VE's official names are copied to these)
    for base, field, key in ((VQA2Builder, "question", "question_id"), (SNLIVEBuilder, "hypothesis", "pair_id"),
                             (RefCOCOPlusBuilder, "expression", "ref_id")):
        name = f"mvptr_{base.name}"
        dataset = type(f"MVPTR{base.dataset_class.__name__}", (MVPTRTaskMixin, base.dataset_class),
                       {"text_field": field, "id_field": key, "__module__": __name__})
        register_variants(registry.register_builder, base, {name: {
            "name": name, "dataset_class": dataset,
            "config_path": classmethod(lambda cls, name=name: os.path.join(CONFIG_DIR, f"{name}.yaml"))}},
            suffix="Builder")
    register_variants(registry.register_builder, MVPTRRetrievalBuilder,
                      {name: {"name": name} for name in ("mvptr_coco_retrieval", "mvptr_flickr30k_retrieval")},
                      suffix="Builder")


_builders()
