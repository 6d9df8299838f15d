"""Retrieval builder pieces that need no model: inputs, queries, search, linking math, manifests, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers.weak_corpus import write_jsonl, write_lines
from mmf_multilevel.weak_corpus import inputs as inp
from mmf_multilevel.weak_corpus import search as srch
from mmf_multilevel.weak_corpus._util import Manifest, Report, RetrievalError, StageMismatchError
from mmf_multilevel.weak_corpus.link import link_tags, normalize_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- package / CLI
def test_import_is_light_and_help_works():
    code = (
        "import sys, mmf_multilevel.weak_corpus, mmf_multilevel.weak_corpus.__main__ as m\n"
        "heavy = [n for n in ('torch', 'faiss', 'spacy', 'sentence_transformers', 'transformers') if n in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    for cmd in ("build", "encode", "search", "link"):
        res = subprocess.run([sys.executable, "-m", "mmf_multilevel.weak_corpus", cmd, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert "--work" in res.stdout
    res = subprocess.run([sys.executable, "-m", "mmf_multilevel.weak_corpus", "build", "--help"], capture_output=True, text=True, cwd=ROOT)
    for flag in ("--top-k", "--sbert", "--spacy", "--index", "--device", "--batch-size", "--exclude-self", "--metric"):
        assert flag in res.stdout


def test_cli_missing_input_is_a_clear_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "mmf_multilevel.weak_corpus", "build", "--features", str(tmp_path / "nope.jsonl"),
         "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "w.jsonl")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MMF_ML_NO_PROGRESS": "1"},
    )
    assert res.returncode == 2
    assert "--corpus" in res.stderr and "c.txt: no such file" in res.stderr


# --------------------------------------------------------------------------- queries
def test_ranked_query_follows_official_sort_objects():
    tags = ["man", "horse", "hat", "horse", "grass"]
    boxes = [[0, 0, 50, 100], [10, 10, 90, 90], [5, 0, 20, 10], [50, 50, 60, 60], [0, 0, 5, 5]]
    conf = [0.9, 0.8, 0.7, 0.9, 0.95]
    # kept: man (area .5), horse (.64), hat (.015), horse (.01); grass area .0025 < 1% -> dropped
    query, fallback = inp.build_query(tags, conf, boxes, 100, 100)
    # scores: horse 10*2/4 + 6.4 = 11.4, man 2.5 + 5 = 7.5, hat 2.5 + .15 = 2.65
    assert query == "horse man hat" and not fallback
    # low confidence drops the detection
    query, _ = inp.build_query(tags, [0.9, 0.1, 0.7, 0.1, 0.95], boxes, 100, 100)
    assert query == "man hat"
    # nothing survives the filter -> all detections (reported)
    query, fallback = inp.build_query(["a", "b"], [0.1, 0.2], None, None, None)
    assert fallback and query == "a b"
    # no boxes / conf: only counts rank, ties keep first appearance
    assert inp.build_query(["cat", "dog", "dog", "cat", "sofa"])[0] == "cat dog sofa"
    assert inp.build_query(["b", "a", "b"], mode="unique")[0] == "b a"
    assert inp.build_query(["b", "a", "b"], mode="all")[0] == "b a b"
    with pytest.raises(RetrievalError, match="query mode"):
        inp.build_query(["a"], mode="nope")


# --------------------------------------------------------------------------- corpus input
def test_corpus_bad_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first sentence\n\n   \nbad \xff\xfe bytes\nsecond   sentence\r\nthird\n")
    report = Report(quiet=True)
    info = inp.prepare_corpus(str(path), str(tmp_path / "c"), report)
    assert info["rows"] == 3
    assert report.counts == {"corpus_empty_line": 2, "corpus_not_utf8": 1}
    assert any("corpus.txt:4" in m for m in report.examples["corpus_not_utf8"])
    assert any("corpus.txt:2" in m for m in report.examples["corpus_empty_line"])
    text = inp.CorpusText(str(tmp_path / "c"))
    assert text.texts(0, 3) == ["first sentence", "second sentence", "third"]
    assert text.text(1) == "second sentence"
    assert text.owners() is None
    text.close()
    # prepared once: a rerun reuses it (and still reports its problems)
    again = Report(quiet=True)
    assert inp.prepare_corpus(str(path), str(tmp_path / "c"), again)["rows"] == 3
    assert again.counts == report.counts


def test_corpus_jsonl(tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "A dog.", "image_id": 7}),
        "not json",
        json.dumps({"id": "b", "caption": "A cat\non a mat.", "image_id": 8}),
        json.dumps({"id": "a", "text": "repeated id"}),
        json.dumps({"id": "c", "other": "x"}),
        json.dumps(["list"]),
        json.dumps({"id": "d", "text": 5}),
        json.dumps({"id": "e", "sentence": "No owner."}),
    ]
    path = write_lines(tmp_path / "corpus.jsonl", lines)
    report = Report(quiet=True)
    info = inp.prepare_corpus(path, str(tmp_path / "c"), report, lowercase=True)
    assert info["rows"] == 3 and info["has_owners"]
    assert report.counts == {"corpus_bad_json": 2, "corpus_duplicate_id": 1, "corpus_missing_text": 2}
    assert "corpus.jsonl:4" in report.examples["corpus_duplicate_id"][0]
    text = inp.CorpusText(str(tmp_path / "c"))
    assert text.texts(0, 3) == ["a dog.", "a cat on a mat.", "no owner."]
    assert text.owners() == ["7", "8", None]
    text.close()


# --------------------------------------------------------------------------- image input
def test_tags_jsonl_bad_input(tmp_path):
    recs = [
        {"image_id": 1, "tags": ["man", "horse"], "boxes": [[0, 0, 10, 10], [0, 0, 50, 50]], "conf": [0.9, 0.8], "image_w": 100, "image_h": 100},
        {"image_id": 2, "tags": []},
        {"image_id": 1, "tags": ["cat"]},
        {"tags": ["cat"]},
        {"image_id": 3, "tags": "cat"},
        {"image_id": 4, "tags": ["cat", "dog"], "boxes": [[0, 0, 1, 1]]},
        {"image_id": "x5", "tags": ["cat", ""]},
    ]
    path = write_jsonl(tmp_path / "tags.jsonl", recs)
    with open(path, "ab") as f:
        f.write(b"\xff\n\n")
    report = Report(quiet=True)
    info = inp.prepare_images(path, str(tmp_path / "img"), report)
    assert info["images"] == 2
    assert report.counts == {
        "images_no_tags": 1, "images_duplicate_id": 1, "images_missing_id": 1, "images_bad_tags": 2,
        "images_bad_field": 1, "images_not_utf8": 1, "images_empty_line": 1,
    }
    assert "tags.jsonl:3" in report.examples["images_duplicate_id"][0] and "tags.jsonl:1" in report.examples["images_duplicate_id"][0]
    assert "'boxes' has shape (1, 4), expected (2, 4)" in report.examples["images_bad_field"][0]
    images = inp.load_images(str(tmp_path / "img"))
    assert [im["image_id"] for im in images] == [1, 4]
    assert images[0]["query"] == "horse man"  # horse: bigger box
    vocab = json.load(open(tmp_path / "img" / "tag_vocab.json"))["tags"]
    assert vocab == ["man", "horse", "cat", "dog"]  # first appearance
    assert images[0]["objects_ids"] == [0, 1] and images[1]["objects_ids"] == [2, 3]
    store = inp.ImageStore(str(tmp_path / "img"))
    assert len(store) == 2 and store[1] == images[1] and store.queries(0, 2) == ["horse man", images[1]["query"]]
    assert store.ids() == [1, 4] and store.tags() == ["cat", "dog", "horse", "man"]
    store.close()


def test_feature_cache_input_with_object_vocab(tmp_path):
    from mmf_multilevel.features import FeatureCacheWriter

    cache = str(tmp_path / "feats.lmdb")
    rng = np.random.default_rng(0)
    with FeatureCacheWriter(cache, detector="test", dtype="float16") as w:
        # 3 classes + background column: cls_prob has 4 columns
        probs = np.array([[0.0, 0.9, 0.05, 0.05], [0.0, 0.1, 0.8, 0.1], [0.0, 0.05, 0.05, 0.9]], np.float32)
        w.write("img_a", {"features": rng.standard_normal((3, 8)), "boxes": [[0, 0, 50, 50], [0, 0, 90, 90], [0, 0, 5, 5]],
                          "objects": [0, 1, 2], "cls_prob": probs, "image_w": 100, "image_h": 100})
        w.write("img_b", {"features": rng.standard_normal((0, 8)), "boxes": np.zeros((0, 4)), "image_w": 10, "image_h": 10})
        w.write("img_c", {"features": rng.standard_normal((1, 8)), "boxes": [[0, 0, 9, 9]], "cls_prob": probs[2:], "image_w": 10, "image_h": 10})
    vocab = write_lines(tmp_path / "objects_vocab.txt", ["man,person", "horse", "hat"])
    report = Report(quiet=True)
    with pytest.raises(RetrievalError, match="--object-vocab"):
        inp.prepare_images(cache, str(tmp_path / "none"), report)
    info = inp.prepare_images(cache, str(tmp_path / "img"), report, object_vocab=vocab)
    assert info["images"] == 2 and info["kind"] == "feature_cache"
    assert report.counts == {"images_no_tags": 1}
    a, c = inp.load_images(str(tmp_path / "img"))
    assert a["objects"] == ["man", "horse", "hat"] and a["objects_ids"] == [0, 1, 2]
    assert a["query"] == "horse man"  # hat: area 0.25% < 1%
    assert c["objects"] == ["hat"] and c["objects_ids"] == [2]  # class from argmax of cls_prob
    bad = write_lines(tmp_path / "short_vocab.txt", ["man"])
    with pytest.raises(RetrievalError, match=r"img_a.*'objects' row 1 holds class id 1, outside the object vocabulary \(0\.\.0\)"):
        inp.prepare_images(cache, str(tmp_path / "img2"), Report(quiet=True), object_vocab=bad)


# --------------------------------------------------------------------------- search
def _brute(base, queries, k, metric):
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        sims = q @ b.T
        ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, ids, 1), ids
    dist = (q**2).sum(1)[:, None] - 2 * q @ b.T + (b**2).sum(1)[None, :]
    ids = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, ids, 1), ids


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_search_matches_brute_force(tmp_path, metric, backend):
    rng = np.random.default_rng(3)
    base = (rng.standard_normal((1000, 32)) * rng.uniform(0.2, 3.0, size=(1000, 1))).astype(np.float16)  # varied norms
    queries = rng.standard_normal((70, 32)).astype(np.float16)
    want_s, want_i = _brute(base, queries, 7, metric)
    got_s, got_i = srch.exact_search(base, queries, 7, metric, shard_rows=128, query_block=16, backend=backend, state_dir=str(tmp_path / "s"))
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-4)
    if metric == "cosine":
        assert (np.diff(got_s, axis=1) <= 1e-6).all()
    else:
        assert (np.diff(got_s, axis=1) >= -1e-4).all()


def test_cosine_and_l2_rank_differently_on_unnormalised_vectors():
    base = np.array([[1.0, 0.0], [10.0, 1.0]], np.float32)  # row 1: nearly the same direction, far away
    q = np.array([[5.0, 0.6]], np.float32)
    _, cos_ids = srch.exact_search(base, q, 1, "cosine")
    _, l2_ids = srch.exact_search(base, q, 1, "l2")
    assert cos_ids[0, 0] == 1 and l2_ids[0, 0] == 0


def test_exact_search_resumes_from_saved_shard(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 16)).astype(np.float16)
    queries = rng.standard_normal((20, 16)).astype(np.float16)
    full = srch.exact_search(base, queries, 5, shard_rows=100)
    state = str(tmp_path / "s")
    # simulate a run killed after shard 2: its saved state and manifest exist
    import mmf_multilevel.weak_corpus.search as module

    calls = {"n": 0}
    original = module._faiss_shard

    def failing(x, metric):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(x, metric)

    module._faiss_shard = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            srch.exact_search(base, queries, 5, shard_rows=100, state_dir=state)
    finally:
        module._faiss_shard = original
    assert sorted(json.load(open(os.path.join(state, "exact.manifest.json")))["done"]) == [0, 1]
    calls["n"] = 0
    module._faiss_shard = lambda x, metric: (calls.__setitem__("n", calls["n"] + 1), original(x, metric))[1]
    try:
        resumed = srch.exact_search(base, queries, 5, shard_rows=100, state_dir=state)
    finally:
        module._faiss_shard = original
    assert calls["n"] == 3  # shards 2, 3, 4 only
    np.testing.assert_array_equal(resumed[1], full[1])
    with pytest.raises(StageMismatchError, match="k: built with 5, now 6"):
        srch.exact_search(base, queries, 6, shard_rows=100, state_dir=state)


def test_exclude_rows():
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.5, 0.4, 0.3]], np.float32)
    ids = np.array([[3, 1, 4, 2], [0, 7, 8, 9]])
    excluded = np.array([[1, -2], [9, 0]])
    s, i = srch.exclude_rows(scores, ids, excluded, 2, "cosine")
    assert i.tolist() == [[3, 4], [7, 8]]
    np.testing.assert_allclose(s, [[0.9, 0.7], [0.5, 0.4]])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_index_recall_and_resume(tmp_path, kind):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 24))
    base = (centers[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 24))).astype(np.float16)
    queries = (base[rng.integers(0, 3000, 200)].astype(np.float32) + 0.05 * rng.standard_normal((200, 24))).astype(np.float16)
    state = str(tmp_path / kind)
    index = srch.build_ann_index(base, kind, "cosine", state, shard_rows=1000, nlist=32)
    assert index.ntotal == 3000
    _, ids = srch.ann_search(index, kind, queries, 5, "cosine", state, nprobe=8, ef_search=64, query_block=64)
    _, exact = srch.exact_search(base, queries, 5)
    assert srch.recall_at_k(ids, exact) > 0.8
    # a rerun finds every shard and block done and returns the same result
    again = srch.build_ann_index(base, kind, "cosine", state, shard_rows=1000, nlist=32)
    assert again.ntotal == 3000
    _, ids2 = srch.ann_search(again, kind, queries, 5, "cosine", state, nprobe=8, ef_search=64, query_block=64)
    np.testing.assert_array_equal(ids, ids2)


def test_search_asks_for_more_than_the_corpus():
    with pytest.raises(RetrievalError, match="only 3 rows"):
        srch.exact_search(np.ones((3, 4), np.float16), np.ones((1, 4), np.float16), 5)


# --------------------------------------------------------------------------- linking math
def test_link_tags_threshold_rescale_and_argmax():
    e = np.eye(4, dtype=np.float32)
    man, horse, hat, other = e
    a_man = normalize_rows([0.8 * man + 0.6 * other])[0]  # cos(man, a_man) = 0.8
    a_horse = normalize_rows([0.55 * horse + np.sqrt(1 - 0.55**2) * other])[0]  # 0.55
    weak_hat = normalize_rows([0.5 * hat + np.sqrt(0.75) * other])[0]  # exactly at the threshold: not linked
    tags = np.stack([man, horse, hat])
    caption0 = np.stack([a_man, a_horse])  # "a man riding a horse": [a man, a horse]
    caption1 = np.zeros((0, 4), np.float32)  # no noun phrase
    caption2 = np.stack([weak_hat])
    s, a = link_tags(tags, [caption0, caption1, caption2], threshold=0.5)
    np.testing.assert_allclose(s[:, 0], [0.8 / 0.5, 0.55 / 0.5, 0.0], rtol=1e-5)
    assert a[:, 0].tolist() == [0, 1, -1]
    assert (s[:, 1] == 0).all() and (a[:, 1] == -1).all()
    assert s[2, 2] == 0 and a[2, 2] == -1  # s = 0.5 is not > 0.5
    linked = s[s > 0]
    assert ((linked > 1) & (linked <= 2)).all()


# --------------------------------------------------------------------------- manifest
def test_manifest_refuses_other_settings_and_survives_rewrite(tmp_path):
    path = str(tmp_path / "m.json")
    m = Manifest(path, "encode", {"rows": 10, "model": "a"})
    m.mark_done(0)
    m.mark_done(1, dim=4)
    again = Manifest(path, "encode", {"rows": 10, "model": "a"})
    assert again.done == {0, 1} and again.extra == {"dim": 4}
    with pytest.raises(StageMismatchError, match=r"model: built with 'a', now 'b'.*--force"):
        Manifest(path, "encode", {"rows": 10, "model": "b"})
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
