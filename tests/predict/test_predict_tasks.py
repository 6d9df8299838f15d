"""Predictor.nlvr2 and Predictor.ground on raw inputs equal the model on the dataset's own sample (the demo set's val
statements and expressions, each method's demo project, a model as built: random weights, so any difference in the
inputs shows in the scores); the grounding pick is refcoco_accuracy's; mmf_ml_predict's NLVR2 and grounding JSON."""
import json

import pytest
import torch

from helpers.mmf import ROOT
from helpers.predict import dataset_of, demo_data, image_input, model_scores, predictor_for

NLVR2_METHODS = ["semvlp", "muvla", "soho", "simla"]
GROUND_PROJECTS = {"muvla": ("muvla", "refcoco_plus"), "mvptr": ("mvptr", "refcoco_plus"),
                   "simla": ("simla", "refcoco_plus_weak"), "visual_bert_grounding": ("visual_bert", "refcoco_plus")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("predict_tasks_data"), num_images=24)


def side_inputs(predictor, dataset, left, right, kind="path"):
    """The keyword arguments of ``predictor.nlvr2`` for the dataset's images ``left`` / ``right``: the files
    (pixel methods) or their ids in the region cache."""
    if predictor.visual == "pixels":
        return {"left_image": image_input(dataset, left, kind), "right_image": image_input(dataset, right, kind)}
    return {"left_image_id": left, "right_image_id": right}


def assert_same_fields(actual, expected, where="sample"):
    """Two samples with the same keys and equal tensors, nested samples (img0 / img1, image_info_0) included."""
    assert sorted(actual.keys()) == sorted(expected.keys()), where
    for key in expected:
        a, e = actual[key], expected[key]
        if isinstance(e, dict):
            assert_same_fields(a, e, f"{where}.{key}")
        elif isinstance(e, torch.Tensor):
            assert a.dtype == e.dtype and torch.equal(a, e), f"{where}.{key}"
        else:
            assert a == e, f"{where}.{key}"


@pytest.mark.parametrize("method", NLVR2_METHODS)
def test_nlvr2_scores_equal_the_model_on_the_datasets_own_val_sample(method, data):
    from mmf_multilevel.datasets.nlvr2 import statement_labels

    predictor = predictor_for(data, method, "nlvr2")
    dataset = dataset_of(predictor)
    assert predictor.visual == ("pixels" if method in ("simla", "soho") else "regions")
    for index, kind in zip(range(len(dataset)), ["path", "bytes", "pil", "path"]):
        record = dataset.records[index]
        expected = model_scores(predictor, dataset[index], dataset)
        result = predictor.nlvr2(statement=record["sentence"],
                                 **side_inputs(predictor, dataset, record["left_image"], record["right_image"], kind))
        assert torch.equal(result["scores"], expected[0]), (method, index)
        assert result["label"] is bool(statement_labels(expected)[0])
        assert result["probability"] == pytest.approx(float(torch.softmax(expected[0], 0)[1]))
        assert result["score"] == pytest.approx(float(expected[0, 1] - expected[0, 0]))
        assert result["statement"] == record["sentence"]
    # the statement is read: another one gives other scores
    record = dataset.records[0]
    sides = side_inputs(predictor, dataset, record["left_image"], record["right_image"])
    assert not torch.equal(predictor.nlvr2(statement="one image shows a red circle .", **sides)["scores"],
                           predictor.nlvr2(statement=record["sentence"], **sides)["scores"])


@pytest.mark.parametrize("method", ["semvlp", "soho", "simla"])
def test_swapping_left_and_right_changes_the_sample_as_the_dataset_would(method, data):
    predictor = predictor_for(data, method, "nlvr2")
    dataset = dataset_of(predictor)
    record = next(r for r in dataset.records if r["left_image"] != r["right_image"])
    index = dataset.records.index(record)
    dataset.records[index] = dict(record, left_image=record["right_image"], right_image=record["left_image"])
    swapped = model_scores(predictor, dataset[index], dataset)[0]
    left, right = record["left_image"], record["right_image"]
    as_given = predictor.nlvr2(statement=record["sentence"], **side_inputs(predictor, dataset, left, right))["scores"]
    reversed_ = predictor.nlvr2(statement=record["sentence"], **side_inputs(predictor, dataset, right, left))["scores"]
    assert torch.equal(reversed_, swapped)
    assert not torch.equal(reversed_, as_given)  # the head reads the sides in order


