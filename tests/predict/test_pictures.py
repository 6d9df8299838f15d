"""Alignment pictures through the predictor: each method's text-to-visual attention (``Predictor.align``) on the demo
set's images with random weights - rows the text's word pieces, columns the visual units with their boxes in the
image's pixels - checked against the attention computed by hand from the layer's own query/key weights on the
layer's input, a region swap that must permute the columns, cells that tile the image; the drawing, its files and
``mmf_ml_predict --picture``."""
import base64
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.mmf import ROOT
from helpers.predict import demo_data

METHODS = ["semvlp", "muvla", "mvptr", "soho", "simla"]
TEXT = "what color is the circle?"
IMAGE_ID = "demo_000000"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("pictures_data"), num_images=8)


_PREDICTORS = {}


def predictor_for(data, method, *overrides):
    from mmf_multilevel.predict import load_predictor

    key = (str(data), method, overrides)
    if key not in _PREDICTORS:
        torch.manual_seed(0)
        _PREDICTORS[key] = load_predictor(f"{ROOT}/projects/{method}/demo/vqa.yaml",
                                          overrides=[f"env.data_dir={data}", *overrides], device="cpu")
    return _PREDICTORS[key]


def image_path(data, image_id=IMAGE_ID):
    return str(data / "demo" / "images" / f"{image_id}.jpg")


def record_of(data, image_id=IMAGE_ID):
    from mmf_multilevel.features import FeatureCacheReader

    reader = FeatureCacheReader(str(data / "demo" / "features" / "regions.lmdb"))
    try:
        return reader.get(image_id), reader.header["info"]["object_names"]
    finally:
        reader.close()


def align(predictor, data, text=TEXT):
    image = image_path(data)
    if predictor.visual == "regions":
        return predictor.align(image, text, image_id=IMAGE_ID)
    return predictor.align(image, text)


@pytest.mark.parametrize("method", METHODS)
def test_rows_are_the_texts_pieces_columns_the_visual_units_with_boxes_in_the_image(method, data):
    predictor = predictor_for(data, method)
    alignment = align(predictor, data)
    width, height = Image.open(image_path(data)).size
    assert alignment.method == method and alignment.size == (width, height) and alignment.text == TEXT
    assert alignment.tokens == predictor.tokenizer.tokenize(TEXT)  # [CLS] / [SEP] / padding dropped
    assert alignment.picture.shape == (height, width, 3) and alignment.picture.dtype == np.uint8
    if predictor.visual == "regions":
        record, names = record_of(data)
        count = min(int(record["num_boxes"]), predictor.max_features)
        units = count
        assert alignment.labels == [names[i] for i in record["objects"][:count]]
        np.testing.assert_allclose(alignment.boxes, record["boxes"][:count], atol=1e-3)  # the demo's cache: pixels
    elif method == "soho":
        h, w = (int(n) for n in predictor.image_processor({"image": Image.open(image_path(data)).convert("RGB"),
                                                            "train": False})["image_size"])
        units = math.ceil(h / 64) * math.ceil(w / 64)
        assert alignment.labels is None
    else:
        units = 16  # 64 x 64 pixels in 16-pixel patches; the image [CLS] is no column
        assert alignment.labels is None
    assert alignment.weights.shape == (len(alignment.tokens), units) and alignment.boxes.shape == (units, 4)
    assert len(alignment.units) == units
    weights = alignment.weights
    assert (weights >= 0).all() and (weights.sum(1) <= 1 + 1e-5).all() and (weights.sum(1) > 0).all()
    boxes = alignment.boxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= width).all() \
        and (boxes[:, 3] <= height).all() and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert re.search(r"(layer|block) \d+ of \d+, .*mean of 4 heads", alignment.source), alignment.source


def capture_input(module):
    """The last call's inputs of an attention module (a forward pre-hook: independent of the recorder)."""
    seen = {}

    def hook(_, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["mask"] = kwargs["attention_mask"] if "attention_mask" in kwargs else args[1]
        seen["memory"] = kwargs.get("encoder_hidden_states")

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def attention_by_hand(module, seen):
    """Softmax of ``q k^T / sqrt(d)`` plus the mask from the layer's own projections, mean over heads: (Q, K)."""
    hidden = seen["hidden"][0].double()
    source = hidden if seen["memory"] is None else seen["memory"][0].double()
    heads, size = module.num_attention_heads, module.attention_head_size

    def project(linear, x):
        return (x @ linear.weight.double().T + linear.bias.double()).view(x.size(0), heads, size).transpose(0, 1)

    scores = project(module.query, hidden) @ project(module.key, source).transpose(-1, -2) / math.sqrt(size)
    mask = seen["mask"][0]
    scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, dim=-1).mean(0).float()


