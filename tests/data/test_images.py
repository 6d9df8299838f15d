"""Raw-image inputs: folder / zip / LMDB sources, the LMDB builder, decoding of awkward images,
the image_transform processor (shapes, normalisation, presets, flip + left/right swap,
determinism) and the raw-image caption datasets built through MMF."""
import io
import json
import os
import pickle
import shutil
import zipfile

import mmf  # noqa: F401  (applies the compatibility layer, registers our components)
import numpy as np
import pytest
import torch
from mmf.common.registry import registry
from mmf.common.sample import SampleList
from omegaconf import OmegaConf
from PIL import Image

from mmf_multilevel import images as I
from mmf_multilevel.datasets import images as D
from mmf_multilevel.datasets.generate import COLORS, generate
from mmf_multilevel.images.__main__ import main as images_main
from mmf_multilevel.processors import images as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs", "datasets", "captions_images")
NAMES = ("captions_images", "coco_captions_images", "vg_captions_images", "conceptual_captions_images", "sbu_captions_images")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    out = root / "demo"
    generate(out, num_images=60, feature_dim=8, progress=False)
    zip_path = root / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name in sorted(os.listdir(out / "images")):
            archive.write(out / "images" / name, f"images/{name}")
    I.build_image_lmdb(out / "images", root / "images.lmdb", batch_size=16, progress=False)
    return {"root": root, "data": out, "folder": out / "images", "zip": zip_path, "lmdb": root / "images.lmdb"}


def _ids(demo):
    return sorted(n[:-4] for n in os.listdir(demo["folder"]))


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- sources
@pytest.mark.parametrize("kind", ["folder", "zip", "lmdb"])
def test_source_round_trips_generated_images(demo, kind):
    source = I.open_image_source(demo[kind])
    assert source.kind == {"folder": "folder", "zip": "zip", "lmdb": "LMDB"}[kind]
    ids = _ids(demo)
    assert sorted(source.keys()) == ids and len(source) == 60
    for image_id in ids[::7]:
        with Image.open(demo["folder"] / f"{image_id}.jpg") as reference:
            expected = np.asarray(reference.convert("RGB"))
        image = source.get(image_id)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)
        assert source.get_bytes(image_id) == (demo["folder"] / f"{image_id}.jpg").read_bytes()
        assert image_id in source and f"{image_id}.jpg" in source
        assert source.get_bytes(f"{image_id}.jpg") == source.get_bytes(image_id)  # with its extension too
    if kind == "zip":  # ids are relative to the zip's single top folder; full member names work as well
        assert source.prefix == "images/" and source.get_bytes(f"images/{ids[0]}") == source.get_bytes(ids[0])
    assert "demo_999999" not in source
    with pytest.raises(I.MissingImageError) as info:
        source.get("demo_999999")
    assert "demo_999999" in str(info.value) and str(demo[kind]) in str(info.value)
    # picklable without its handle (DataLoader workers with spawn), and still works after
    clone = pickle.loads(pickle.dumps(source))
    assert clone._handle is None and np.array_equal(np.asarray(clone.get(ids[0])), np.asarray(source.get(ids[0])))


