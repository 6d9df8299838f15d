"""Region feature extractor: tiny random-initialised detectron2 detectors on generated images."""
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from helpers.extract import TINY_FEATURE_DIM, make_images, tiny_opts

detectors = pytest.importorskip("mmf_multilevel.extraction.detectors", reason="detectron2 is not installed (run scripts/install.sh)")

from mmf_multilevel.extraction import converters, data, runner  # noqa: E402
from mmf_multilevel.extraction.extractor import RegionFeatureExtractor, select_regions  # noqa: E402
from mmf_multilevel.features import (  # noqa: E402
    FeatureCacheReader,
    FeatureCacheWriter,
    HeaderMismatchError,
    check_cache,
)

torch.set_num_threads(1)


def _cfg(model):
    return detectors.load_config(model, tiny_opts(model))


@pytest.fixture(scope="module")
def butd():
    cfg = _cfg("butd_r101")
    return cfg, detectors.build_random_detector(cfg, seed=0)


@pytest.fixture(scope="module")
def vinvl():
    cfg = _cfg("vinvl_x152c4")
    return cfg, detectors.build_random_detector(cfg, seed=1)


def _inputs(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, originals = [], []
    for w, h in sizes:
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        images.append(data.prepare_image(arr, 96, 160))
        originals.append((w, h))
    return images, originals


# --------------------------------------------------------------------------- architecture
def test_architecture_matches_the_originals():
    butd = detectors.load_config("butd_r101")
    assert butd.MODEL.RESNETS.DEPTH == 101 and butd.MODEL.ROI_HEADS.NUM_CLASSES == 1600
    assert butd.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES == 401 and butd.MODEL.RESNETS.RES5_DILATION == 2
    assert butd.MODEL.ROI_HEADS.NAME == "AttributeRes5ROIHeads" and butd.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIPool"
    vinvl = detectors.load_config("vinvl_x152c4")
    assert (vinvl.MODEL.RESNETS.DEPTH, vinvl.MODEL.RESNETS.NUM_GROUPS, vinvl.MODEL.RESNETS.WIDTH_PER_GROUP) == (152, 32, 8)
    assert vinvl.MODEL.ROI_HEADS.NUM_CLASSES == 1594 and vinvl.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES == 525
    assert vinvl.MODEL.RESNETS.STRIDE_IN_1X1 is False
    from detectron2.modeling import ROI_HEADS_REGISTRY

    assert ROI_HEADS_REGISTRY.get("AttributeRes5ROIHeads") is detectors.AttributeRes5ROIHeads


def test_butd_res5_is_dilated_and_stem_is_caffe(butd):
    _, model = butd
    assert isinstance(model.backbone.stem, detectors.CaffeMaxPoolStem)
    first = model.roi_heads.res5[0]
    assert first.conv2.dilation == (2, 2) and first.conv2.stride == (1, 1)


# --------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("which", ["butd", "vinvl"])
def test_shapes_dtypes_boxes_and_sorted_scores(which, request):
    cfg, model = request.getfixturevalue(which)
    ex = RegionFeatureExtractor(model, min_boxes=4, max_boxes=12, conf_thresh=0.2, nms_thresh=0.3)
    images, sizes = _inputs([(200, 150), (70, 90), (120, 120)])
    outs = ex(images, sizes)
    assert len(outs) == 3
    C = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    A = cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES
    for out, (w, h) in zip(outs, sizes):
        n = out["features"].shape[0]
        assert 4 <= n <= 12
        assert out["features"].shape == (n, TINY_FEATURE_DIM) and out["features"].dtype == torch.float32
        assert out["boxes"].shape == (n, 4) and out["cls_prob"].shape == (n, C + 1) and out["attr_prob"].shape == (n, A)
        assert out["objects"].dtype == torch.int64 and out["attrs"].dtype == torch.int64
        assert torch.isfinite(out["features"]).all()
        b = out["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        s = out["scores"]
        assert (s[:-1] >= s[1:]).all(), "regions must be sorted by confidence"
        assert torch.allclose(out["cls_prob"].sum(1), torch.ones(n), atol=1e-4)
        assert torch.equal(out["objects"], out["cls_prob"][:, 1:].argmax(1))
        assert (out["objects"] < C).all() and (out["attrs"] < A - 1).all()


def test_min_and_max_boxes_are_honoured(butd):
    _, model = butd
    images, sizes = _inputs([(160, 120)])
    many = RegionFeatureExtractor(model, min_boxes=1, max_boxes=5, conf_thresh=0.0)(images, sizes)[0]
    assert many["features"].shape[0] == 5  # conf 0: everything passes, capped at max
    few = RegionFeatureExtractor(model, min_boxes=7, max_boxes=9, conf_thresh=1.0)(images, sizes)[0]
    assert few["features"].shape[0] == 7  # nothing passes: filled up to min
    fixed = RegionFeatureExtractor(model, min_boxes=6, max_boxes=6)(images, sizes)[0]
    assert fixed["features"].shape[0] == 6


def test_batched_equals_per_image(butd):
    """Batching images of one size gives each image exactly its per-image regions.

    (Images of different sizes are padded; as in detectron2, activations next to the padded
    border then differ slightly from a per-image run.)
    """
    _, model = butd
    ex = RegionFeatureExtractor(model, min_boxes=3, max_boxes=8)
    images, sizes = _inputs([(150, 100), (150, 100)])
    batched = ex(images, sizes)
    for i in range(2):
        alone = ex([images[i]], [sizes[i]])[0]
        assert torch.equal(alone["objects"], batched[i]["objects"])
        assert torch.allclose(alone["boxes"], batched[i]["boxes"], atol=1e-3)
        assert torch.allclose(alone["features"], batched[i]["features"], rtol=1e-3, atol=1e-3)


def test_determinism_same_seed_same_weights_and_features():
    cfg = _cfg("butd_r101")
    a = detectors.build_random_detector(cfg, seed=3)
    b = detectors.build_random_detector(cfg, seed=3)
    assert converters.state_sha256(a) == converters.state_sha256(b)
    c = detectors.build_random_detector(cfg, seed=4)
    assert converters.state_sha256(a) != converters.state_sha256(c)
    images, sizes = _inputs([(120, 100)])
    oa = RegionFeatureExtractor(a, 2, 6)(images, sizes)[0]
    ob = RegionFeatureExtractor(b, 2, 6)(images, sizes)[0]
    for key in oa:
        assert torch.equal(oa[key], ob[key]), key


def test_random_init_gives_proposals_and_finite_features(butd):
    _, model = butd
    images, _ = _inputs([(160, 120)])
    batch = model.preprocess_image([{"image": images[0]}])
    feats = model.backbone(batch.tensor)
    assert feats["res4"].abs().max() < 1e3  # calibrated: no exploding activations
    proposals, _ = model.proposal_generator(batch, feats, None)
    assert len(proposals[0]) > 0


def _reference_selection(boxes, probs, min_boxes, max_boxes, conf, thresh):
    """Independent numpy version of bottom-up attention's selection."""

    def iou(a, b):
        x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
        x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
        return inter / (area(a) + area(b) - inter)

    max_conf = np.zeros(len(boxes))
    for c in range(1, probs.shape[1]):
        order = np.argsort(-probs[:, c], kind="stable")
        keep = []
        for i in order:
            if all(iou(boxes[i], boxes[[j]])[0] <= thresh for j in keep):
                keep.append(i)
        keep = np.array(keep)
        max_conf[keep] = np.maximum(max_conf[keep], probs[keep, c])
    order = np.argsort(-max_conf, kind="stable")
    n = int((max_conf >= conf).sum())
    return order[: min(max(n, min_boxes), max_boxes, len(boxes))]


def test_selection_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (40, 2))
    wh = rng.uniform(5, 40, (40, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    logits = rng.normal(size=(40, 6)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    for min_b, max_b, conf in [(3, 10, 0.3), (1, 40, 0.0), (12, 20, 0.99)]:
        ref = _reference_selection(boxes, probs, min_b, max_b, conf, 0.3)
        for method in ("loop", "vectorised"):
            ours, _ = select_regions(torch.from_numpy(boxes), torch.from_numpy(probs), min_b, max_b, conf, 0.3, method=method)
            assert ours.tolist() == ref.tolist(), method


def test_vectorised_selection_equals_the_per_class_loop():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(120, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(120, 2, generator=g) * 80], 1)
    probs = torch.softmax(torch.randn(120, 51, generator=g) * 3, 1)
    for thresh in (0.3, 0.5, 0.7):
        a, ca = select_regions(boxes, probs, 10, 100, 0.2, thresh, method="loop")
        b, cb = select_regions(boxes, probs, 10, 100, 0.2, thresh, method="vectorised")
        assert a.tolist() == b.tolist() and torch.equal(ca, cb)


# --------------------------------------------------------------------------- converters
def _save_torch(path, state, prefix=""):
    torch.save({"model": {prefix + k: v for k, v in state.items()}, "iteration": 7}, path)


def _outputs(model):
    images, sizes = _inputs([(140, 110)], seed=5)
    return RegionFeatureExtractor(model, 3, 8)(images, sizes)[0]


def test_vinvl_maskrcnn_checkpoint_round_trip(tmp_path, vinvl):
    cfg, source = vinvl
    anchors = converters.anchor_shape(cfg)
    ours = source.state_dict()
    mrcnn = converters.to_maskrcnn_state_dict(ours, anchors)
    # the released file's layout: maskrcnn-benchmark names, background first, ratio-major anchors
    assert "backbone.body.stem.bn1.running_var" in mrcnn and "backbone.body.layer3.0.downsample.1.weight" in mrcnn
    assert "roi_heads.box.feature_extractor.head.layer4.2.conv3.weight" in mrcnn
    assert "attribute.predictor.cls_embedding.weight" in mrcnn and "attribute.predictor.fc_attr.weight" in mrcnn
    assert mrcnn["roi_heads.box.predictor.cls_score.weight"].shape[0] == 21
    assert mrcnn["roi_heads.box.predictor.bbox_pred.weight"].shape[0] == 21 * 4
    mrcnn["rpn.anchor_generator.cell_anchors.0"] = torch.zeros(15, 4)
    for key in [k for k in mrcnn if k.startswith("roi_heads.box.feature_extractor.")]:  # AttrRCNN shares it
        mrcnn["attribute.feature_extractor." + key[len("roi_heads.box.feature_extractor."):]] = mrcnn[key]
    path = tmp_path / "vinvl_vg_x152c4.pth"
    _save_torch(path, mrcnn, prefix="module.")
    target = detectors.build_detector(cfg)
    layout, sha = converters.load_weights(target, str(path), anchors)
    assert layout == converters.LAYOUT_MASKRCNN and sha == converters.sha256_of(str(path))
    a, b = _outputs(source), _outputs(target)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4), key


def test_maskrcnn_anchor_and_background_order():
    """Independent check of two conventions: anchors ratio-major -> size-major, background first -> last."""
    sizes, ratios = 5, 3
    logits = torch.arange(sizes * ratios, dtype=torch.float32).reshape(-1, 1, 1, 1)  # row = r * S + s
    deltas = torch.arange(sizes * ratios * 4, dtype=torch.float32).reshape(-1, 1, 1, 1)
    state = {"rpn.head.cls_logits.weight": logits, "rpn.head.bbox_pred.weight": deltas,
             "roi_heads.box.predictor.cls_score.weight": torch.arange(4.0).reshape(4, 1)}
    out = converters.convert_state_dict(state, {"roi_heads.box_predictor.cls_score.weight": torch.zeros(4, 1)},
                                        converters.LAYOUT_MASKRCNN, anchors=(sizes, ratios))
    new_logits = out["proposal_generator.rpn_head.objectness_logits.weight"].flatten()
    new_deltas = out["proposal_generator.rpn_head.anchor_deltas.weight"].flatten()
    for s in range(sizes):
        for r in range(ratios):
            assert new_logits[s * ratios + r] == r * sizes + s
            for k in range(4):
                assert new_deltas[(s * ratios + r) * 4 + k] == (r * sizes + s) * 4 + k
    assert out["roi_heads.box_predictor.cls_score.weight"].flatten().tolist() == [1.0, 2.0, 3.0, 0.0]


def test_butd_py_bottom_up_attention_pkl(tmp_path, butd):
    """faster_rcnn_from_caffe_attr.pkl layout: pickled {"model": {detectron2 name: ndarray}}."""
    cfg, source = butd
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "caffe conversion"}, f, protocol=2)
    target = detectors.build_detector(cfg)
    layout, _ = converters.load_weights(target, str(path), converters.anchor_shape(cfg))
    assert layout == converters.LAYOUT_DETECTRON2
    a, b = _outputs(source), _outputs(target)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_butd_bottom_up_attention_pytorch_pth(tmp_path, butd):
    """bua-caffe-frcn-r101_with_attributes.pth layout: caffe class order (background first), bua attribute names."""
    cfg, source = butd
    state = dict(source.state_dict())
    for suffix in ("weight", "bias"):
        cls = state.pop(f"roi_heads.box_predictor.cls_score.{suffix}")
        state[f"roi_heads.box_predictor.cls_score.{suffix}"] = torch.cat([cls[-1:], cls[:-1]])
        box = state.pop(f"roi_heads.box_predictor.bbox_pred.{suffix}")
        state[f"roi_heads.box_predictor.bbox_pred.{suffix}"] = torch.cat([torch.zeros_like(box[:4]), box])
        state[f"roi_heads.box_predictor.attr_linear1.{suffix}"] = state.pop(f"roi_heads.attribute_predictor.fc.0.{suffix}")
        state[f"roi_heads.box_predictor.attr_linear2.{suffix}"] = state.pop(f"roi_heads.attribute_predictor.attr_score.{suffix}")
    embed = state.pop("roi_heads.attribute_predictor.obj_embed.weight")
    state["roi_heads.box_predictor.cls_embed.weight"] = torch.cat([embed[-1:], embed[:-1]])  # caffe order
    path = tmp_path / "bua-caffe-frcn-r101_with_attributes.pth"
    _save_torch(path, state)
    target = detectors.build_detector(cfg)
    converters.load_weights(target, str(path), converters.anchor_shape(cfg))
    a, b = _outputs(source), _outputs(target)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_attribute_head_without_no_attribute_column(tmp_path, butd):
    """detectron2 attribute heads trained with ignore_index have A outputs; the converter adds column 0."""
    cfg, source = butd
    state = dict(source.state_dict())
    state["roi_heads.attribute_predictor.attr_score.weight"] = state["roi_heads.attribute_predictor.attr_score.weight"][1:]
    state["roi_heads.attribute_predictor.attr_score.bias"] = state["roi_heads.attribute_predictor.attr_score.bias"][1:]
    _save_torch(tmp_path / "grid.pth", state)
    target = detectors.build_detector(cfg)
    converters.load_weights(target, str(tmp_path / "grid.pth"), converters.anchor_shape(cfg))
    out = _outputs(target)
    ref = _outputs(source)
    assert torch.all(out["attr_prob"][:, 0] < 1e-6)
    expected = torch.softmax(torch.log(ref["attr_prob"][:, 1:]), dim=1)  # the source's distribution without column 0
    assert torch.allclose(out["attr_prob"][:, 1:], expected, atol=1e-5)


