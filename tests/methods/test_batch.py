"""The batch contract (``methods/batch.py``) on hand-built sample lists: every field it reads, what it
computes from them, and the error that names a missing or malformed one."""
import pytest
import torch

from mmf_multilevel.methods.batch import RegionInputs, detector_labels, pixel_inputs, region_inputs, text_inputs

DIM = 6


def _regions(batch=2, num=4, count=(3, 4), key="max_features", **extra):
    torch.manual_seed(0)
    info = {key: torch.tensor(count), "image_width": torch.tensor([100, 200]), "image_height": torch.tensor([50, 100]),
            "bbox": torch.tensor([[[0.0, 0.0, 50.0, 25.0]] * (num + 2)] * batch)}
    info.update(extra)
    return {"image_feature_0": torch.randn(batch, num, DIM).half(), "image_info_0": info}


# ------------------------------------------------------------------------------------------------ text
def test_text_inputs_read_the_processors_fields_and_default_the_mask():
    ids = torch.tensor([[101, 7, 102, 0], [101, 102, 0, 0]])
    given_mask, segments = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), torch.ones(2, 4, dtype=torch.long)
    text = text_inputs({"input_ids": ids, "input_mask": given_mask, "segment_ids": segments}, "m")
    assert text.input_ids is ids and text.mask is given_mask and text.segment_ids is segments
    bare = text_inputs({"input_ids": ids, "input_mask": None, "segment_ids": None}, "m")
    assert bare.mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]] and bare.mask.dtype == torch.long
    assert bare.segment_ids is None
    assert text_inputs({"input_ids": ids}, "m").segment_ids is None  # the fields may be absent too
    for batch in ({}, {"input_ids": None}):
        with pytest.raises(KeyError, match="^\"mymodel needs 'input_ids'"):
            text_inputs(batch, "mymodel")


# ------------------------------------------------------------------------------------------------ regions
@pytest.mark.parametrize("key", ["max_features", "num_boxes"])
def test_region_inputs_mask_boxes_and_float_features(key):
    batch = _regions(key=key)
    regions = region_inputs(batch, "m", DIM, "5d")
    assert regions.features.dtype == torch.float32 and torch.equal(regions.features,
                                                                   batch["image_feature_0"].float())
    assert regions.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # first image 100 x 50, second 200 x 100: the same pixel box, normalised by each size; cut to N rows
    assert regions.boxes.shape == (2, 4, 5)
    torch.testing.assert_close(regions.boxes[0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5, 0.25]))
    torch.testing.assert_close(regions.boxes[1, 0], torch.tensor([0.0, 0.0, 0.25, 0.25, 0.0625]))
    assert (regions.boxes[0, 3] == 0).all()  # padding: zero
    assert regions.info is batch["image_info_0"]
    assert regions.corrupted is regions.features and regions.selected is None
    assert region_inputs(batch, "m", DIM, "4d").boxes.shape == (2, 4, 4)
    # built by hand, the network reads the originals
    direct = RegionInputs(regions.features, regions.boxes, regions.mask, {})
    assert direct.corrupted is regions.features and direct.selected is None


def test_region_inputs_prefer_max_features_and_clamp_counts_to_the_features():
    batch = _regions(count=(2, 9), num_boxes=torch.tensor([1, 1]))
    assert region_inputs(batch, "m", DIM, "4d").mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    column = _regions(count=[[2], [4]])  # (B, 1) counts, as some caches store them
    assert region_inputs(column, "m", DIM, "4d").mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_region_inputs_errors_name_the_model_and_the_field():
    with pytest.raises(KeyError, match="mymodel needs 'image_feature_0' and 'image_info_0'"):
        region_inputs({"image_feature_0": torch.zeros(1, 2, DIM)}, "mymodel", DIM, "4d")
    with pytest.raises(KeyError, match="mymodel needs 'image_feature_0' and 'image_info_0'"):
        region_inputs({"image_info_0": {}}, "mymodel", DIM, "4d")
    with pytest.raises(ValueError, match=r"^image_feature_0 has 6-d features but model_config.mymodel.feature_dim is 8"):
        region_inputs(_regions(), "mymodel", 8, "4d")
    for key in ("bbox", "image_width", "image_height"):
        batch = _regions()
        del batch["image_info_0"][key]
        with pytest.raises(KeyError, match=f"mymodel needs image_info_0.{key} for the 5d region boxes"):
            region_inputs(batch, "mymodel", DIM, "5d")


def test_paired_sides_are_read_and_a_missing_side_names_the_layout():
    left, right = _regions(), _regions(count=(1, 1))
    paired = {"img0": left, "img1": right}
    assert region_inputs(paired, "m", DIM, "4d", side="img1").mask.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert torch.equal(region_inputs(paired, "m", DIM, "4d", side="img0").features, left["image_feature_0"].float())
    with pytest.raises(KeyError, match="mymodel needs the paired layout \\('img1' missing.*input_layout: paired"):
        region_inputs({"img0": left}, "mymodel", DIM, "4d", side="img1")
    with pytest.raises(ValueError, match="side must be one of \\['img0', 'img1'\\] or None, got 'img2'"):
        region_inputs(paired, "m", DIM, "4d", side="img2")