def test_folder_and_zip_ids_with_extension_subfolders_and_order(tmp_path):
    red, blue = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
    (tmp_path / "imgs" / "train2014").mkdir(parents=True)
    red.save(tmp_path / "imgs" / "train2014" / "a.jpg", quality=95)
    blue.save(tmp_path / "imgs" / "train2014" / "a.png")
    blue.save(tmp_path / "imgs" / "b.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    zip_path = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:  # no common top folder: ids are full member paths
        for rel in ("train2014/a.jpg", "train2014/a.png", "b.png", "notes.txt"):
            archive.write(tmp_path / "imgs" / rel, rel)
    for path in (tmp_path / "imgs", zip_path):
        for order, colour in (([".jpg", ".png"], 0), ([".png", ".jpg"], 2)):
            source = I.open_image_source(path, extensions=order)
            assert sorted(source.keys()) == ["b", "train2014/a"]
            # an id without extension takes the first configured extension; with one, exactly that file
            assert np.asarray(source.get("train2014/a"))[0, 0].argmax() == colour
            assert np.asarray(source.get("train2014/a.png"))[0, 0].argmax() == 2
            assert "notes" not in source and "train2014/a.gif" not in source
    # zip errors name the file; a folder source refuses ids that leave the folder
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises((I.ImageSourceError, FileNotFoundError)):
        I.open_image_source(tmp_path / "bad.zip")
    assert "../imgs/b" not in I.open_image_source(tmp_path / "imgs" / "train2014")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        I.open_image_source(tmp_path / "nowhere")


def test_lmdb_builder_resumes_after_interruption(demo, tmp_path):
    ids = _ids(demo)
    source = I.open_image_source(demo["folder"])
    calls = {"n": 0}
    original = source.get_bytes

    def dying(image_id):
        calls["n"] += 1
        if calls["n"] == 27:
            raise KeyboardInterrupt  # as a kill in the middle of the third batch
        return original(image_id)

    source.get_bytes = dying
    out = tmp_path / "part.lmdb"
    with pytest.raises(KeyboardInterrupt):
        I.build_image_lmdb(source, out, batch_size=10, progress=False)
    partial = I.open_image_source(out)
    assert sorted(partial.keys()) == ids[:20] and partial.header["count"] == 20  # whole batches only
    partial.close()
    summary = I.build_image_lmdb(demo["folder"], out, batch_size=10, progress=False)
    assert summary == {"written": 40, "skipped_existing": 20, "bad": 0, "total": 60}
    done = I.open_image_source(out)
    assert sorted(done.keys()) == ids and len(done) == 60 and done.header["count"] == 60
    for image_id in ids:
        assert done.get_bytes(image_id) == (demo["folder"] / f"{image_id}.jpg").read_bytes()
    # a rerun of a complete LMDB writes nothing
    assert I.build_image_lmdb(demo["folder"], out, batch_size=10, progress=False)["written"] == 0


def test_lmdb_builder_lists_bad_images_and_cli(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (10, 10), (1, 2, 3)).save(folder / "good.jpg")
    good = (folder / "good.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG at all" * 3)
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out.lmdb"
    assert images_main(["build-lmdb", str(folder), str(out), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "1 written" in printed and "2 bad of 3" in printed and "bad_images.jsonl" in printed
    listed = {json.loads(line)["image_id"]: json.loads(line)["error"] for line in (out / "bad_images.jsonl").read_text().splitlines()}
    assert set(listed) == {"corrupt", "truncated"}
    assert "truncated" in listed["truncated"] and "corrupt.jpg" in listed["corrupt"]
    assert sorted(I.open_image_source(out).keys()) == ["good"]
    with pytest.raises(I.ImageDecodeError, match="corrupt"):
        I.build_image_lmdb(folder, tmp_path / "strict.lmdb", on_error="raise", progress=False)
    # check and info
    assert images_main(["check", str(folder), "--quiet"]) == 1
    assert {json.loads(line)["image_id"] for line in capsys.readouterr().out.splitlines()} == {"corrupt", "truncated"}
    assert images_main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "LMDB" and info["images"] == 1 and info["header"]["num_bad"] == 2
    # a non-empty folder that is not an LMDB is never written into
    assert images_main(["build-lmdb", str(out), str(folder), "--quiet"]) == 2
    assert "not an image LMDB" in capsys.readouterr().err


# --------------------------------------------------------------------------- decoding
def test_decoding_awkward_images(tmp_path):
    where = "x.jpg: image 'x'"
    with pytest.raises(I.ImageDecodeError, match=r"x\.jpg: image 'x': not an image file"):
        I.decode_image(b"\x00\x01garbage" * 10, where)
    with pytest.raises(I.ImageDecodeError, match="empty file"):
        I.decode_image(b"", where)
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG")
    with pytest.raises(I.ImageDecodeError, match=r"x\.jpg: image 'x': truncated"):
        I.decode_image(buffer.getvalue()[:800], where)
    # CMYK JPEG -> RGB of the same colour
    cmyk = Image.new("RGB", (16, 16), (200, 40, 30)).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=100)
    rgb = I.decode_image(buffer.getvalue(), where)
    assert rgb.mode == "RGB" and np.abs(np.asarray(rgb).astype(int) - [200, 40, 30]).max() <= 6
    # greyscale, 16-bit greyscale, bilevel
    grey = I.decode_image(_png(Image.new("L", (5, 4), 77)), where)
    assert grey.mode == "RGB" and grey.size == (5, 4) and (np.asarray(grey) == 77).all()
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert (np.asarray(I.decode_image(_png(deep), where)) == 255).all()
    half = Image.fromarray(np.full((3, 3), 32768, dtype=np.uint16))
    assert (np.asarray(I.decode_image(_png(half), where)) == 128).all()
    assert (np.asarray(I.decode_image(_png(Image.new("1", (4, 4), 1)), where)) == 255).all()
    # alpha: dropped by default (as the region extractor), or composited on a colour
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (np.asarray(I.decode_image(_png(rgba), where)) == [10, 20, 30]).all()
    assert (np.asarray(I.decode_image(_png(rgba), where, alpha_background=(255, 255, 255))) == 255).all()
    half_alpha = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert np.abs(np.asarray(I.decode_image(_png(half_alpha), where, alpha_background=(255, 255, 255))).astype(int) - 127).max() <= 1
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0, 9, 9, 9, 50, 60, 70, 90, 80, 70] + [0] * 756)
    assert (np.asarray(I.decode_image(_png(palette), where)) == [90, 80, 70]).all()
    palette.info["transparency"] = 3
    assert (np.asarray(I.decode_image(_png(palette), where, alpha_background=(0, 255, 0))) == [0, 255, 0]).all()
    # 1x1: decodes (and transforms) by default; a minimum side makes it an error naming its size
    tiny = _png(Image.new("RGB", (1, 1), (5, 6, 7)))
    assert I.decode_image(tiny, where).size == (1, 1)
    with pytest.raises(I.ImageDecodeError, match="1x1 px"):
        I.decode_image(tiny, where, min_side=2)
    processor = P.ImageTransformProcessor({"preset": "simla_pretrain"})
    for train in (True, False):
        assert processor({"image": I.decode_image(tiny, where), "train": train})["image"].shape == (3, 256, 256)
    # EXIF orientation is applied (as the region extractor does), unless switched off
    upright = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = upright.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    upright.save(buffer, format="JPEG", exif=exif.tobytes())
    assert I.decode_image(buffer.getvalue(), where).size == (10, 30)
    assert I.decode_image(buffer.getvalue(), where, exif_transpose=False).size == (30, 10)