# layout -> (method, overrides, the attention module, rows and columns of the hand-made (queries, keys) map)
def _semvlp_single(model, n, count, width):
    return model.backbone.blocks[-1].attention.self, lambda a: a[1 + 8 + 1:1 + 8 + 1 + n, 1:1 + count]


def _semvlp_two(model, n, count, width):
    def pick(a):  # object -> text cross-attention, read backwards and normalised over the objects
        part = a.T[1:1 + n, 1:1 + count]
        return part / part.sum(1, keepdim=True)

    return model.backbone.cross_attention[str(model.backbone.num_layers - 1)].self, pick


def _muvla(model, n, count, width):
    return model.backbone.text.layers[-1].attention.self, lambda a: a[1:1 + n, width:width + count]


def _mvptr(model, n, count, width):
    return model.backbone.multimodal_layers[-1].attention.self, lambda a: a[1:1 + n, width:width + count]


def _soho(model, n, count, width):
    return model.backbone.text.layers[-1].attention.self, lambda a: a[1:1 + n, width:width + count]


def _simla(model, n, count, width):
    encoder = model.backbone.text_encoder
    return encoder.cross_attention[str(encoder.num_layers - 1)].self, lambda a: a[1:1 + n, 1:1 + count]


LAYOUTS = {
    "single-stream semvlp": ("semvlp", (), _semvlp_single),
    "two-stream semvlp (transposed cross-attention)": ("semvlp", ("model_config.semvlp.mode=two",), _semvlp_two),
    "single-stream muvla": ("muvla", (), _muvla),
    "single-stream mvptr (multimodal stage)": ("mvptr", (), _mvptr),
    "single-stream soho": ("soho", (), _soho),
    "cross-attention simla": ("simla", (), _simla),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_weights_equal_the_attention_computed_by_hand_from_the_layers_input(layout, data):
    method, overrides, pick = LAYOUTS[layout]
    predictor = predictor_for(data, method, *overrides)
    text_width = int(predictor.text_fields(TEXT)["input_ids"].numel())
    alignment = align(predictor, data)
    n, count = len(alignment.tokens), alignment.weights.shape[1]
    module, rows_and_columns = pick(predictor.model, n, count, text_width)
    seen, handle = capture_input(module)
    try:
        align(predictor, data)
    finally:
        handle.remove()
    with torch.no_grad():
        expected = rows_and_columns(attention_by_hand(module, seen)).numpy()
    assert expected.shape == alignment.weights.shape
    np.testing.assert_allclose(alignment.weights, expected, atol=1e-6)


class SwappedRegions:
    """The cache's record with regions ``i`` and ``j`` swapped (features, boxes, classes: every per-region field)."""

    def __init__(self, source, i, j):
        self.source, self.i, self.j = source, i, j

    def __call__(self, image, image_id):
        record = dict(self.source(image, image_id))
        order = np.arange(int(record["num_boxes"]))
        order[[self.i, self.j]] = order[[self.j, self.i]]
        for key in ("features", "boxes", "cls_prob", "objects", "attr_prob", "attrs"):
            if record.get(key) is not None:
                record[key] = np.asarray(record[key])[order]
        return record

    def object_names(self):
        return self.source.object_names()


@pytest.mark.parametrize("method", ["semvlp", "muvla", "mvptr"])
def test_swapping_two_regions_in_the_record_swaps_their_columns(method, data):
    from mmf_multilevel.predict import Predictor

    predictor = predictor_for(data, method)
    original = align(predictor, data)
    i, j = 0, 1  # a swap that commutes with no shift or reversal of the columns
    assert not np.allclose(original.weights[:, i], original.weights[:, j])  # the test can tell them apart
    swapped = Predictor(predictor.model, predictor.config, regions=SwappedRegions(predictor.region_source, i, j),
                        device="cpu")
    other = align(swapped, data)
    order = np.arange(original.weights.shape[1])
    order[[i, j]] = [j, i]
    np.testing.assert_allclose(other.weights, original.weights[:, order], atol=1e-6)
    np.testing.assert_allclose(other.boxes, original.boxes[order])
    assert other.labels == [original.labels[k] for k in order]


def tile_check(boxes, width, height):
    """Boxes inside the image, not overlapping, covering it: areas sum to the image's, and every pixel centre on
    a sampled lattice lies in exactly one box."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (boxes[:, :2] >= -1e-3).all() and (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
    assert float(areas.sum()) == pytest.approx(width * height, rel=1e-5)
    xs, ys = np.meshgrid(np.linspace(0.5, width - 0.5, 37), np.linspace(0.5, height - 0.5, 29))
    inside = ((xs[..., None] >= boxes[:, 0]) & (xs[..., None] < boxes[:, 2]) & (ys[..., None] >= boxes[:, 1])
              & (ys[..., None] < boxes[:, 3]))
    assert (inside.sum(-1) == 1).all()


@pytest.mark.parametrize("method, overrides", [
    ("soho", ()),
    # SOHO's padded canvas: cells wholly in the padding are no units, the others are clipped to the picture
    ("soho", ("dataset_config.vqa2_images.processors.image_processor.params.eval.pad_to=[256,256]",)),
    ("simla", ()),
])
def test_pixel_methods_cells_tile_the_image_through_the_resize(method, overrides, data):
    predictor = predictor_for(data, method, *overrides)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (170, 301, 3), dtype=np.uint8))  # not a multiple of any cell
    alignment = predictor.align(picture, TEXT)
    assert alignment.size == (301, 170)
    tile_check(alignment.boxes, 301, 170)
    if overrides:  # resized to 108 x 192 inside 256 x 256: the 2 x 3 cells of the 4 x 4 grid that hold picture
        assert alignment.units == [f"cell {r},{c}" for r in range(2) for c in range(3)]


def test_region_boxes_from_pixel_or_normalised_caches_land_in_the_query_images_pixels():
    from mmf_multilevel.predict.align import region_boxes

    pixels = np.array([[10, 20, 110, 70], [0, 0, 200, 100]], dtype=np.float32)
    np.testing.assert_allclose(region_boxes(pixels, 200, 100, (200, 100)), pixels)
    np.testing.assert_allclose(region_boxes(pixels, 200, 100, (400, 50)), pixels * [2, 0.5, 2, 0.5])
    np.testing.assert_allclose(region_boxes(pixels / [200, 100, 200, 100], 200, 100, (400, 50)),
                               pixels * [2, 0.5, 2, 0.5], rtol=1e-6)


def small_alignment(tokens=("a", "circ", "##le", "<b>&"), units=3):
    from mmf_multilevel.predict.align import Alignment

    weights = np.array([[0.1, 0.5, 0.2], [0.6, 0.1, 0.1], [0.2, 0.3, 0.1], [0.0, 0.05, 0.9]], dtype=np.float32)
    boxes = np.array([[0, 0, 40, 30], [40, 0, 80, 30], [0, 30, 80, 60]], dtype=np.float32)
    picture = np.zeros((60, 80, 3), dtype=np.uint8)
    return Alignment(method="test", text="a circle <b>&</b>", tokens=list(tokens), weights=weights[:len(tokens)],
                     boxes=boxes[:units], units=[f"region {k}" for k in range(units)],
                     labels=["circle", "square", "<i>"][:units], picture=picture, size=(80, 60), source="by hand")


def test_drawing_has_every_box_first_then_a_panel_per_word_with_its_top_units():
    from matplotlib.patches import Rectangle

    from mmf_multilevel.predict.align import merge_pieces
    from mmf_multilevel.predict.pictures import FONT, draw_alignment

    alignment = small_alignment()
    words = merge_pieces(alignment.tokens, alignment.weights)
    assert [w for w, _, _ in words] == ["a", "circle", "<b>&"]
    np.testing.assert_allclose(words[1][2], alignment.weights[1:3].mean(0))  # pieces' rows averaged
    figure = draw_alignment(alignment, top=2, columns=2)
    panels = [axes for axes in figure.axes if axes.get_title()]
    assert [a.get_title() for a in panels] == ["3 regions, every box", "a", "circle (circ ##le)", "<b>&"]
    assert len([p for p in panels[0].patches if isinstance(p, Rectangle)]) == 3
    for axes, (_, _, row) in zip(panels[1:], words):
        drawn = sorted(tuple(np.round(p.get_xy(), 3)) for p in axes.patches)
        best = np.argsort(-row)[:2]
        assert drawn == sorted(tuple(alignment.boxes[k][:2].astype(float)) for k in best)
    assert all(t.get_fontfamily() == [FONT] for axes in panels for t in axes.texts + [axes.title])


def test_written_png_opens_at_the_figures_size_and_the_html_is_self_contained(tmp_path, monkeypatch):
    from mmf_multilevel.predict import PredictInputError, pictures

    alignment = small_alignment()
    figure = pictures.draw_alignment(alignment)
    expected = tuple(int(round(v)) for v in figure.get_size_inches() * figure.dpi)
    out = pictures.write_alignment(alignment, str(tmp_path / "sub" / "a.png"), str(tmp_path / "sub" / "a.html"))
    assert out == {"picture": str(tmp_path / "sub" / "a.png"), "html": str(tmp_path / "sub" / "a.html")}
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.html", "a.png"]  # no temporary file left
    with Image.open(tmp_path / "sub" / "a.png") as png:
        assert png.format == "PNG" and png.size == expected
    page = (tmp_path / "sub" / "a.html").read_text(encoding="utf-8")
    for word in ("<td>a</td>", "<td>circle</td>", "<td>&lt;b&gt;&amp;</td>", "&lt;i&gt;", "a circle &lt;b&gt;&amp;&lt;/b&gt;"):
        assert word in page
    inline = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(inline) == (tmp_path / "sub" / "a.png").read_bytes()
    markup = page.replace(inline, "")
    assert "<b>&" not in markup and "//" not in markup and "http" not in markup and "url(" not in markup
    assert markup.count("src=") == 1 and b"http" not in base64.b64decode(inline)  # no link in the PNG's metadata
    # an error while writing leaves no half-written file behind: the page fails, nothing is written
    monkeypatch.setattr(pictures, "alignment_html", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        pictures.write_alignment(alignment, str(tmp_path / "b.png"), str(tmp_path / "b.html"))
    assert not any(name.startswith("b.") for name in os.listdir(tmp_path))
    with pytest.raises(PredictInputError, match="picture path: expected a path ending in .png, got 'a.jpg'"):
        pictures.write_alignment(alignment, "a.jpg")
    with pytest.raises(PredictInputError, match="html path: expected a path ending in .html"):
        pictures.write_alignment(alignment, "a.png", "a.txt")
    with pytest.raises(PredictInputError, match="top: expected a positive integer, got 0"):
        pictures.draw_alignment(alignment, top=0)


def test_picture_times_the_drawing_and_summarises_each_words_top_units(data, tmp_path):
    predictor = predictor_for(data, "semvlp")
    result = predictor.picture(None, TEXT, str(tmp_path / "p.png"), image_id=IMAGE_ID, top=2)
    assert result["picture"] == str(tmp_path / "p.png") and result["html"] is None
    assert {"text", "regions", "model", "drawing"} <= set(predictor.profile) and predictor.profile["drawing"] > 0
    summary = json.loads(json.dumps(result["alignment"]))
    assert [w["word"] for w in summary["words"]] == ["what", "color", "is", "the", "circle", "?"]
    record, names = record_of(data)
    for entry in summary["words"]:
        assert len(entry["top"]) == 2 and entry["top"][0]["weight"] >= entry["top"][1]["weight"]
        region = int(entry["top"][0]["unit"].split()[1])
        assert entry["top"][0]["label"] == names[record["objects"][region]]
        np.testing.assert_allclose(entry["top"][0]["box"], record["boxes"][region], atol=0.01)
    with Image.open(tmp_path / "p.png") as png:
        assert png.size[0] > 0
    from mmf_multilevel.predict import PredictInputError

    with pytest.raises(PredictInputError, match="text: expected a non-empty string"):
        predictor.align(None, " ", image_id=IMAGE_ID)


def test_the_base_model_names_the_method_without_an_alignment():
    from types import SimpleNamespace

    from mmf_multilevel.methods.base import MethodModel

    with pytest.raises(NotImplementedError, match="the someone model has no alignment"):
        MethodModel.alignment(SimpleNamespace(name="someone"), None)


def test_cli_picture_writes_the_files_and_the_json_names_them(data, tmp_path, capsys):
    from mmf_multilevel.predict.cli import main

    png, page = tmp_path / "q.png", tmp_path / "q.html"
    code = main(["--config", f"{ROOT}/projects/soho/demo/vqa.yaml", "--image", image_path(data), "--question", TEXT,
                 "--picture", str(png), "--html", str(page), "--profile", "--device", "cpu", f"env.data_dir={data}"])
    output = capsys.readouterr().out
    assert code == 0
    result = json.loads(output[output.index("{"):])
    assert result["picture"] == str(png) and result["html"] == str(page) and result["task"] == "vqa"
    assert png.is_file() and page.is_file() and "drawing" in result["profile"] and "model" in result["profile"]
    with pytest.raises(SystemExit):
        main(["--config", "x.yaml", "--image", "a.jpg", "--question", "q", "--html", "a.html"])
    assert "--html needs --picture" in capsys.readouterr().err
    assert main(["--config", "x.yaml", "--image", "a.jpg", "--question", "q", "--picture", "a.jpg"]) == 2
    assert "expected a path ending in .png" in capsys.readouterr().err
