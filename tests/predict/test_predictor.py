"""The predictor on raw inputs equals the model on the dataset's own sample: the demo set's val questions and
retrieval pairs, each method's demo project, a model as built (random weights: any difference in the inputs shows
in the scores)."""
import json

import pytest
import torch

from helpers.mmf import ROOT
from helpers.predict import dataset_of, demo_data, image_input, model_scores, predictor_for

VQA_PROJECTS = ["semvlp", "muvla", "mvptr", "simla", "soho"]
MATCH_PROJECTS = {"semvlp": "retrieval_coco", "soho": "retrieval_coco", "simla": "retrieval_coco"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("predict_data"), num_images=24)


@pytest.mark.parametrize("method", VQA_PROJECTS)
def test_vqa_scores_equal_the_model_on_the_datasets_own_sample(method, data):
    predictor = predictor_for(data, method, "vqa")
    # MVPTR: a raw question has no concept-tool line, so the predictor reads it without phrases, as the dataset
    # reads a question its phrase file lacks
    dataset = dataset_of(predictor, **({"phrases": None} if method == "mvptr" else {}))
    assert predictor.visual == ("pixels" if method in ("simla", "soho") else "regions")
    for index, kind in zip(range(6), ["path", "bytes", "pil"] * 2):
        record = dataset.records[index]
        expected = model_scores(predictor, dataset[index], dataset)[0]
        if predictor.visual == "pixels":
            result = predictor.vqa(image_input(dataset, record["image_id"], kind), record["question"], top_k=3)
        else:
            result = predictor.vqa(None, record["question"], top_k=3, image_id=record["image_id"])
        assert torch.equal(result["scores"], expected), (method, index)
        best = int(expected.argmax())
        assert result["answer"] == dataset.answer_processor.idx2word(best)
        assert result["score"] == pytest.approx(float(expected[best]))
        assert [a["score"] for a in result["top_k"]] == sorted((a["score"] for a in result["top_k"]), reverse=True)
        assert len(result["top_k"]) == 3
    # the answer depends on the question and on the image: another question/image gives other scores
    other = dataset.records[1]
    if predictor.visual == "pixels":
        first = predictor.vqa(image_input(dataset, dataset.records[0]["image_id"], "path"), "what shape is it?")
        second = predictor.vqa(image_input(dataset, other["image_id"], "path"), "what shape is it?")
    else:
        first = predictor.vqa(None, "what shape is it?", image_id=dataset.records[0]["image_id"])
        second = predictor.vqa(None, "what shape is it?", image_id=other["image_id"])
    if dataset.records[0]["image_id"] != other["image_id"]:
        assert not torch.equal(first["scores"], second["scores"])


@pytest.mark.parametrize("method", sorted(MATCH_PROJECTS))
def test_match_score_equals_the_retrieval_evaluations_pair_score(method, data):
    from mmf_multilevel.metrics import pair_match_scores

    predictor = predictor_for(data, method, MATCH_PROJECTS[method])
    # every (image, caption) pair of the gallery scored, as mmf_run evaluates with eval_pairs: all (SIMLA's
    # project validates on aligned pairs' losses and ranks with its own command, which scores pairs the same way)
    dataset = dataset_of(predictor, eval_pairs="all")
    for index in (0, dataset.num_texts + 1, 2 * dataset.num_texts + 2):  # pairs of three images
        sample = dataset[index]
        image, text = divmod(index, dataset.num_texts)
        expected = float(pair_match_scores(model_scores(predictor, sample, dataset))[0])
        image_id = dataset.records[image]["image_id"]
        caption = dataset.texts[text][1]
        if predictor.visual == "pixels":
            result = predictor.match(image_input(dataset, image_id, "path"), caption)
        else:
            result = predictor.match(None, caption, image_id=image_id)
        assert result["score"] == pytest.approx(expected, abs=1e-6), (method, index)
        assert 0.0 < result["probability"] < 1.0


PRETRAINING_PROJECTS = {"semvlp": "pretrain", "soho": "pretrain", "simla": "pretrain", "mvptr": "pretrain",
                        "muvla": "pretrain_cc"}


@pytest.mark.parametrize("method", sorted(PRETRAINING_PROJECTS))
def test_a_pre_training_model_matches_the_unmasked_caption_with_its_itm_head(method, data):
    """``match`` on a pre-training checkpoint: the pre-training dataset's masked_token processor masks no word of
    a query (it would, at random, 15 % of them), and the score is the ITM head's (``match_logits``, checked against
    each method's pre-training pass in tests/methods/test_contract.py) on the pair as the predictor builds it."""
    from mmf_multilevel.metrics import pair_match_scores

    predictor = predictor_for(data, method, PRETRAINING_PROJECTS[method])
    assert predictor.head_type == "pretraining"
    caption = "a picture with two red circles and one blue square on a grey ground today"
    mask_id = predictor.tokenizer.mask_token_id
    ids = [predictor.text_fields(caption)["input_ids"] for _ in range(20)]
    assert all(not (row == mask_id).any() and torch.equal(row, ids[0]) for row in ids), "a query's words were masked"

    if predictor.visual == "pixels":
        image, image_id = str(data / "demo" / "images" / "demo_000000.jpg"), None
    else:
        image, image_id = None, "demo_000000"
    result = predictor.match(image, caption, image_id=image_id)
    sample = predictor.visual_sample(image, image_id)
    sample.update(predictor.text_fields(caption))
    with torch.no_grad():
        logits = predictor._run_model(predictor.model.match_logits, [sample])
    assert logits.shape == (1, 2)
    assert result["score"] == pytest.approx(float(pair_match_scores(logits)[0]), abs=1e-6)
    assert result["probability"] == pytest.approx(float(torch.softmax(logits[0], -1)[1]), abs=1e-6)
    assert predictor.match(image, caption, image_id=image_id)["score"] == result["score"]