def test_source_errors_name_file_and_id(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    zip_path = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.write(folder / "broken.png", "broken.png")
    I.build_image_lmdb(folder, tmp_path / "all.lmdb", verify=False, progress=False)
    for path, named in ((folder, str(folder / "broken.png")), (zip_path, f"{zip_path}:broken.png"), (tmp_path / "all.lmdb", str(tmp_path / "all.lmdb"))):
        with pytest.raises(I.ImageDecodeError) as info:
            I.open_image_source(path).get("broken")
        assert named in str(info.value) and "'broken'" in str(info.value)


# --------------------------------------------------------------------------- transforms
def test_presets_match_the_specs():
    simla = P.resolve_image_config({"preset": "simla_pretrain"})
    assert simla["train"]["size"] == 256 and simla["train"]["scale"] == [0.2, 1.0] and simla["train"]["hflip"] == 0.5
    assert simla["mean"] == list(P.CLIP_MEAN) and simla["std"] == list(P.CLIP_STD)
    train, evaluation = P.build_pipelines({"preset": "simla_pretrain"})
    steps = train.randaugment.transforms
    assert len(steps) == 2 and all(isinstance(s, torch.nn.Module) and s.p == 0.5 for s in steps)
    augment = steps[0].transforms[0]
    assert set(augment._AUGMENTATION_SPACE) == set(P.ALBEF_OPS)
    assert not {"Color", "Contrast", "Posterize", "Solarize"} & set(augment._AUGMENTATION_SPACE)
    assert augment.magnitude == 7 and augment.num_magnitude_bins == 11 and augment.num_ops == 1
    # ALBEF: translation up to 10 px at magnitude 10, i.e. 7 px at 7; torchvision's own table is untouched
    assert float(augment._AUGMENTATION_SPACE["TranslateX"][0](11, 256, 256)[7]) == pytest.approx(7.0)
    assert float(P.v2.RandAugment._AUGMENTATION_SPACE["TranslateX"][0](11, 256, 256)[7]) > 50
    assert tuple(train.geometry.size) == (256, 256) and tuple(train.geometry.scale) == (0.2, 1.0)
    assert list(evaluation.geometry.size) == [256, 256] and evaluation.hflip == 0.0 and evaluation.randaugment is None
    fine = P.resolve_image_config({"preset": "simla_finetune"})
    assert fine["train"]["size"] == 384 and fine["eval"]["size"] == [384, 384]
    soho = P.resolve_image_config({"preset": "soho"})
    assert soho["train"]["size"] == 600 and soho["train"]["max_size"] == 1000 and soho["mean"] == list(P.IMAGENET_MEAN)
    # overrides: one key of a preset, a nested randaugment key, no RandAugment at all
    over = P.resolve_image_config({"preset": "simla_pretrain", "train": {"size": 224, "randaugment": {"magnitude": 9}}})
    assert over["train"]["size"] == 224 and over["train"]["randaugment"]["magnitude"] == 9
    assert over["train"]["randaugment"]["num_ops"] == 2
    assert P.build_pipelines({"train": {"randaugment": None}})[0].randaugment is None


@pytest.mark.parametrize("params, match", [
    ({"preset": "albef_huge"}, "unknown preset"),
    ({"train": {"sise": 3}}, r"image_transform\.train: unknown key\(s\) \['sise'\]"),
    ({"train": {"randaugment": {"ops": ["Solarise"]}}}, "unknown op"),
    ({"train": {"randaugment": {"magnitude": 11, "num_magnitude_bins": 11}}}, "magnitude must be in"),
    ({"train": {"hflip": 2}}, "hflip must be a probability"),
    ({"train": {"scale": [0.9, 0.1]}}, r"train\.scale"),
    ({"eval": {"crop": "random_resized"}}, "training crop"),
    ({"eval": {"interpolation": "cubic"}}, "unknown interpolation"),
    ({"mean": [0.5, 0.5]}, "mean/std"),
])
def test_bad_transform_settings_are_named(params, match):
    with pytest.raises(P.ImageTransformConfigError, match=match):
        P.ImageTransformProcessor(params)


def test_shapes_dtype_and_normalisation():
    colour = (200, 100, 50)
    image = Image.new("RGB", (320, 240), colour)
    for preset, size in (("simla_pretrain", 256), ("simla_finetune", 384), ("default", 224)):
        processor = P.ImageTransformProcessor({"preset": preset, "train": {"randaugment": None}})
        config = processor.config
        expected = (torch.tensor(colour) / 255.0 - torch.tensor(config["mean"])) / torch.tensor(config["std"])
        for train in (True, False):
            out = processor({"image": image, "train": train})
            assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.float32
            assert type(out["image"]) is torch.Tensor and out["image_size"].tolist() == [size, size]
            # a uniform picture stays uniform through crop/resize/flip: exactly the normalised colour
            torch.testing.assert_close(out["image"].mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
            assert out["image"].std(dim=(1, 2)).max() < 1e-4
    # SOHO: shorter side 600, longer at most 1000, padded (zeros) to the canvas; image_size = content
    soho = P.ImageTransformProcessor({"preset": "soho"})
    for (w, h), (ch, cw) in (((320, 240), (600, 800)), ((240, 320), (800, 600)), ((1200, 400), (333, 1000))):
        out = soho({"image": Image.new("RGB", (w, h), colour), "train": False})
        assert out["image"].shape == (3, 1000, 1000) and out["image_size"].tolist() == [ch, cw]
        assert out["image"][:, ch:, :].abs().sum() == 0 and out["image"][:, :, cw:].abs().sum() == 0
        assert out["image"][:, :ch, :cw].flatten(1).std(dim=1).max() < 1e-4
    # on a real picture: the same numbers as torchvision's ToDtype(scale=True) + Normalize after the same resize
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    plain = P.ImageTransformProcessor({"preset": "simla_finetune"})
    reference = P.v2.Compose([P.v2.Resize([384, 384], interpolation=P.InterpolationMode.BICUBIC), P.v2.PILToTensor(),
                              P.v2.ToDtype(torch.float32, scale=True), P.v2.Normalize(list(P.CLIP_MEAN), list(P.CLIP_STD))])
    torch.testing.assert_close(plain({"image": picture, "train": False})["image"], reference(picture).as_subclass(torch.Tensor),
                               atol=2e-6, rtol=0)
    unpadded = P.ImageTransformProcessor({"preset": "soho", "eval": {"pad_to": None}})
    assert unpadded({"image": Image.new("RGB", (320, 240)), "train": False})["image"].shape == (3, 600, 800)


def test_randaugment_changes_pixels_and_is_deterministic_under_a_seed(demo):
    image = I.open_image_source(demo["folder"]).get("demo_000004")
    processor = P.ImageTransformProcessor({"preset": "simla_pretrain"})

    def run(seed):
        torch.manual_seed(seed)
        return [processor({"image": image, "train": True}) for _ in range(4)]

    a, b, c = run(11), run(11), run(12)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and x["flipped"] == y["flipped"]
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(a, c))
    # eval is deterministic whatever the seed
    torch.manual_seed(1)
    first = processor({"image": image, "train": False})["image"]
    torch.manual_seed(2)
    assert torch.equal(first, processor({"image": image, "train": False})["image"])
    # the flip rate follows hflip
    torch.manual_seed(0)
    flips = [processor({"image": Image.new("RGB", (8, 8)), "train": True})["flipped"] for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_swap_left_right_words():
    cases = {
        "a dog on the left of a cat": "a dog on the right of a cat",
        "Left and RIGHT, left-hand and Right.": "Right and LEFT, right-hand and Left.",
        "the leftmost cup, moving rightward(s)": "the rightmost cup, moving leftward(s)",
        "bright leftover copyright alright left_side": "bright leftover copyright alright left_side",
        "to the left, to the right, to the left": "to the right, to the left, to the right",
        "": "",
    }
    for text, expected in cases.items():
        assert P.swap_left_right(text) == expected
        assert P.swap_left_right(P.swap_left_right(text)) == text
    swap = P.LeftRightSwapProcessor({})
    assert swap({"text": "left", "flipped": True})["text"] == "right"
    assert swap({"text": "left", "flipped": False})["text"] == "left"
    assert swap({"text": ["left", "right"], "flipped": True})["text"] == ["right", "left"]
    assert P.LeftRightSwapProcessor({"enabled": False})({"text": "left", "flipped": True})["text"] == "left"
    with pytest.raises(TypeError):
        P.swap_left_right(None)


def _shape_on_the_left(demo):
    """(image_id, colour, box) of a generated image with a shape wholly in the left third."""
    from mmf_multilevel.features import FeatureCacheReader

    reader = FeatureCacheReader(str(demo["data"] / "features" / "regions.lmdb"))
    colours = list(COLORS)
    for image_id in _ids(demo):
        record = reader.get(image_id)
        for box, attr in zip(record["boxes"], record["attrs"]):
            x1, y1, x2, y2 = box
            if x2 < record["image_w"] / 3 and x2 - x1 > 40:
                return image_id, COLORS[colours[int(attr)]], (x1, y1, x2, y2), record["image_w"], record["image_h"]
    raise AssertionError("no generated image with a shape on the left")


def _colour_at(tensor, mean, std, x, y):
    pixel = tensor[:, int(y), int(x)] * torch.tensor(std) + torch.tensor(mean)
    return (pixel * 255).round().tolist()


def test_flip_moves_the_shape_and_swaps_the_caption(demo, tmp_path):
    image_id, colour, (x1, y1, x2, y2), width, height = _shape_on_the_left(demo)
    image = I.open_image_source(demo["folder"]).get(image_id)
    params = {"preset": "simla_pretrain", "train": {"crop": "resize", "size": [height, width], "hflip": 1.0, "randaugment": None}}
    processor = P.ImageTransformProcessor(params)
    out = processor({"image": image, "train": True})
    assert out["flipped"] is True
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    mean, std = processor.config["mean"], processor.config["std"]
    mirrored = _colour_at(out["image"], mean, std, width - 1 - cx, cy)
    original_place = _colour_at(out["image"], mean, std, cx, cy)
    assert np.abs(np.subtract(mirrored, colour)).max() < 40  # the shape is now on the right
    assert np.abs(np.subtract(original_place, colour)).max() > 40
    # through the dataset: the caption's "left" became "right" exactly when the image was flipped
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "captions_train.jsonl").write_text(json.dumps({"image_id": image_id, "caption": "a shape on the Left side"}) + "\n")
    for hflip, swap, expected in ((1.0, True, "a shape on the Right side"), (1.0, False, "a shape on the Left side"),
                                  (0.0, True, "a shape on the Left side")):
        dataset = make_dataset(
            "coco_captions_images", demo, demo["folder"], data_dir=tmp_path, itm_probability=0.0, swap_left_right=swap,
            image_params=dict(params, train=dict(params["train"], hflip=hflip)),
        )
        sample = dataset[0]
        assert sample.caption == expected and bool(sample.image_flipped) == (hflip == 1.0)
        if hflip:
            assert np.abs(np.subtract(_colour_at(sample.image, mean, std, width - 1 - cx, cy), colour)).max() < 40


# --------------------------------------------------------------------------- datasets
def dataset_config(name, demo, images, data_dir=None, image_params=None, **overrides):
    config = OmegaConf.load(os.path.join(CONFIGS, f"{name}.yaml")).dataset_config[name]
    config.data_dir = str(data_dir or demo["data"])
    config.images = {"train": str(images), "val": str(images), "test": str(images)}
    config.processors.text_processor.params.tokenizer_config.type = str(demo["data"] / "vocab")
    config.processors.text_processor.params.max_seq_length = 20
    if image_params is not None:
        config.processors.image_processor.params = OmegaConf.create(image_params)
    else:
        config.processors.image_processor.params.train = {"size": 64}
        config.processors.image_processor.params.eval = {"size": [64, 64]}
    for dotted, value in overrides.items():
        OmegaConf.update(config, dotted, value, merge=False)
    return config


def make_dataset(name, demo, images, split="train", **kwargs):
    config = dataset_config(name, demo, images, **kwargs)
    for key in config.processors:  # MMF reuses a dataset's registered processors; build them anew
        registry.unregister(f"{name}_{key}")
    dataset = D.ImageCaptionDataset(name, config, split)
    dataset.init_processors()
    return dataset


def test_every_builder_is_registered_with_its_config(demo):
    for name in NAMES:
        builder_class = registry.get_builder_class(name)
        assert builder_class is not None, name
        path = builder_class.config_path()
        assert os.path.isfile(path) and os.path.basename(path) == f"{name}.yaml"
        config = OmegaConf.load(path).dataset_config[name]
        assert "images" in config and "features" not in config
        assert config.processors.image_processor.type == "image_transform"
        # the text side mirrors the region corpus of the same name
        region = OmegaConf.load(os.path.join(ROOT, "configs", "datasets", "captions", f"{name[:-7]}.yaml"))
        region = region.dataset_config[name[:-7]]
        assert OmegaConf.to_container(config.annotations) == OmegaConf.to_container(region.annotations)
        assert OmegaConf.to_container(config.processors.text_processor) == OmegaConf.to_container(region.processors.text_processor)
        raw = OmegaConf.to_container(config, resolve=False), OmegaConf.to_container(region, resolve=False)
        assert raw[0]["data_dir"] == raw[1]["data_dir"]


@pytest.mark.parametrize("kind", ["folder", "zip", "lmdb"])
def test_builder_gives_batches_through_mmf(demo, kind):
    name = "coco_captions_images"
    config = dataset_config(name, demo, demo[kind])
    for key in config.processors:
        registry.unregister(f"{name}_{key}")
    builder = registry.get_builder_class(name)()
    dataset = builder.load(config, "train")
    dataset.init_processors()
    assert len(dataset) == len((demo["data"] / "annotations" / "captions_train.jsonl").read_text().splitlines())
    batch = SampleList([dataset[i] for i in range(4)])
    assert batch.image.shape == (4, 3, 64, 64) and batch.image.dtype == torch.float32
    assert batch.image_size.tolist() == [[64, 64]] * 4 and batch.image_flipped.dtype == torch.bool
    for field in ("input_ids", "input_mask", "segment_ids", "lm_label_ids"):
        assert batch[field].shape == (4, 20)
    assert batch.is_correct.shape == (4,) and len(batch.caption) == 4 and len(batch.image_id) == 4
    assert batch.id.tolist() == [0, 1, 2, 3]
    # the same text fields as the region-feature CaptionDataset produces
    from mmf_multilevel.datasets.captions import CaptionDataset

    region = OmegaConf.load(os.path.join(ROOT, "configs", "datasets", "captions", "coco_captions.yaml"))
    region = region.dataset_config.coco_captions
    region.data_dir, region.feature_dim, region.max_features = str(demo["data"]), 8, 6
    region.processors.text_processor = config.processors.text_processor
    registry.unregister("coco_captions_text_processor")
    region_dataset = CaptionDataset("coco_captions", region, "train")
    region_dataset.init_processors()
    region_fields = set(region_dataset[0]) - {"image_feature_0", "image_info_0"}
    assert region_fields <= set(dataset[0]) and set(dataset[0]) - region_fields - {"image_id"} == {"image", "image_size", "image_flipped"}


def test_val_split_uses_the_eval_pipeline(demo):
    dataset = make_dataset("coco_captions_images", demo, demo["lmdb"], split="val", image_params={"preset": "simla_pretrain"})
    assert not dataset.augment
    torch.manual_seed(0)
    first = dataset[0]
    torch.manual_seed(1)
    second = dataset[0]
    assert first.image.shape == (3, 256, 256) and torch.equal(first.image, second.image) and not bool(first.image_flipped)


def test_missing_and_bad_images(demo, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(demo["folder"], folder)
    ids = _ids(demo)
    os.remove(folder / f"{ids[0]}.jpg")
    with pytest.raises(I.MissingImageError) as info:
        make_dataset("coco_captions_images", demo, folder)
    text = str(info.value)
    assert f"'{ids[0]}'" in text and "skip_missing_images" in text and str(folder) in text
    with pytest.warns(UserWarning, match="dropped their 2 of"):
        dataset = make_dataset("coco_captions_images", demo, folder, skip_missing_images=True)
    assert dataset.num_dropped == 2 and all(r["image_id"] != ids[0] for r in dataset.records)
    # an image that breaks after the check: an error naming it, or (replace) the next sample, counted
    victim = dataset.records[0]["image_id"]
    (folder / f"{victim}.jpg").write_bytes(b"garbage" * 20)
    with pytest.raises(I.ImageDecodeError, match=victim):
        dataset[0]
    with pytest.warns(UserWarning, match="dropped their 2 of"):
        replacing = make_dataset("coco_captions_images", demo, folder, skip_missing_images=True, bad_images="replace")
    with pytest.warns(UserWarning, match=victim):
        sample = replacing[0]
    assert sample.image_id != victim and replacing.num_bad_images >= 1
    with pytest.raises(ValueError, match="bad_images"):
        make_dataset("coco_captions_images", demo, folder, bad_images="ignore")
    # unchecked: a missing image surfaces when loaded, named, or is replaced like an undecodable one
    unchecked = make_dataset("coco_captions_images", demo, folder, check_images=False)
    first = next(i for i, r in enumerate(unchecked.records) if r["image_id"] == ids[0])
    with pytest.raises(I.MissingImageError, match=ids[0]):
        unchecked[first]
    unchecked.bad_images = "replace"
    with pytest.warns(UserWarning, match=ids[0]):
        assert unchecked[first].image_id != ids[0]
    with pytest.raises(FileNotFoundError, match="images.train"):
        make_dataset("coco_captions_images", demo, tmp_path / "absent")


class PairDataset(D.RawImageMixin, mmf.datasets.base_dataset.BaseDataset):
    """What a two-image task (NLVR2) does with the mixin: two fields, independent augmentation."""

    def __init__(self, config, records):
        super().__init__("pair_images", config, "train")
        self.init_images(config, "train")
        self.records = self.check_images(records, "pairs")

    def image_ids_of(self, record):
        return [record["left"], record["right"]]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.get_with_replacement(index, self._build)

    def _build(self, index):
        from mmf.common.sample import Sample

        record, sample = self.records[index], Sample()
        flips = [self.image_fields(record[side], sample, field=f"image_{i}") for i, side in enumerate(("left", "right"))]
        sample.text = self.text_for_image(record["text"], flips[0] and flips[1])
        return sample


def test_the_mixin_serves_a_two_image_task(demo):
    ids = _ids(demo)
    config = OmegaConf.create({"data_dir": str(demo["root"]), "images": {"train": "images.lmdb"},
                               "processors": {"image_processor": {"type": "image_transform",
                                                                  "params": {"train": {"size": 32, "hflip": 0.5}}}}})
    records = [{"left": ids[i], "right": ids[i + 1], "text": "the left image has more shapes"} for i in range(0, 20, 2)]
    records.append({"left": ids[0], "right": "demo_missing", "text": "x"})
    with pytest.raises(I.MissingImageError, match="demo_missing"):
        PairDataset(config, records)
    config.skip_missing_images = True
    registry.unregister("pair_images_image_processor")
    with pytest.warns(UserWarning, match="dropped their 1 of 11 records"):
        dataset = PairDataset(config, records)
    dataset.init_processors()
    torch.manual_seed(0)
    batch = SampleList([dataset[i] for i in range(len(dataset))])
    assert batch.image_0.shape == batch.image_1.shape == (10, 3, 32, 32) and dataset.num_dropped == 1
    # each image of a pair draws its own flip
    assert (batch.image_0_flipped != batch.image_1_flipped).any()


def test_collate_images_pads_to_the_batch_maximum(demo):
    dataset = make_dataset("coco_captions_images", demo, demo["zip"], split="val",
                           image_params={"preset": "soho", "eval": {"size": 60, "max_size": 100, "pad_to": None}})
    samples = [dataset[i] for i in range(6)]
    sizes = [tuple(s.image.shape[-2:]) for s in samples]
    assert len(set(sizes)) > 1 and all(tuple(s.image_size.tolist()) == size for s, size in zip(samples, sizes))
    originals = [s.image.clone() for s in samples]
    batch = D.collate_images(samples, "coco_captions_images", "val", size_divisor=64)
    height, width = batch.image.shape[-2:]
    assert height % 64 == 0 and width % 64 == 0 and height >= max(h for h, _ in sizes) and width >= max(w for _, w in sizes)
    for i, (h, w) in enumerate(sizes):
        assert torch.equal(batch.image[i, :, :h, :w], originals[i])
        assert batch.image[i, :, h:, :].abs().sum() == 0 and batch.image[i, :, :, w:].abs().sum() == 0
    assert batch.image_size.tolist() == [list(s) for s in sizes] and batch.dataset_type == "val"


def test_collate_images_pads_nested_image_fields():
    """NLVR2's pair layout (img0.image / img1.image, each with its image_size) batches with images of
    different sizes: each side padded to its own batch maximum."""
    from mmf.common.sample import Sample

    shapes = [((40, 60), (50, 30)), ((48, 52), (36, 70))]
    samples = []
    for left, right in shapes:
        sample = Sample()
        for side, (h, w) in zip(("img0", "img1"), (left, right)):
            sample[side] = Sample({"image": torch.ones(3, h, w), "image_size": torch.tensor([h, w])})
        sample.targets = torch.tensor(1)
        samples.append(sample)
    batch = D.collate_images(samples, "nlvr2_images", "train")
    assert batch.img0.image.shape == (2, 3, 48, 60) and batch.img1.image.shape == (2, 3, 50, 70)
    for i, (left, right) in enumerate(shapes):
        for side, (h, w) in zip(("img0", "img1"), (left, right)):
            image = batch[side].image[i]
            assert image[:, :h, :w].eq(1).all() and image.sum() == 3 * h * w
    assert batch.img1.image_size.tolist() == [[50, 30], [36, 70]]


@pytest.mark.slow
def test_lmdb_builder_survives_kill_9(demo, tmp_path):
    """SIGKILL in the middle of a batch (from inside the process: deterministic), then a rerun: every image once."""
    import subprocess
    import sys

    out = tmp_path / "killed.lmdb"
    script = f"""
import os, signal
from mmf_multilevel import images as I
source = I.open_image_source({str(demo["folder"])!r})
original, calls = source.get_bytes, [0]
def dying(image_id):
    calls[0] += 1
    if calls[0] == 35:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(image_id)
source.get_bytes = dying
I.build_image_lmdb(source, {str(out)!r}, batch_size=8, progress=False)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    ids = _ids(demo)
    partial = I.open_image_source(out)
    assert sorted(partial.keys()) == ids[:32] and partial.header["count"] == 32
    partial.close()
    assert images_main(["build-lmdb", str(demo["folder"]), str(out), "--quiet", "--batch-size", "8"]) == 0
    done = I.open_image_source(out)
    assert sorted(done.keys()) == ids and done.header["count"] == 60
    assert all(done.get_bytes(i) == (demo["folder"] / f"{i}.jpg").read_bytes() for i in ids)


def test_every_raw_image_yaml_lists_the_image_keys_with_the_mixins_defaults():
    """IMAGE_DEFAULTS is the one home of the image keys' values; each raw-image dataset's yaml shows them,
    equal to it but for the deliberate choices named here."""
    import glob

    from mmf_multilevel.datasets.images import IMAGE_DEFAULTS
    from mmf_multilevel.paths import DATASET_CONFIG_DIR

    choices = {("nlvr2_images", "swap_left_right"): False,  # left/right name the image of the pair
               ("refcoco_plus_images", "augment_splits"): []}  # boxes are in original pixels
    paths = glob.glob(os.path.join(DATASET_CONFIG_DIR, "captions_images", "*.yaml")) + glob.glob(
        os.path.join(DATASET_CONFIG_DIR, "image_tasks", "*.yaml"))
    assert len(paths) == 13
    for path in paths:
        for name, node in OmegaConf.load(path).dataset_config.items():
            given = OmegaConf.to_container(node, resolve=False)
            for key, default in IMAGE_DEFAULTS.items():
                assert key in given, f"{path}: {name}.{key} missing"
                assert given[key] == choices.get((name, key), default), f"{path}: {name}.{key}"