def test_the_concatenated_layout_is_the_datasets(data, monkeypatch):
    """input_layout: concatenated (one region sequence of both images, image_segment_ids): the predictor's sample
    is the dataset's, field by field (no registered method reads this layout, so the model is not run)."""
    from omegaconf import open_dict

    predictor = predictor_for(data, "semvlp", "nlvr2")
    with open_dict(predictor.dataset_config):
        predictor.dataset_config.input_layout = "concatenated"
    dataset = dataset_of(predictor)
    assert dataset.layout == "concatenated"
    seen = []

    def forward(samples):
        seen.extend(samples)
        return {"scores": torch.zeros(1, 2)}

    monkeypatch.setattr(predictor, "forward", forward)
    for index, record in enumerate(dataset.records[:2]):
        predictor.nlvr2(statement=record["sentence"], left_image_id=record["left_image"],
                        right_image_id=record["right_image"])
        expected = dataset[index]
        del expected["targets"]
        expected.id = torch.tensor(0, dtype=torch.long)
        assert_same_fields(seen[-1], expected)
        assert seen[-1]["image_segment_ids"].tolist() == [0] * 8 + [1] * 8


@pytest.mark.parametrize("method", sorted(GROUND_PROJECTS))
def test_ground_picks_the_proposal_the_refcoco_evaluation_picks(method, data):
    from mmf.common.sample import SampleList

    from mmf_multilevel.evaluation.grounding import box_iou, chosen_proposals
    from mmf_multilevel.metrics import RefCOCOAccuracy

    predictor = predictor_for(data, *GROUND_PROJECTS[method])
    # MVPTR: a raw expression has no concept-tool line, so it is read without phrases, as the dataset reads one its
    # phrase file lacks
    dataset = dataset_of(predictor, **({"phrases": None} if method == "mvptr" else {}))
    hits = []
    for index, record in enumerate(dataset.records):
        sample = dataset[index]
        expected = model_scores(predictor, sample, dataset)
        count = int(sample.num_proposals)
        if predictor.visual == "pixels":  # SIMLA: Grad-CAM over the proposals of the dataset's region cache
            result = predictor.ground(image_input(dataset, record["image_id"], "path"), record["expression"],
                                      image_id=record["image_id"], top_k=3)
        else:
            result = predictor.ground(None, record["expression"], image_id=record["image_id"], top_k=3)
        assert torch.equal(result["scores"], expected[0, :count]), (method, index)
        pick = int(chosen_proposals(expected, sample.num_proposals.view(1))[0][0])
        assert result["index"] == pick
        assert result["box"] == sample.proposal_boxes[pick].tolist()
        assert result["image_size"] == [int(sample.image_info_0.image_width), int(sample.image_info_0.image_height)]
        assert result["num_proposals"] == count
        assert [e["index"] for e in result["top_k"]][0] == pick and len(result["top_k"]) == min(3, count)
        assert [e["score"] for e in result["top_k"]] == sorted((e["score"] for e in result["top_k"]), reverse=True)
        # the box is what refcoco_accuracy scores against the gold box
        batch = SampleList([sample])
        accuracy = float(RefCOCOAccuracy().calculate(batch, {"scores": expected}))
        hit = bool(box_iou(torch.tensor(result["box"]), sample.gold_box) > 0.5)
        assert accuracy == float(hit), (method, index)
        hits.append(hit)
    assert any(hits) and not all(hits)  # both outcomes occur: the comparison can tell them apart


def test_ground_reads_the_proposals_from_the_region_source(data):
    """A query image without an id: its proposals come from the predictor's region source (here a source keyed by
    the image's SHA-256, its record's proposals in reverse order): the same box is chosen, by its new index."""
    from mmf_multilevel.features import FeatureCacheReader
    from mmf_multilevel.predict import RegionSource

    reference = predictor_for(data, "simla", "refcoco_plus_weak")
    dataset = dataset_of(reference)
    record = dataset.records[1]
    reader = FeatureCacheReader(dataset.features_path)
    cached = reader.get(record["image_id"])
    count = int(cached["boxes"].shape[0])
    reversed_record = {**cached, **{key: cached[key][::-1].copy() for key in ("boxes", "features", "cls_prob", "objects")
                                    if cached.get(key) is not None}}

    class ReversedRegions(RegionSource):
        def __init__(self):
            self.keys = []

        def __call__(self, image, image_id):
            self.keys.append((image_id, image.sha256 if image is not None else None))
            return reversed_record

        def object_names(self):
            return reader.object_names

    source = ReversedRegions()
    predictor = predictor_for(data, "simla", "refcoco_plus_weak", regions=source)
    path = image_input(dataset, record["image_id"], "path")
    result = predictor.ground(path, record["expression"], top_k=count)
    expected = reference.ground(path, record["expression"], image_id=record["image_id"], top_k=count)
    assert len(source.keys) == 1 and source.keys[0][0] is None and len(source.keys[0][1]) == 64
    assert result["box"] == expected["box"] and result["index"] == count - 1 - expected["index"]
    assert torch.allclose(result["scores"], expected["scores"].flip(0))
    assert result["label"] == expected["label"]


