"""Retrieval over a gallery of images or captions (mmf_multilevel.predict.retrieve) on the demo set's retrieval
projects, models as built (random weights): single-stream methods rank as Predictor.match scores each pair; dual
encoders (SIMLA, MVPTR) rank as their own retrieval evaluation (encode_gallery + two_stage_scores) does, their
gallery embeddings cached on disk by image and model; the folder, the errors and mmf_ml_predict's JSON."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_predictor import dataset_of

from helpers.mmf import ROOT, clean_env
from helpers.predict import demo_data

CAPTIONS = ["a red circle on a plain background.", "two blue squares drawn on a grey background.",
            "a white triangle and a green diamond.", "there are three shapes : circles and squares."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("retrieve_data"), num_images=24)


def image_path(data, index):
    return str(data / "demo" / "images" / f"demo_{index:06d}.jpg")


@pytest.fixture
def folder(data, tmp_path):
    """Six demo images in a folder (copied under other names, so sorted order is not the ids' order)."""
    out = tmp_path / "gallery"
    out.mkdir()
    for rank, index in enumerate([5, 0, 11, 3, 17, 8]):
        shutil.copy(image_path(data, index), out / f"{chr(ord('f') - rank)}_{index}.jpg")
    return out


def retrieval_predictor(data, method, *overrides, seed=0):
    from mmf_multilevel.predict import load_predictor

    torch.manual_seed(seed)
    return load_predictor(f"{ROOT}/projects/{method}/demo/retrieval_coco.yaml",
                          overrides=[f"env.data_dir={data}", *overrides], device="cpu")


def order(scores):
    """Gallery positions best first, ties in gallery order."""
    return sorted(range(len(scores)), key=lambda k: (-scores[k], k))


# ------------------------------------------------------------------ single-stream: Predictor.match on every pair
@pytest.mark.parametrize("method", ["semvlp", "soho"])
def test_single_stream_ranking_is_predictor_match_on_every_pair_whatever_the_batch(method, data, folder):
    predictor = retrieval_predictor(data, method)
    text = CAPTIONS[0]
    if predictor.visual == "pixels":
        gallery = dict(images=str(folder))
        paths = sorted(str(p) for p in folder.iterdir())
        expected = [predictor.match(path, text)["score"] for path in paths]
        names = paths
    else:
        ids = [f"demo_{i:06d}" for i in (5, 0, 11, 3, 17, 8, 20)]
        gallery = dict(image_ids=ids)
        expected = [predictor.match(None, text, image_id=i)["score"] for i in ids]
        names = ids
    ranked = {}
    for batch_size in (1, 7, 3):
        result = predictor.retrieve_images(text, top_k=len(names), batch_size=batch_size, progress=False, **gallery)
        assert result["gallery_size"] == len(names) and result["num_skipped"] == 0
        assert [r["rank"] for r in result["results"]] == list(range(1, len(names) + 1))
        assert [r["index"] for r in result["results"]] == order(expected), (method, batch_size)
        assert [r["image"] for r in result["results"]] == [names[k] for k in order(expected)]
        for entry in result["results"]:
            assert entry["score"] == pytest.approx(expected[entry["index"]], abs=1e-5)
        ranked[batch_size] = [r["index"] for r in result["results"]]
    assert ranked[1] == ranked[7] == ranked[3]
    assert len(set(expected)) == len(expected)  # distinct scores: the order above is the model's, not ties'
    assert set(predictor.profile) >= {"text", "model"}

    # captions for one image: the same head, the image fixed
    query = dict(image=names[2]) if predictor.visual == "pixels" else dict(image_id=names[2])
    expected = [predictor.match(query.get("image"), t, image_id=query.get("image_id"))["score"] for t in CAPTIONS]
    result = predictor.retrieve_texts(texts=CAPTIONS, top_k=2, batch_size=3, progress=False, **query)
    assert [r["index"] for r in result["results"]] == order(expected)[:2]
    assert [r["text"] for r in result["results"]] == [CAPTIONS[k] for k in order(expected)[:2]]
    assert result["results"][0]["score"] == pytest.approx(max(expected), abs=1e-5)
    assert result["gallery_size"] == len(CAPTIONS)


# ------------------------------------------------------------------ dual encoders: the method's own evaluation
DUAL = {"simla": ["model_config.simla.k_test=3"],
        "mvptr": ["model_config.mvptr.retrieval.top_k_texts=4", "model_config.mvptr.retrieval.top_k_images=3"]}


def own_evaluation(predictor, method):
    """The method's retrieval evaluation on the demo train split (17 images, 34 captions; no augmentation): its
    gallery encoded by ``encode_gallery``, ranked by ``two_stage_scores`` with the model's k."""
    from importlib import import_module

    from mmf_multilevel.evaluation.retrieval import two_stage_scores

    module = import_module(f"mmf_multilevel.methods.{method}.retrieval")
    dataset = dataset_of(predictor, "train", eval_pairs="all", augment_splits=[],
                         **({"phrases": None} if method == "mvptr" else {}))
    gallery = module.encode_gallery(predictor.model, dataset, batch_size=8)
    k_texts, k_images = predictor.model.retrieval_encoders().rerank
    i2t, t2i = two_stage_scores(None, None, module.match_function(predictor.model, gallery), k=k_texts,
                                k_t2i=k_images, similarity=gallery.similarity)
    return dataset, gallery.similarity, i2t, t2i


def check_against(result, similarity, scores, k):
    """The listing against the evaluation's column: similarity everywhere, the re-ranked scores where it has one
    (``k`` of them, first), the rest after by similarity."""
    results = result["results"]
    assert len(results) == similarity.numel() == result["gallery_size"]
    for entry in results:
        assert entry["similarity"] == pytest.approx(float(similarity[entry["index"]]), abs=1e-4)
        value = float(scores[entry["index"]])
        assert (entry["score"] is None) == (value == float("-inf"))
        if entry["score"] is not None:
            assert entry["score"] == pytest.approx(value, abs=1e-4)
    reranked = [e["index"] for e in results if e["score"] is not None]
    assert len(reranked) == k
    assert reranked == order(scores.tolist())[:k]
    rest = [e["index"] for e in results[k:]]
    assert rest == sorted(rest, key=lambda i: -float(similarity[i]))


def anchor_to_the_model(predictor, method, caption, entry, gallery):
    """The shared dual encoder against the model's own computations: the re-ranking score is the one its forward
    gives the gallery pair (Predictor.match: SIMLA's ITM match logit, MVPTR's ITM log-odds); SIMLA's similarity is
    the product of the ITC features its ``encode`` gives (MVPTR's: the MVPTR-Uni test)."""
    image = gallery["images"][entry["index"]] if "images" in gallery else None
    image_id = gallery["image_ids"][entry["index"]] if "image_ids" in gallery else None
    assert entry["score"] == pytest.approx(predictor.match(image, caption, image_id=image_id)["score"], abs=1e-4)
    if method == "simla":
        sample = predictor.visual_sample(image)
        sample.update(predictor.text_fields(caption))
        with torch.no_grad():
            out = predictor.model.encode(predictor._batch([sample]))
        assert entry["similarity"] == pytest.approx(float((out["image_feat"] * out["text_feat"]).sum()), abs=1e-4)


@pytest.mark.parametrize("method", sorted(DUAL))
def test_dual_encoder_ranking_is_the_methods_own_two_stage_evaluation(method, data):
    from mmf_multilevel.predict.retrieve import retrieve_images

    predictor = retrieval_predictor(data, method, *DUAL[method])
    k_texts, k_images = predictor.model.retrieval_encoders().rerank
    dataset, similarity, i2t, t2i = own_evaluation(predictor, method)
    ids = [str(r["image_id"]) for r in dataset.records]
    gallery = ({"images": [image_path(data, int(i.split("_")[1])) for i in ids]} if predictor.visual == "pixels"
               else {"image_ids": ids})
    for text in (0, 7, 20):
        caption = dataset.texts[text][1]
        result = retrieve_images(predictor, caption, top_k=len(ids), batch_size=5, progress=False, **gallery)
        check_against(result, similarity[:, text], t2i[:, text], k_images)
        anchor_to_the_model(predictor, method, caption, result["results"][0], gallery)
    captions = [caption for _, caption in dataset.texts]
    for image in (0, 9):
        query = ({"image": gallery["images"][image]} if predictor.visual == "pixels" else {"image_id": ids[image]})
        result = predictor.retrieve_texts(texts=captions, top_k=len(captions), batch_size=6, progress=False, **query)
        check_against(result, similarity[image], i2t[image], k_texts)


def test_mvptr_uni_ranks_by_the_vsc_similarity_alone_which_is_its_match_score(data):
    """MVPTR-Uni (``retrieval.uni``, projects/mvptr/retrieval_uni.yaml): no re-ranking; the score is the VSC
    similarity, which is also what its forward gives a gallery pair (so Predictor.match agrees)."""
    predictor = retrieval_predictor(data, "mvptr", "model_config.mvptr.retrieval.uni=True")
    assert predictor.model.retrieval_encoders().rerank is None
    ids = [f"demo_{i:06d}" for i in (5, 0, 11, 3, 17, 8, 20)]
    result = predictor.retrieve_images(CAPTIONS[1], image_ids=ids, top_k=len(ids), batch_size=3, progress=False)
    assert "MVPTR-Uni" in result["scoring"]
    expected = [predictor.match(None, CAPTIONS[1], image_id=i)["score"] for i in ids]
    assert [r["index"] for r in result["results"]] == order(expected)
    for entry in result["results"]:
        assert entry["score"] == entry["similarity"] == pytest.approx(expected[entry["index"]], abs=1e-4)


# ------------------------------------------------------------------ the embedding cache
def counted(monkeypatch, cls, name):
    """Counts the items ``cls.<name>`` encodes (rows of its first output)."""
    calls = []
    original = getattr(cls, name)

    def wrapper(self, batch):
        out = original(self, batch)
        calls.append(int(next(iter(out.values())).size(0)))
        return out

    monkeypatch.setattr(cls, name, wrapper)
    return calls


def assert_same_ranking(result, expected):
    assert [r["index"] for r in result["results"]] == [r["index"] for r in expected["results"]]
    for name in ("score", "similarity"):
        assert [r[name] for r in result["results"]] == pytest.approx([r[name] for r in expected["results"]], abs=1e-5)


def test_the_cache_serves_the_second_query_and_other_weights_never_read_it(data, folder, tmp_path, monkeypatch):
    from mmf_multilevel.methods.simla.retrieval import SIMLADualEncoder

    images = counted(monkeypatch, SIMLADualEncoder, "encode_images")
    texts = counted(monkeypatch, SIMLADualEncoder, "encode_texts")
    cache = tmp_path / "embeddings"
    predictor = retrieval_predictor(data, "simla")
    first = predictor.retrieve_images(CAPTIONS[0], str(folder), top_k=6, cache=str(cache), batch_size=4,
                                      progress=False)
    assert sum(images) == 6 and texts == [1]  # the gallery once, the query
    assert first["cache"]["written"] == 6 and first["cache"]["hits"] == 0
    entries = sorted(cache.rglob("*.pt"))
    assert len(entries) == 6 and all(p.parent.parent.name == "images" for p in entries)
    assert (cache / first["cache"]["fingerprint"] / "fingerprint.json").is_file()
    images.clear()
    second = predictor.retrieve_images(CAPTIONS[1], str(folder), top_k=6, cache=str(cache), batch_size=4,
                                       progress=False)
    assert images == [] and second["cache"]["hits"] == 6 and second["cache"]["written"] == 0
    assert "cache" in predictor.profile
    uncached = predictor.retrieve_images(CAPTIONS[1], str(folder), top_k=6, batch_size=4, progress=False)
    assert_same_ranking(second, uncached)
    # the same images in another order (a list of paths, and one as bytes): found by content, not by position
    paths = sorted(str(p) for p in folder.iterdir())[::-1]
    images.clear()
    shuffled = [*paths[:-1], open(paths[-1], "rb").read()]
    listed = predictor.retrieve_images(CAPTIONS[1], shuffled, top_k=6, cache=str(cache), batch_size=4, progress=False)
    assert images == [] and listed["cache"]["hits"] == 6
    assert_same_ranking(listed, predictor.retrieve_images(CAPTIONS[1], shuffled, top_k=6, progress=False))
    names = [*paths[:-1], "images[5]"]
    assert [r["image"] for r in listed["results"]] == [names[r["index"]] for r in listed["results"]]

    # captions are cached the same way, under texts/
    texts.clear()
    predictor.retrieve_texts(image_path(data, 2), CAPTIONS, cache=str(cache), progress=False)
    predictor.retrieve_texts(image_path(data, 3), CAPTIONS, cache=str(cache), progress=False)
    assert texts == [len(CAPTIONS)] and len(list(cache.rglob("texts/*/*.pt"))) == len(CAPTIONS)

    # other weights: a model built from another seed, and the first model after loading them, encode afresh
    other = retrieval_predictor(data, "simla", seed=1)
    images.clear()
    moved = other.retrieve_images(CAPTIONS[1], str(folder), top_k=6, cache=str(cache), progress=False)
    assert sum(images) == 6 and moved["cache"]["hits"] == 0
    assert moved["cache"]["fingerprint"] != second["cache"]["fingerprint"]
    assert_same_ranking(moved, other.retrieve_images(CAPTIONS[1], str(folder), top_k=6, progress=False))
    predictor.model.load_state_dict(other.model.state_dict())
    images.clear()
    reloaded = predictor.retrieve_images(CAPTIONS[1], str(folder), top_k=6, cache=str(cache), progress=False)
    assert images == [] and reloaded["cache"]["fingerprint"] == moved["cache"]["fingerprint"]


def test_a_corrupt_or_foreign_cache_entry_is_an_error_naming_the_file(data, folder, tmp_path):
    from mmf_multilevel.predict.retrieve import EmbeddingCacheError

    cache = tmp_path / "embeddings"
    predictor = retrieval_predictor(data, "simla")
    predictor.retrieve_images(CAPTIONS[0], str(folder), cache=str(cache), progress=False)
    first, second = sorted(cache.rglob("images/*/*.pt"))[:2]
    saved = first.read_bytes()
    first.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(EmbeddingCacheError, match=rf"embedding cache entry {first}: unreadable"):
        predictor.retrieve_images(CAPTIONS[0], str(folder), cache=str(cache), progress=False)
    first.write_bytes(second.read_bytes())  # another image's entry under this image's key
    with pytest.raises(EmbeddingCacheError, match=rf"{first}: holds key '{second.stem}', not this entry's "
                                                  rf"'{first.stem}'"):
        predictor.retrieve_images(CAPTIONS[0], str(folder), cache=str(cache), progress=False)
    torch.save({"something": torch.zeros(1)}, first)
    with pytest.raises(EmbeddingCacheError, match=rf"{first}: not an entry of an embedding cache"):
        predictor.retrieve_images(CAPTIONS[0], str(folder), cache=str(cache), progress=False)


# ------------------------------------------------------------------ galleries and errors
def test_a_folders_other_files_are_skipped_by_name_and_mistakes_are_refused(data, folder, tmp_path):
    from mmf_multilevel.predict import PredictInputError

    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / ".hidden.jpg").write_bytes(b"")
    predictor = retrieval_predictor(data, "soho")
    with pytest.warns(UserWarning, match="broken.jpg left out of the gallery"):
        result = predictor.retrieve_images(CAPTIONS[0], str(folder), top_k=2, progress=False)
    assert result["gallery_size"] == 6 and result["num_skipped"] == 2 and len(result["results"]) == 2
    skipped = {os.path.basename(s["image"]): s["error"] for s in result["skipped"]}
    assert set(skipped) == {"notes.txt", "broken.jpg"}
    assert skipped["notes.txt"].startswith("not an image file (the dataset reads .jpg")
    assert "not an image file Pillow can identify" in skipped["broken.jpg"]
    assert all(os.path.basename(r["image"]) not in skipped for r in result["results"])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PredictInputError, match=rf"images {empty}: no image files \(.jpg"):
        predictor.retrieve_images("a circle", str(empty))
    with pytest.raises(PredictInputError, match="no such folder"):
        predictor.retrieve_images("a circle", str(tmp_path / "absent"))
    with pytest.raises(PredictInputError, match="top_k: expected a positive integer"):
        predictor.retrieve_images("a circle", str(folder), top_k=0)
    with pytest.raises(PredictInputError, match="cache: soho scores every .* pair with its matching head"):
        predictor.retrieve_images("a circle", str(folder), cache=str(tmp_path / "c"))
    with pytest.raises(PredictInputError, match=r"image_ids: soho reads pixels"):
        predictor.retrieve_images("a circle", image_ids=["demo_000000"])
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n\n" + "x" * 1200 + "\n")
    with pytest.raises(PredictInputError, match=rf"texts {captions} line 3: 1,200 characters"):
        predictor.retrieve_texts(image_path(data, 0), str(captions))
    vqa = predictor_for_vqa(data)
    with pytest.raises(PredictInputError, match=r"retrieval needs a soho model with training_head_type in "
                                                r"\['retrieval', 'pretraining'\]; this one is 'vqa'"):
        vqa.retrieve_images("a circle", str(folder))


