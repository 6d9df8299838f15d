"""Each method's own grounding signal through the predictor (``Predictor.signal`` / ``signal_picture``, ``mmf_ml_predict
--signal``) equals what the method's picture module computes on the same inputs: MVPTR's phrase-region scores on the
dataset's own sample of the same image and caption, SIMLA's Grad-CAM maps from the picture command's processors,
SOHO's dictionary ids of the picture command's encoding; SemVLP and μ-VLA are refused with a pointer to --picture.
The demo set's images, each method's demo project, models as built (random weights: any input difference shows)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.mmf import ROOT
from mmf_multilevel.datasets import generate as gen

IMAGE_ID = "demo_000000"
CAPTION = "a red circle and a blue square."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals_data")
    gen.generate(root / "demo", num_images=6, progress=False)
    # MVPTR's concept vocabulary: the tool's tuples (object, attribute) past the demo's 74 word pieces, and a
    # 1-tuple that is a word piece keeps its id (concepts.build_vocabulary)
    vocab = (root / "demo" / "vocab" / "vocab.txt").read_text().splitlines()
    (root / "demo" / "concepts").mkdir()
    (root / "demo" / "concepts" / "id2phrase.json").write_text(json.dumps(
        {"74": ["circle", "red"], "75": ["square", "blue"], str(vocab.index("circle")): ["circle"]}))
    return root


_PREDICTORS = {}


def predictor_for(data, method, project, *overrides):
    from mmf_multilevel.predict import load_predictor

    key = (str(data), method, project, overrides)
    if key not in _PREDICTORS:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _PREDICTORS[key] = load_predictor(f"{ROOT}/projects/{method}/demo/{project}.yaml",
                                              overrides=[f"env.data_dir={data}", *overrides], device="cpu")
    return _PREDICTORS[key]


def image_path(data, image_id=IMAGE_ID):
    return str(data / "demo" / "images" / f"{image_id}.jpg")


def test_mvptr_scores_equal_the_picture_modules_on_the_datasets_own_sample(data, tmp_path):
    from mmf_multilevel.datasets.base import init_fresh_processors
    from mmf_multilevel.methods.mvptr import picture
    from mmf_multilevel.methods.mvptr.concepts import caption_record, read_id2phrase
    from mmf_multilevel.methods.mvptr.data import MVPTRCaptionsDataset

    predictor = predictor_for(data, "mvptr", "pretrain")
    # the picture command's --caption path: the concept tool's parse of the caption, the dataset's own sample
    dataset = MVPTRCaptionsDataset("mvptr_captions", predictor.config.dataset_config.mvptr_captions, "val")
    init_fresh_processors(dataset)
    dataset.mlm_probability = dataset.phrase_mask_probability = dataset.mcr_mask_probability = 0.0
    concepts = read_id2phrase(str(predictor.config.model_config.mvptr.concepts))
    for image_id in (IMAGE_ID, "demo_000003"):
        record = caption_record(CAPTION, str(data / "demo" / "vocab" / "vocab.txt"), concepts, image_id=image_id)
        positions, scores, region_mask = picture.grounding_scores(predictor.model,
                                                                  picture.caption_batch(dataset, record, "val"))
        signal = predictor.signal(image_path(data, image_id), CAPTION, image_id=image_id)
        assert {k: signal.values["record"][k] for k in ("input_ids", "phrase_ids", "phrase_positions")} == \
            {k: record[k] for k in ("input_ids", "phrase_ids", "phrase_positions")}
        assert signal.values["positions"].tolist() == positions.tolist() and len(positions) == 3
        assert torch.equal(signal.values["scores"], scores), image_id
        assert torch.equal(signal.values["region_mask"], region_mask)
        if image_id == IMAGE_ID:
            first = scores
    assert not torch.equal(first, scores)  # the image matters
    # the picture and its page: a panel per phrase, the page naming each
    png, page = tmp_path / "mvptr.png", tmp_path / "mvptr.html"
    drawn = predictor.signal_picture(image_path(data), CAPTION, str(png), str(page), image_id=IMAGE_ID, top=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "drawing" in predictor.profile
    text = page.read_text()
    assert [p["phrase"] for p in drawn["signal"]["phrases"]] == ["circle", "circle red", "square blue"]
    for entry in drawn["signal"]["phrases"]:
        assert f"<td>{entry['phrase']}</td>" in text and len(entry["top"]) == 2
        assert entry["top"][0]["cosine"] >= entry["top"][1]["cosine"]
    from mmf_multilevel.predict import PredictInputError

    with pytest.raises(PredictInputError, match="none of its phrases .* is in the concept vocabulary"):
        predictor.signal(image_path(data), "two triangles.", image_id=IMAGE_ID)


def test_simla_gradcam_equals_the_picture_modules_on_the_same_inputs(data):
    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.methods.simla import picture
    from mmf_multilevel.methods.simla.grounding import image_heatmap

    opts = [f"env.data_dir={data}", "model_config.simla.queue_size=32"]
    predictor = predictor_for(data, "simla", "refcoco_plus_weak", *opts[1:])
    text_processor, image_processor = picture._processors(load_run_config(
        f"{ROOT}/projects/simla/demo/refcoco_plus_weak.yaml", opts))
    image = picture._read_image(image_path(data))
    processed = image_processor({"image": image, "train": False})
    pixels = processed["image"].unsqueeze(0).float()
    text = "the red circle on the left"
    (want,) = picture.alignment_maps(predictor.model, pixels, [dict(text_processor({"text": text}), text=text)])
    signal = predictor.signal(image_path(data), text)
    got = signal.values["maps"]
    assert [u.label for u in got.units] == [u.label for u in want.units] == \
        ["[CLS]", "the", "red", "circle", "on", "the", "left", "[SEP]"]
    assert torch.equal(got.expression_map, want.expression_map) and torch.equal(got.unit_maps, want.unit_maps)
    assert got.match_logit == want.match_logit
    heat = image_heatmap(want.expression_map, pixels.shape[-2:], processed["image_size"].tolist(),
                         (image.height, image.width))
    assert np.array_equal(signal.values["heats"][0], heat.numpy()) and heat.shape == (image.height, image.width)
    summary = signal.summary(3)
    assert [w["word"] for w in summary["words"]] == [u.label for u in want.units]
    assert summary["match_logit"] == pytest.approx(want.match_logit, abs=1e-6)
    other = predictor.signal(image_path(data), "the square")
    assert not torch.equal(other.values["maps"].expression_map, got.expression_map)
    from mmf_multilevel.predict import PredictInputError

    with pytest.raises(PredictInputError, match="Grad-CAM is that of its ITM head, which a 'vqa' model does not have"):
        predictor_for(data, "simla", "vqa").signal(image_path(data), text)


def test_soho_cell_ids_equal_the_picture_modules(data, tmp_path):
    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.methods.soho import picture

    predictor = predictor_for(data, "soho", "vqa")
    config = load_run_config(f"{ROOT}/projects/soho/demo/vqa.yaml", [f"env.data_dir={data}"])
    _, processor = picture.image_processor(config)
    for image_id in (IMAGE_ID, "demo_000002"):
        pictures, grids = picture.encode_images(predictor.model, processor,
                                                picture.read_images([image_path(data, image_id)]))
        signal = predictor.signal(image_path(data, image_id))
        assert np.array_equal(signal.values["ids"], grids[0]) and signal.values["ids"].dtype == np.int64
        assert np.array_equal(signal.values["picture"], pictures[0])
        # the picture the network read: the image at the processor's content size (h, w)
        height, width = processor({"image": picture.read_images([image_path(data, image_id)])[0][1],
                                   "train": False})["image_size"].tolist()
        with Image.open(image_path(data, image_id)) as image:
            resized = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC))
        assert height != width and np.array_equal(signal.values["picture"], resized)
        assert signal.summary(3)["ids"] == grids[0].tolist() and signal.text is None
    png, page = tmp_path / "soho.png", tmp_path / "soho.html"
    predictor.signal_picture(image_path(data), None, str(png), str(page))
    assert png.is_file() and "dictionary id" in page.read_text()
    from mmf_multilevel.predict import PredictInputError

    with pytest.raises(PredictInputError, match=r"without its visual dictionary \(model_config.soho.use_vd: false\)"):
        predictor_for(data, "soho", "vqa", "model_config.soho.use_vd=false").signal(image_path(data))


@pytest.mark.parametrize("method", ["semvlp", "muvla"])
def test_methods_without_a_signal_point_to_the_attention_picture(method, data):
    from mmf_multilevel.predict import PredictInputError

    predictor = predictor_for(data, method, "vqa")
    with pytest.raises(PredictInputError, match=rf"{method} has no grounding signal of its own.*--picture") as error:
        predictor.signal(None, "a circle", image_id=IMAGE_ID)
    assert ("weak_corpus picture --weak" in str(error.value)) == (method == "muvla")


def test_the_dispatch_is_the_model_class_hook(data, monkeypatch):
    """No list of method names: a class without ``signal_module`` has no signal; its module computes it."""
    from mmf_multilevel.methods.soho.model import SOHO
    from mmf_multilevel.predict import PredictInputError

    predictor = predictor_for(data, "soho", "vqa")
    monkeypatch.setattr(SOHO, "signal_module", None)
    with pytest.raises(PredictInputError, match="soho has no grounding signal"):
        predictor.signal(image_path(data))
    monkeypatch.setattr(SOHO, "signal_module", "mmf_multilevel.methods.mvptr.picture")
    with pytest.raises(PredictInputError, match="does not lay out MVPTR's inputs"):
        predictor.signal(image_path(data), "a red circle.")


def test_cli_signal_writes_the_files_and_refuses_by_name(data, tmp_path, capsys):
    from mmf_multilevel.predict.cli import main

    png, page = tmp_path / "s.png", tmp_path / "s.html"
    code = main(["--config", f"{ROOT}/projects/soho/demo/vqa.yaml", "--image", image_path(data), "--question",
                 "what color is the circle?", "--signal", str(png), "--html", str(page), "--profile", "--device", "cpu",
                 f"env.data_dir={data}"])
    output = capsys.readouterr().out
    assert code == 0
    result = json.loads(output[output.index("{"):])
    assert result["signal"] == str(png) and result["html"] == str(page) and "picture" not in result
    assert png.is_file() and page.is_file() and {"drawing", "model"} <= set(result["profile"])
    assert main(["--config", f"{ROOT}/projects/semvlp/demo/vqa.yaml", "--image-id", IMAGE_ID, "--question", "what?",
                 "--signal", str(tmp_path / "x.png"), "--device", "cpu", f"env.data_dir={data}"]) == 2
    assert "semvlp has no grounding signal of its own" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        main(["--config", "x.yaml", "--image", "a.jpg", "--question", "q", "--picture", "a.png", "--signal", "b.png",
              "--html", "a.html"])
    assert "--html is one page: give it with --picture or with --signal, not both" in capsys.readouterr().err
    assert main(["--config", "x.yaml", "--image", "a.jpg", "--question", "q", "--signal", "a.jpg"]) == 2
    assert "expected a path ending in .png" in capsys.readouterr().err