def test_checkpoint_errors_name_the_key(tmp_path, butd):
    cfg, source = butd
    anchors = converters.anchor_shape(cfg)
    state = dict(source.state_dict())
    del state["roi_heads.res5.1.conv2.weight"]
    _save_torch(tmp_path / "missing.pth", state)
    with pytest.raises(converters.CheckpointError, match=r"roi_heads\.res5\.1\.conv2\.weight"):
        converters.load_weights(detectors.build_detector(cfg), str(tmp_path / "missing.pth"), anchors)
    state = dict(source.state_dict())
    state["backbone.stem.conv1.weight"] = torch.zeros(3, 3, 7, 7)
    _save_torch(tmp_path / "shape.pth", state)
    with pytest.raises(converters.CheckpointError, match=r"backbone\.stem\.conv1\.weight has shape \(3, 3, 7, 7\)"):
        converters.load_weights(detectors.build_detector(cfg), str(tmp_path / "shape.pth"), anchors)
    _save_torch(tmp_path / "other.pth", {"encoder.layer.0.weight": torch.zeros(2)})
    with pytest.raises(converters.CheckpointError, match="unknown checkpoint layout"):
        converters.load_weights(detectors.build_detector(cfg), str(tmp_path / "other.pth"), anchors)
    with pytest.raises(converters.CheckpointError, match="not found"):
        converters.resolve_weights(str(tmp_path / "absent.pth"))


