"""In-process region extraction for the region methods: the detector run on the query image gives the record
``extract.py`` writes for the same file, is cached by the image's SHA-256, and a region model's prediction from it
equals the prediction from the extracted cache (which tests/predict/test_predictor.py ties to mmf_run's sample)."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from helpers.extract import TINY_FEATURE_DIM, cli_args, cli_env, tiny_opts
from helpers.mmf import ROOT
from mmf_multilevel.datasets import generate as gen

pytest.importorskip("detectron2", reason="detectron2 is not installed (run scripts/install.sh)")

BOXES = {"min_boxes": 2, "max_boxes": 6}
MODEL = "butd_r101"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo set (6 images) and a region cache of its images written by extract.py (tiny detector, seed 0)."""
    root = tmp_path_factory.mktemp("detect_data")
    gen.generate(root / "demo", num_images=6, progress=False)
    cache = root / "extracted.lmdb"
    done = subprocess.run(cli_args("--model", MODEL, "--random-init", "0", "--images", str(root / "demo" / "images"),
                                   "--output", str(cache), "--min-boxes", "2", "--max-boxes", "6", "--threads", "1",
                                   "--workers", "0", "--no-progress", "--opts", *tiny_opts(MODEL)),
                          env=cli_env(root), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, cache


def detector(**kwargs):
    from mmf_multilevel.predict import DetectorRegions

    torch.set_num_threads(1)
    return DetectorRegions(MODEL, random_init=kwargs.pop("seed", 0), opts=tiny_opts(MODEL), **BOXES, **kwargs)


def images_of(root):
    folder = root / "demo" / "images"
    return sorted((path.stem, path) for path in folder.iterdir())


def test_the_record_equals_what_extract_py_writes_and_is_cached_by_the_image_hash(data, tmp_path):
    from mmf_multilevel.features import FeatureCacheReader
    from mmf_multilevel.predict import read_image

    root, extracted = data
    source = detector(cache=tmp_path / "by_hash.lmdb")
    assert source.feature_dim == TINY_FEATURE_DIM
    reader = FeatureCacheReader(str(extracted))
    try:
        for image_id, path in images_of(root):
            query = read_image(str(path))
            record = source(query, None)
            expected = reader.get(image_id)
            assert record["image_id"] == query.sha256
            for field in ("features", "boxes", "cls_prob", "objects", "attr_prob", "attrs"):
                np.testing.assert_array_equal(record[field], expected[field], err_msg=f"{image_id} {field}")
            assert (record["image_w"], record["image_h"]) == (expected["image_w"], expected["image_h"])
            assert 2 <= record["num_boxes"] <= 6
        extracted_header = reader.header
    finally:
        reader.close()
    runs = source.detector_runs
    assert runs == len(images_of(root))
    # the same image again (bytes this time): from memory, no detector run
    first = images_of(root)[0][1]
    again = source(read_image(first.read_bytes()), "named")
    assert source.detector_runs == runs and again["image_id"] == "named"
    # a new source on the same cache reads it instead of detecting; the cache is a region cache like extract.py's
    fresh = detector(cache=tmp_path / "by_hash.lmdb")
    cached = fresh(read_image(str(first)), None)
    assert fresh.detector_runs == 0
    np.testing.assert_array_equal(cached["features"], again["features"])
    reader = FeatureCacheReader(str(tmp_path / "by_hash.lmdb"))
    try:
        assert len(reader) == len(images_of(root)) and read_image(str(first)).sha256 in reader
        assert reader.header["info"]["selection"] == extracted_header["info"]["selection"]
        assert reader.header["weights_sha256"] == extracted_header["weights_sha256"]
    finally:
        reader.close()


def test_bad_inputs_name_what_is_wrong(data, tmp_path):
    from mmf_multilevel.predict import PredictInputError, read_image

    root, _ = data
    source = detector(cache=tmp_path / "cache.lmdb")
    with pytest.raises(PredictInputError, match="runs on the image itself"):
        source(None, "demo_000000")
    source(read_image(str(images_of(root)[0][1])), None)
    other = detector(seed=1, cache=tmp_path / "cache.lmdb")  # other weights, same cache folder
    with pytest.raises(PredictInputError, match=r"cache\.lmdb.*another detector"):
        other(read_image(str(images_of(root)[1][1])), None)
    with pytest.raises(PredictInputError, match="weights"):
        from mmf_multilevel.predict import DetectorRegions

        DetectorRegions(MODEL, weights=str(tmp_path / "absent.pth"), opts=tiny_opts(MODEL))


def semvlp_predictor(root, cache, regions):
    from mmf_multilevel.predict import load_predictor

    torch.manual_seed(0)
    return load_predictor(f"{ROOT}/projects/semvlp/demo/vqa.yaml", regions=regions, device="cpu", overrides=[
        f"env.data_dir={root}", f"model_config.semvlp.feature_dim={TINY_FEATURE_DIM}",
        f"dataset_config.vqa2.feature_dim={TINY_FEATURE_DIM}", f"dataset_config.vqa2.features.val={cache}",
        f"dataset_config.vqa2.features.test={cache}"])


def test_a_region_model_predicts_from_the_detector_as_from_the_extracted_cache(data):
    root, extracted = data
    from_detector = semvlp_predictor(root, extracted, detector())
    from_cache = semvlp_predictor(root, extracted, None)
    from_cache.model.load_state_dict(from_detector.model.state_dict())
    question = "what color is the circle?"
    results = []
    for image_id, path in images_of(root)[:3]:
        live = from_detector.vqa(str(path), question, top_k=3)
        stored = from_cache.vqa(None, question, top_k=3, image_id=image_id)
        assert torch.equal(live["scores"], stored["scores"]), image_id
        assert live["answer"] == stored["answer"]
        assert set(from_detector.profile) == {"decode", "regions", "text", "model"}
        assert all(seconds > 0 for seconds in from_detector.profile.values())
        results.append(live["scores"])
    assert not torch.equal(results[0], results[1])  # the regions reach the answer


def test_the_command_runs_the_detector_and_profiles_each_stage(data, capsys):
    from mmf_multilevel.predict.cli import main

    root, extracted = data
    image = images_of(root)[0][1]
    argv = ["--config", f"{ROOT}/projects/semvlp/demo/vqa.yaml", "--image", str(image), "--question", "what shape?",
            "--detector", MODEL, "--detector-random-init", "0", "--detector-opts", " ".join(tiny_opts(MODEL)),
            "--min-boxes", "2", "--max-boxes", "6", "--device", "cpu", "--profile", f"env.data_dir={root}",
            f"model_config.semvlp.feature_dim={TINY_FEATURE_DIM}", f"dataset_config.vqa2.feature_dim={TINY_FEATURE_DIM}"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)  # stdout: the JSON alone
    assert result["task"] == "vqa" and result["answer"] and len(result["top_k"]) == 5
    assert set(result["profile"]) == {"decode", "regions", "text", "model"}
    assert main(argv + ["--regions", str(extracted)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([a for a in argv if a != MODEL and a != "--detector"]) == 2
    assert "need --detector" in capsys.readouterr().err
    assert os.path.exists(image)