def predictor_for_vqa(data):
    from mmf_multilevel.predict import load_predictor

    return load_predictor(f"{ROOT}/projects/soho/demo/vqa.yaml", overrides=[f"env.data_dir={data}"], device="cpu")


# ------------------------------------------------------------------ mmf_ml_predict
def test_mmf_ml_predict_prints_the_ranking_as_json_and_exits_2_on_mistakes(data, folder, tmp_path, capsys):
    from mmf_multilevel.predict.cli import main

    (folder / "notes.txt").write_text("not an image")
    config = f"{ROOT}/projects/simla/demo/retrieval_coco.yaml"
    cache = tmp_path / "embeddings"
    command = [sys.executable, "-m", "mmf_multilevel.predict", "--config", config, "--retrieve-images", str(folder),
               "--text", CAPTIONS[0], "--top-k", "2", "--embedding-cache", str(cache), "--profile",
               f"env.data_dir={data}"]
    result = subprocess.run(command, cwd=tmp_path, env=clean_env(tmp_path, PYTHONPATH=ROOT), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout)
    assert output["method"] == "simla" and output["task"] == "retrieve_images" and output["text"] == CAPTIONS[0]
    assert output["gallery_size"] == 6 and output["num_skipped"] == 1 and output["images"] == str(folder)
    assert output["skipped"][0]["image"] == str(folder / "notes.txt")
    assert f"skipped {folder / 'notes.txt'}: not an image file" in result.stderr
    assert [r["rank"] for r in output["results"]] == [1, 2]
    assert set(output["results"][0]) == {"rank", "index", "image", "score", "similarity"}
    assert output["cache"]["written"] == 6 and {"model", "cache"} <= set(output["profile"])
    assert "ITC similarity" in output["scoring"]

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    assert main(["--config", config, "--retrieve-texts", str(captions), "--image", image_path(data, 4), "--top-k", "3",
                 "--embedding-cache", str(cache), f"env.data_dir={data}"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["task"] == "retrieve_texts" and output["image"] == image_path(data, 4)
    assert [r["line"] for r in output["results"]] == [r["index"] + 1 for r in output["results"]]
    assert {r["text"] for r in output["results"]} <= set(CAPTIONS) and output["gallery_size"] == len(CAPTIONS)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--config", config, "--retrieve-images", str(empty), "--text", "a circle",
                 f"env.data_dir={data}"]) == 2
    assert f"mmf_ml_predict: error: images {empty}: no image files" in capsys.readouterr().err
    assert main(["--config", f"{ROOT}/projects/simla/demo/vqa.yaml", "--retrieve-images", str(folder), "--text",
                 "a circle", f"env.data_dir={data}"]) == 2
    assert "retrieval needs a simla model with training_head_type in ['retrieval', 'pretraining']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", config, "--retrieve-images", str(folder), f"env.data_dir={data}"])
    assert "--retrieve-images needs --text" in capsys.readouterr().err