def test_bad_inputs_are_refused_by_name(data):
    from mmf_multilevel.predict import PredictInputError

    vqa = predictor_for(data, "semvlp", "vqa")
    with pytest.raises(PredictInputError, match=r"nlvr2 needs a semvlp model with training_head_type in \['nlvr2'\].*"
                                                r"this one is 'classification'"):
        vqa.nlvr2(statement="a", left_image_id="x", right_image_id="y")
    with pytest.raises(PredictInputError, match=r"ground needs a semvlp model with training_head_type in "
                                                r"\['refcoco', 'grounding'\]"):
        vqa.ground(None, "the red square", image_id="x")
    regions = predictor_for(data, "semvlp", "nlvr2")
    with pytest.raises(PredictInputError, match=r"ground needs a semvlp model"):
        regions.ground(None, "the red square", image_id="x")
    dataset = dataset_of(regions)
    left = dataset.records[0]["left_image"]
    with pytest.raises(PredictInputError, match=r"right_image: NLVR2 judges a statement about two images; give "
                                                r"right_image .* or right_image_id"):
        regions.nlvr2(statement="both images contain a diamond .", left_image_id=left)
    with pytest.raises(PredictInputError, match="statement: expected a non-empty string"):
        regions.nlvr2(statement=" ", left_image_id=left, right_image_id=left)
    with pytest.raises(PredictInputError, match=r"no regions for image_id 'nope'"):
        regions.nlvr2(statement="a diamond", left_image_id=left, right_image_id="nope")
    pixels = predictor_for(data, "soho", "nlvr2")
    image = image_input(dataset_of(pixels), left, "path")
    with pytest.raises(PredictInputError, match=r"left_image: NLVR2 judges a statement about two images; give "
                                                r"left_image \(a path, encoded bytes or a PIL.Image\)$"):
        pixels.nlvr2(None, image, "a diamond", left_image_id=left)
    grounding = predictor_for(data, "muvla", "refcoco_plus")
    image_id = dataset_of(grounding).records[0]["image_id"]
    with pytest.raises(PredictInputError, match="top_k: expected a positive integer, got 0"):
        grounding.ground(None, "the red square", image_id=image_id, top_k=0)
    with pytest.raises(PredictInputError, match="expression: expected a non-empty string"):
        grounding.ground(None, "", image_id=image_id)
    with pytest.raises(PredictInputError, match=r"nlvr2 needs a muvla model with training_head_type in \['nlvr2'\]"):
        grounding.nlvr2(statement="a", left_image_id=image_id, right_image_id=image_id)