def test_the_datasets_masked_region_decisions_are_applied_and_checked():
    batch = _regions()
    original = batch["image_feature_0"].float()
    batch.update(region_selected=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]]),
                 region_zeroed=torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]),
                 region_source=torch.tensor([[-1, 2, -1, -1], [-1, -1, -1, 0]]))
    regions = region_inputs(batch, "m", DIM, "4d")
    assert regions.selected.dtype == torch.bool and regions.selected.tolist() == [[True, True, False, False],
                                                                                   [False, False, False, True]]
    assert torch.equal(regions.features, original)  # the originals stay the regression target
    expected = original.clone()
    expected[0, 0] = 0.0
    expected[0, 1] = original[0, 2]
    expected[1, 3] = original[1, 0]
    assert torch.equal(regions.corrupted, expected)
    for key in ("region_zeroed", "region_source"):
        partial = dict(batch, **{key: None})
        with pytest.raises(KeyError, match=f"^'mymodel: the batch has region_selected but no {key}"):
            region_inputs(partial, "mymodel", DIM, "4d")
        wrong = dict(batch, **{key: torch.zeros(2, 3, dtype=torch.long)})
        with pytest.raises(ValueError, match=rf"^mymodel: {key} has shape \(2, 3\), expected \(2, 4\)"):
            region_inputs(wrong, "mymodel", DIM, "4d")
    padding = dict(batch, region_selected=torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="^mymodel: region_selected marks padding regions"):
        region_inputs(padding, "mymodel", DIM, "4d")
    unselected = dict(batch, region_selected=None)
    assert region_inputs(unselected, "m", DIM, "4d").selected is None


def test_detector_labels_from_objects_or_cls_prob_cut_to_the_regions():
    objects = torch.tensor([[3, 1, 2, 0, 9, 9], [1, 1, 1, 1, 9, 9]], dtype=torch.int32)
    labels = detector_labels(region_inputs(_regions(objects=objects), "m", DIM, "4d"), "m", "hint")
    assert labels.dtype == torch.long and labels.tolist() == [[3, 1, 2, 0], [1, 1, 1, 1]]
    cls_prob = torch.zeros(2, 6, 5)
    cls_prob[0, :, 4] = 1.0
    cls_prob[1, :, 2] = 1.0
    labels = detector_labels(region_inputs(_regions(cls_prob=cls_prob), "m", DIM, "4d"), "m", "hint")
    assert labels.tolist() == [[4] * 4, [2] * 4]
    both = detector_labels(region_inputs(_regions(objects=objects, cls_prob=cls_prob), "m", DIM, "4d"), "m", "hint")
    assert both.tolist() == [[3, 1, 2, 0], [1, 1, 1, 1]]  # objects first
    with pytest.raises(KeyError, match="mymodel: masked region label prediction needs.*objects.*set it off"):
        detector_labels(region_inputs(_regions(), "m", DIM, "4d"), "mymodel", "set it off")


# ------------------------------------------------------------------------------------------------ pixels
def test_pixel_inputs_mask_the_padding_from_the_recorded_sizes():
    pixels = torch.rand(2, 3, 4, 5).half()
    inputs = pixel_inputs({"image": pixels, "image_size": torch.tensor([[2, 3], [4, 5]])}, "m")
    assert inputs.pixels.dtype == torch.float32 and torch.equal(inputs.pixels, pixels.float())
    assert inputs.mask.dtype == torch.bool and inputs.mask.shape == (2, 4, 5)
    assert inputs.mask[0].sum() == 6 and inputs.mask[0, :2, :3].all() and inputs.mask[1].all()
    for batch in ({"image": pixels}, {"image": pixels, "image_size": None}):
        whole = pixel_inputs(batch, "m").mask
        assert whole.dtype == torch.bool and whole.shape == (2, 4, 5) and whole.all()
    other = pixel_inputs({"pic": pixels, "pic_size": torch.tensor([[1, 1], [1, 2]])}, "m", field="pic")
    assert other.mask.sum(dim=(1, 2)).tolist() == [1, 2]
    paired = {"img0": {"image": pixels}, "img1": {"image": pixels * 0}}
    assert pixel_inputs(paired, "m", side="img1").pixels.abs().sum() == 0
    with pytest.raises(KeyError, match="mymodel needs the paired layout"):
        pixel_inputs({"image": pixels}, "mymodel", side="img0")
    for batch in ({}, {"image": None}):
        with pytest.raises(KeyError, match="^\"mymodel needs 'image'"):
            pixel_inputs(batch, "mymodel")
    for shape in ((2, 4, 5), (2, 1, 4, 5)):
        with pytest.raises(ValueError, match=r"^'image' must be a \(batch, 3, height, width\) tensor"):
            pixel_inputs({"image": torch.zeros(shape)}, "mymodel")