# --------------------------------------------------------------------------- bad images
def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _huge_png(path, side=20000):
    """A valid 1-bit PNG of side x side pixels (tiny file, 400 M pixels)."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(1)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))


def make_bad_images(folder):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(os.path.join(folder, "good.jpg"))
    Image.fromarray(rgb).convert("CMYK").save(os.path.join(folder, "cmyk.jpg"))
    Image.fromarray(rgb).convert("L").save(os.path.join(folder, "grey.png"))
    Image.fromarray(rgb).convert("RGBA").save(os.path.join(folder, "alpha.png"))
    Image.fromarray(rgb).convert("P").save(os.path.join(folder, "palette.gif"))
    Image.new("RGB", (1, 1)).save(os.path.join(folder, "tiny.png"))
    Image.fromarray(rgb).save(os.path.join(folder, "whole.jpg"))
    raw = open(os.path.join(folder, "whole.jpg"), "rb").read()
    os.remove(os.path.join(folder, "whole.jpg"))
    open(os.path.join(folder, "truncated.jpg"), "wb").write(raw[: len(raw) // 2])
    open(os.path.join(folder, "corrupt.jpg"), "wb").write(rng.integers(0, 255, 3000, dtype=np.uint8).tobytes())
    open(os.path.join(folder, "text.png"), "w").write("this is a text file, not a picture\n")
    Image.new("RGB", (4000, 8)).save(os.path.join(folder, "sliver.png"))  # resized: 160 x 0.3 px
    _huge_png(os.path.join(folder, "huge.png"))
    return {"good", "cmyk", "grey", "alpha", "palette"}, {"tiny", "truncated", "corrupt", "text", "sliver", "huge"}


def test_load_image_reasons(tmp_path):
    ok, bad = make_bad_images(str(tmp_path))
    reasons = {}
    for name in sorted(os.listdir(tmp_path)):
        array, error = data.load_image(str(tmp_path / name))
        stem = os.path.splitext(name)[0]
        if stem in ok:
            assert error is None and array.shape[2] == 3 and array.dtype == np.uint8, (name, error)
        else:
            reasons[stem] = error
    assert "truncated" in reasons["truncated"]
    assert "1x1" in reasons["tiny"]
    assert "too large" in reasons["huge"] and "400000000 pixels" in reasons["huge"]
    assert "not an image" in reasons["corrupt"] and "not an image" in reasons["text"]
    assert reasons["sliver"] is None  # decodes; rejected later for its resized size


def test_bad_images_are_listed_and_the_run_goes_on(tmp_path, butd):
    _, model = butd
    ok, bad = make_bad_images(str(tmp_path / "images"))
    items = data.list_images(str(tmp_path / "images"))
    ex = RegionFeatureExtractor(model, 3, 6)
    out = str(tmp_path / "feats.lmdb")
    errors = runner.errors_path_for(out)
    with FeatureCacheWriter(out, detector="butd_r101", batch_size=4) as writer:
        summary = runner.run_extraction(ex, items, writer, batch_size=3, workers=0, min_size=96, max_size=160,
                                        errors_path=errors, progress=False)
    assert summary.written == len(ok) and len(summary.failed) == len(bad)
    with FeatureCacheReader(out) as reader:
        assert set(reader.keys()) == ok
    lines = open(errors).read().splitlines()
    assert lines[0] == "image_id\tpath\treason"
    listed = {line.split("\t")[0]: line.split("\t")[2] for line in lines[1:]}
    assert set(listed) == bad
    assert "aspect ratio" in listed["sliver"]


# --------------------------------------------------------------------------- cache output
def test_cache_records_header_and_training_reader(tmp_path, butd):
    cfg, model = butd
    ids = make_images(str(tmp_path / "images"), 5)
    items = data.list_images(str(tmp_path / "images"))
    ex = RegionFeatureExtractor(model, 3, 7)
    names = [f"object{i}" for i in range(20)]
    info = runner.build_info("butd_r101", cfg, ex, names, None, weights_layout="random")
    out = str(tmp_path / "feats.lmdb")
    with FeatureCacheWriter(out, detector="butd_r101", weights_sha256=converters.state_sha256(model), dtype="float16",
                            batch_size=2, feature_dim=TINY_FEATURE_DIM, info=info) as writer:
        summary = runner.run_extraction(ex, items, writer, batch_size=2, min_size=96, max_size=160, progress=False)
    assert summary.written == 5 and not summary.failed
    assert check_cache(out).ok
    with FeatureCacheReader(out) as reader:
        header = reader.header
        assert header["info"]["object_names"] == names and header["info"]["selection"]["min_boxes"] == 3
        assert header["num_keys"] == 5 and header["dtype"] == "float16"
        rec = reader.get(ids[0])
        assert rec["features"].dtype == np.float16 and rec["features"].shape[1] == TINY_FEATURE_DIM
        assert rec["attr_prob"].shape[1] == 11 and rec["objects"].dtype == np.int64
        tags = [header["info"]["object_names"][k] for k in rec["objects"]]
        assert all(t.startswith("object") for t in tags)

    # read back through the training dataset reader
    import mmf  # noqa: F401  (registers the plugin first, as mmf_run does)
    from omegaconf import OmegaConf

    from mmf_multilevel.datasets.base import RegionTextDataset

    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(f'{{"image_id": "{i}", "caption": "a picture"}}\n' for i in ids))

    class Captions(RegionTextDataset):
        def build_sample(self, record, sample):
            sample.caption = record["caption"]

    config = OmegaConf.create({"data_dir": str(tmp_path), "annotations": {"train": "ann.jsonl"},
                               "features": {"train": "feats.lmdb"}, "max_features": 10, "feature_dim": TINY_FEATURE_DIM})
    dataset = Captions("captions", config, "train")
    sample = dataset[0]
    assert sample.image_feature_0.shape == (10, TINY_FEATURE_DIM)
    n = int(sample.image_info_0.max_features)
    assert 3 <= n <= 7 and sample.image_info_0.bbox.shape == (10, 4)
    assert float(sample.image_feature_0[n:].abs().sum()) == 0.0


def test_mmf_compat_layout(tmp_path, butd):
    _, model = butd
    make_images(str(tmp_path / "images"), 2)
    items = data.list_images(str(tmp_path / "images"))
    out = str(tmp_path / "mmf.lmdb")
    with FeatureCacheWriter(out, detector="butd_r101", mmf_compat=True, batch_size=1) as writer:
        runner.run_extraction(RegionFeatureExtractor(model, 2, 4), items, writer, min_size=96, max_size=160,
                              progress=False, mmf_compat=True)
    with FeatureCacheReader(out) as reader:
        assert reader.layout == "mmf" and len(reader) == 2
        rec = reader.get("img000")
        assert set(rec) >= {"features", "boxes", "cls_prob", "objects"} and "attr_prob" not in rec


def test_writer_info_is_checked_and_merged_on_resume(tmp_path):
    path = str(tmp_path / "c.lmdb")
    rec = {"features": np.ones((2, 4), np.float32), "boxes": np.array([[0, 0, 1, 1], [0, 0, 2, 2]], np.float32),
           "image_w": 5, "image_h": 5}
    with FeatureCacheWriter(path, detector="d", info={"model": "m", "thresh": (0.2, 0.3)}) as w:
        w.write("a", rec)
    with FeatureCacheReader(path) as r:
        assert r.header["info"] == {"model": "m", "thresh": [0.2, 0.3]}
    with FeatureCacheWriter(path, detector="d", info={"model": "m", "names": ["x"]}) as w:
        assert not w.write("a", rec)
        w.write("b", rec)
    with FeatureCacheReader(path) as r:
        assert r.header["info"] == {"model": "m", "thresh": [0.2, 0.3], "names": ["x"]}
    with pytest.raises(HeaderMismatchError, match=r"info\['model'\]"):
        FeatureCacheWriter(path, detector="d", info={"model": "other"})
    with FeatureCacheWriter(path, detector="d") as w:  # no info given: the stored one is kept
        assert w.info["model"] == "m"
    with pytest.raises(ValueError, match="JSON"):
        FeatureCacheWriter(str(tmp_path / "x.lmdb"), detector="d", info={"bad": object()})


def test_image_list_and_shards(tmp_path):
    make_images(str(tmp_path / "imgs" / "sub"), 3)
    items = data.list_images(str(tmp_path / "imgs"))
    assert [i for i, _ in items] == ["sub/img000", "sub/img001", "sub/img002"]
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nimgs/sub/img000.jpg\nx7\timgs/sub/img001.jpg\n\n")
    assert [i for i, _ in data.list_images(image_list=str(lst))] == ["img000", "x7"]
    lst.write_text("imgs/sub/img000.jpg\nimg000\timgs/sub/img001.jpg\n")
    with pytest.raises(data.ImageListError, match="given twice"):
        data.list_images(image_list=str(lst))
    shards = [data.shard_items(list(range(10)), i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert data.resized_size(1000, 500, 600, 1000) == (1000, 500)
    assert data.resized_size(400, 300, 600, 1000) == (800, 600)


def test_compat_patches_switch_themselves():
    from mmf_multilevel.compat import detectron2 as compat

    status = compat.apply()
    import detectron2
    from PIL import Image

    assert hasattr(Image, "LINEAR")
    real_ext = status["extension_stub"] == "not needed"
    if not real_ext:
        with pytest.raises(compat.MissingDetectron2Extension, match="nms_rotated"):
            detectron2._C.nms_rotated
    assert set(compat.status()) == {"extension_stub", "pil_linear"}