def test_the_grounding_picture_draws_the_chosen_box_thick_and_the_other_top_k_thin(data, tmp_path):
    from matplotlib.patches import Rectangle
    from PIL import Image

    from mmf_multilevel.predict.tasks import draw_grounding, ground_picture

    predictor = predictor_for(data, "muvla", "refcoco_plus")
    record = dataset_of(predictor).records[2]
    result = predictor.ground(None, record["expression"], image_id=record["image_id"], top_k=3)
    figure = draw_grounding(result)
    boxes = [(p.get_xy(), p.get_width(), p.get_height(), p.get_linewidth())
             for p in figure.axes[0].patches if isinstance(p, Rectangle)]
    assert len(boxes) == 3
    by_box = {(round(x, 3), round(y, 3), round(x + w, 3), round(y + h, 3)): width for (x, y), w, h, width in boxes}
    for entry in result["top_k"]:
        key = tuple(round(v, 3) for v in entry["box"])
        assert by_box[key] == (3.5 if entry["index"] == result["index"] else 1.2)
    drawn = ground_picture(predictor, None, record["expression"], str(tmp_path / "sub" / "ground.png"),
                           image_id=record["image_id"])
    assert Image.open(drawn["picture"]).format == "PNG" and "drawing" in predictor.profile
    assert drawn["box"] == predictor.ground(None, record["expression"], image_id=record["image_id"])["box"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ground.png"]  # no temporary file left


def test_mmf_ml_predict_nlvr2_and_grounding_json_and_errors(data, tmp_path, capsys):
    from mmf_multilevel.predict.cli import main

    opts = [f"env.data_dir={data}"]
    soho = f"{ROOT}/projects/soho/demo/nlvr2.yaml"
    predictor = predictor_for(data, "soho", "nlvr2")
    dataset = dataset_of(predictor)
    record = dataset.records[0]
    left, right = (image_input(dataset, record[k], "path") for k in ("left_image", "right_image"))
    capsys.readouterr()  # the config loader's messages
    torch.manual_seed(0)  # the command builds the same random weights as predictor_for
    assert main(["--config", soho, "--image", left, "--image2", right, "--statement", record["sentence"], *opts]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = predictor.nlvr2(left, right, record["sentence"])
    assert out["task"] == "nlvr2" and out["method"] == "soho" and out["image"] == left and out["image2"] == right
    assert out["label"] == expected["label"] and out["probability"] == pytest.approx(expected["probability"])

    muvla = f"{ROOT}/projects/muvla/demo/refcoco_plus.yaml"
    grounding = predictor_for(data, "muvla", "refcoco_plus")
    ref = dataset_of(grounding).records[0]
    picture = tmp_path / "box.png"
    capsys.readouterr()
    torch.manual_seed(0)
    assert main(["--config", muvla, "--image-id", ref["image_id"], "--expression", ref["expression"], "--top-k", "2",
                 "--picture", str(picture), *opts]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = grounding.ground(None, ref["expression"], image_id=ref["image_id"], top_k=2)
    assert out["task"] == "ground" and out["box"] == expected["box"] and len(out["top_k"]) == 2
    assert out["picture"] == str(picture) and picture.is_file()

    # a model without the head: exit 2, the head named
    assert main(["--config", muvla, "--image-id", ref["image_id"], "--image2-id", ref["image_id"], "--statement", "a",
                 *opts]) == 2
    assert "nlvr2 needs a muvla model with training_head_type in ['nlvr2']" in capsys.readouterr().err
    # argument mistakes: argparse's exit 2, before any model loads
    for argv, message in (
            (["--image", left, "--statement", "a"], "--statement (NLVR2) needs two images"),
            (["--image", left, "--image2", right, "--question", "a"], "--image2 / --image2-id are the right image"),
            (["--image", left, "--expression", "a", "--picture", "a.png", "--html", "a.html"], "--html is the page"),
            (["--image", left, "--image2", right, "--statement", "a", "--picture", "a.png"], "not an NLVR2 statement"),
            (["--image", left, "--statement", "a", "--expression", "b"], "not allowed with argument"),
            (["--batch", "q.jsonl", "--out", "r.jsonl", "--expression", "b"], "--batch reads the queries")):
        with pytest.raises(SystemExit) as exit_:
            main(["--config", soho, *argv, *opts])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, message


def test_batch_lines_ask_nlvr2_and_grounding(data, tmp_path):
    import io

    from mmf_multilevel.predict.cli import run_batch

    predictor = predictor_for(data, "muvla", "refcoco_plus")
    records = dataset_of(predictor).records[:2]
    lines = [json.dumps({"id": f"g{i}", "image_id": r["image_id"], "expression": r["expression"], "top_k": 2})
             for i, r in enumerate(records)]
    lines += [json.dumps({"id": "pair", "image_id": records[0]["image_id"], "image2_id": records[1]["image_id"],
                          "statement": "both images contain a square ."}),
              json.dumps({"id": "one", "image_id": records[0]["image_id"], "statement": "a square"}),
              json.dumps({"id": "two", "image_id": records[0]["image_id"], "image2": "b.jpg", "expression": "x"}),
              json.dumps({"id": "both", "image_id": records[0]["image_id"], "question": "a", "expression": "x"}),
              json.dumps({"id": "odd", "image_id": records[0]["image_id"], "expression": "x", "colour": 1})]
    batch = tmp_path / "queries.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    stream = io.StringIO()
    assert run_batch(predictor, str(batch), str(out), stream=stream) == {"predicted": 2, "skipped": 0, "bad": 5}
    errors = stream.getvalue()
    assert "line 3: nlvr2 needs a muvla model with training_head_type in ['nlvr2']" in errors
    assert "line 4: a 'statement' (NLVR2) needs the right image too" in errors
    assert "line 5: 'image2' / 'image2_id' are the right image of an NLVR2 'statement'" in errors
    assert "line 6: give exactly one of 'question' (VQA), 'text' (image-text matching), 'statement'" in errors
    assert "line 7: unknown field(s) ['colour']" in errors
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["g0", "g1"]
    for result, record in zip(results, records):
        expected = predictor.ground(None, record["expression"], image_id=record["image_id"], top_k=2)
        assert result["task"] == "ground" and result["box"] == expected["box"] and len(result["top_k"]) == 2