def test_tasks_the_head_cannot_answer_are_refused_by_name(data):
    from mmf_multilevel.predict import PredictInputError

    predictor = predictor_for(data, "semvlp", "vqa")
    with pytest.raises(PredictInputError, match=r"match needs a semvlp model with training_head_type in \['retrieval', 'pretraining'\]"
                                                r".*this one is 'classification'"):
        predictor.match(None, "a circle", image_id="x")
    with pytest.raises(PredictInputError, match="question: expected a non-empty string"):
        predictor.vqa(None, "  ", image_id="x")
    with pytest.raises(PredictInputError, match="top_k: expected a positive integer"):
        predictor.vqa(None, "what?", top_k=0, image_id="x")


def test_region_inputs_errors_name_the_cache_and_the_image(data, tmp_path):
    from mmf_multilevel.predict import MissingRegionsError, PredictInputError

    predictor = predictor_for(data, "semvlp", "vqa")
    with pytest.raises(MissingRegionsError, match=r"regions\.lmdb has no regions for image_id 'nope'.*mmf_ml_extract"):
        predictor.vqa(None, "what?", image_id="nope")
    with pytest.raises(PredictInputError, match="read by image id: give image_id"):
        predictor.vqa(None, "what?")
    # a picture of another size than the cache's image of that id
    from PIL import Image

    image_id = dataset_of(predictor).records[0]["image_id"]
    with pytest.raises(PredictInputError, match=rf"is 7x5 px but image '{image_id}' of the region cache .* is \d+x\d+"):
        predictor.vqa(Image.new("RGB", (7, 5)), "what?", image_id=image_id)
    with pytest.raises(FileNotFoundError, match="region cache .*missing.lmdb: no such file"):
        predictor_for(data, "semvlp", "vqa", regions=str(tmp_path / "missing.lmdb")).vqa(None, "what?", image_id="x")


def test_image_inputs_errors_name_the_input(data, tmp_path):
    from mmf_multilevel.predict import PredictInputError

    predictor = predictor_for(data, "soho", "vqa")
    with pytest.raises(PredictInputError, match=r"image '.*absent\.jpg': no such file"):
        predictor.vqa(str(tmp_path / "absent.jpg"), "what?")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(PredictInputError, match=r"bad\.jpg: not an image file"):
        predictor.vqa(str(tmp_path / "bad.jpg"), "what?")
    with pytest.raises(PredictInputError, match="expected an image path, encoded image bytes or a PIL.Image, got int"):
        predictor.vqa(3, "what?")
    with pytest.raises(PredictInputError, match="soho reads pixels; give an image"):
        predictor.vqa(None, "what?", image_id="x")


def test_a_folder_with_a_run_config_and_a_checkpoint_loads_its_weights(data, tmp_path):
    """A zoo entry's folder (a run config and one checkpoint): the checkpoint's weights are the ones used."""
    from mmf_multilevel.predict import PredictInputError, load_predictor

    built = predictor_for(data, "semvlp", "vqa")
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in built.model.state_dict().items()}
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save(state, folder / "semvlp_final.pth")
    (folder / "vqa.yaml").write_text(f"includes:\n- {ROOT}/projects/semvlp/demo/vqa.yaml\n")
    loaded = load_predictor(str(folder), overrides=[f"env.data_dir={data}"], device="cpu")
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    image_id = dataset_of(built).records[0]["image_id"]
    assert not torch.equal(loaded.vqa(None, "what?", image_id=image_id)["scores"],
                           built.vqa(None, "what?", image_id=image_id)["scores"])
    (folder / "other.yaml").write_text("{}\n")
    with pytest.raises(PredictInputError, match=r"expected exactly one run config \(\*\.yaml\).*other\.yaml"):
        load_predictor(str(folder), overrides=[f"env.data_dir={data}"], device="cpu")
    with pytest.raises(PredictInputError, match="not a file, a folder or a model zoo name"):
        load_predictor("no_such.model.name", device="cpu")


def test_results_have_no_tensors_once_made_public(data):
    from mmf_multilevel.predict.cli import predict_one

    predictor = predictor_for(data, "semvlp", "vqa")
    image_id = dataset_of(predictor).records[0]["image_id"]
    result = predict_one(predictor, None, image_id, "what shape is it?", None, 2)
    assert json.loads(json.dumps(result))["task"] == "vqa" and len(result["top_k"]) == 2
