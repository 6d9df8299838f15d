"""Demo-data generator, caption / VQA v2 dataset builders, and their bad-input errors."""
import json
import os
import shutil

import mmf  # noqa: F401  (applies the compatibility layer, registers our components)
import numpy as np
import pytest
import torch
from mmf.common.registry import registry
from mmf.common.sample import SampleList
from omegaconf import OmegaConf

from mmf_multilevel.datasets import generate as gen
from mmf_multilevel.datasets.annotations import AnnotationError
from mmf_multilevel.datasets.base import FeatureDimensionError, MissingFeaturesError
from mmf_multilevel.datasets.captions import CaptionDataset
from mmf_multilevel.datasets.vqa2 import VQA2Dataset
from mmf_multilevel.evaluation.vqa import vqa_official_accuracy
from mmf_multilevel.features import FeatureCacheReader, FeatureCacheWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs", "datasets")
DIM = 48


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo"
    gen.generate(out, num_images=60, feature_dim=DIM, seed=3, progress=False)
    return out


def dataset_config(name, data_dir, **overrides):
    if name == "vqa2":
        path, key = os.path.join(CONFIGS, "vqa2", "defaults.yaml"), "vqa2"
    else:
        path, key = os.path.join(CONFIGS, "captions", f"{name}.yaml"), name
    config = OmegaConf.load(path).dataset_config[key]
    config.data_dir = str(data_dir)
    config.feature_dim = DIM
    config.max_features = 6
    config.processors.text_processor.params.tokenizer_config.type = os.path.join(str(data_dir), "vocab")
    if name == "vqa2":
        config.processors.answer_processor.params.vocab_file = "answers.txt"
    for dotted, value in overrides.items():
        OmegaConf.update(config, dotted, value, merge=False)
    return config


def make(cls, name, data_dir, split="train", **overrides):
    config = dataset_config(name, data_dir, **overrides)
    for key in config.processors:  # MMF reuses a dataset's registered processors; build them anew
        registry.unregister(f"{name}_{key}")
    dataset = cls(name, config, split)
    dataset.init_processors()
    return dataset


# --------------------------------------------------------------------------- generator
def test_generator_writes_every_format(demo):
    manifest = json.loads((demo / "manifest.json").read_text())
    assert manifest["num_images"] == {"train": 42, "val": 9, "test": 9}
    reader = FeatureCacheReader(str(demo / "features" / "regions.lmdb"))
    assert len(reader) == 60 and reader.feature_dim == DIM and reader.header["detector"] == "demo_shapes"
    objects = (demo / "objects_vocab.txt").read_text().split()
    colors = (demo / "attributes_vocab.txt").read_text().split()
    vqa = [json.loads(line) for line in (demo / "annotations" / "vqa_train.jsonl").read_text().splitlines()]
    for item in vqa:
        assert len(item["answers"]) == 10
    test = [json.loads(line) for line in (demo / "annotations" / "vqa_test.jsonl").read_text().splitlines()]
    assert test and all("answers" not in item for item in test)
    from PIL import Image

    for caption in (demo / "annotations" / "captions_train.jsonl").read_text().splitlines()[:6]:
        item = json.loads(caption)
        record = reader.get(item["image_id"])
        with Image.open(demo / "images" / f"{item['image_id']}.jpg") as image:
            assert image.size == (record["image_w"], record["image_h"])
        boxes = record["boxes"]
        assert (boxes[:, 2] <= record["image_w"] + 2).all() and (boxes[:, 3] <= record["image_h"] + 2).all()
        # the detector's top class / attribute is in the caption (the caption describes the scene)
        for obj, attr in zip(record["objects"], record["attrs"]):
            assert f"{colors[attr]} {objects[obj]}" in " ".join(
                json.loads(c)["caption"] for c in (demo / "annotations" / "captions_train.jsonl").read_text().splitlines()
                if json.loads(c)["image_id"] == item["image_id"]
            )
    # humans vary in spelling and sometimes err, but the majority answer scores 1 officially
    assert np.mean([len(set(q["answers"])) > 1 for q in vqa]) > 0.5
    vocab = gen.answer_vocabulary()
    best = [max(vqa_official_accuracy(word, q["answers"]) for word in vocab) for q in vqa]
    assert np.mean(best) > 0.95


def test_generator_is_deterministic_and_reuses(tmp_path, demo):
    a = tmp_path / "a"
    b = tmp_path / "b"
    gen.generate(a, num_images=12, feature_dim=8, seed=5, progress=False)
    gen.generate(b, num_images=12, feature_dim=8, seed=5, progress=False, images=False)
    for name in ("captions_train.jsonl", "vqa_val.jsonl"):
        assert (a / "annotations" / name).read_bytes() == (b / "annotations" / name).read_bytes()
    ra, rb = FeatureCacheReader(str(a / "features" / "regions.lmdb")), FeatureCacheReader(str(b / "features" / "regions.lmdb"))
    assert ra.keys() == rb.keys()
    for key in ra.keys():
        np.testing.assert_array_equal(ra.get(key)["features"], rb.get(key)["features"])
    # a complete set with the same settings is reused untouched
    stamp = os.stat(a / "manifest.json").st_mtime_ns
    gen.generate(a, num_images=12, feature_dim=8, seed=5, progress=False)
    assert os.stat(a / "manifest.json").st_mtime_ns == stamp
    # other settings on a non-empty folder: refused, the folder is left as it was
    with pytest.raises(FileExistsError, match="--force"):
        gen.generate(a, num_images=13, feature_dim=8, seed=5, progress=False)
    assert json.loads((a / "manifest.json").read_text())["settings"]["num_images"] == 12
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_generator_cli_errors(tmp_path, capsys):
    assert gen.main(["--out", str(tmp_path / "x"), "--num-images", "2", "--quiet"]) == 2
    assert "num_images must be at least 3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- builders
def test_vqa_dataset_samples_and_collation(demo):
    dataset = make(VQA2Dataset, "vqa2", demo, "train")
    processor = registry.get("vqa2_answer_processor")
    assert processor.get_vocab_size() == len(gen.answer_vocabulary())
    sample = dataset[0]
    record = dataset.records[0]
    assert sample.image_feature_0.shape == (6, DIM) and sample.image_feature_0.dtype == torch.float32
    count = int(sample.image_info_0.max_features)
    assert 2 <= count <= 5 and sample.image_feature_0[count:].abs().sum() == 0
    stored = FeatureCacheReader(str(demo / "features" / "regions.lmdb")).get(record["image_id"])
    np.testing.assert_allclose(sample.image_feature_0[:count].numpy(), stored["features"][:count])
    # soft targets are the official accuracy of each vocabulary answer
    for index, word in enumerate(gen.answer_vocabulary()):
        assert sample.targets[index].item() == pytest.approx(vqa_official_accuracy(word, record["answers"]))
    assert sample.input_ids.shape == sample.input_mask.shape == sample.segment_ids.shape == (20,)
    batch = SampleList([dataset[i] for i in range(4)])
    assert batch.image_feature_0.shape == (4, 6, DIM) and batch.targets.shape == (4, processor.get_vocab_size())
    assert batch.answers_keys.shape == (4, 10) and batch.question_id.tolist() == [r["question_id"] for r in dataset.records[:4]]


def test_vqa_test_split_has_no_answers(demo):
    dataset = make(VQA2Dataset, "vqa2", demo, "test")
    sample = dataset[0]
    assert "targets" not in sample and sample.input_ids.shape == (20,)


def test_caption_dataset_masking_and_itm(demo):
    dataset = make(CaptionDataset, "coco_captions", demo, "train", itm_probability=0.5)
    import random

    random.seed(0)
    samples = [dataset[i] for i in range(40)]
    labels = torch.stack([s.lm_label_ids for s in samples])
    assert (labels != -1).any() and (labels == -1).any()
    correct = [int(s.is_correct) for s in samples]
    assert 0 < sum(correct) < len(correct)
    for s, record in zip(samples, dataset.records[:40]):
        if int(s.is_correct) == 1:
            assert s.caption == record["caption"]
        else:  # a caption of another image
            assert all(r["caption"] != s.caption for r in dataset.records if r["image_id"] == record["image_id"])


def test_caption_dataset_draws_masked_regions_and_keeps_the_original_features(demo):
    """The dataset draws the masked-region decisions (the masking rule); image_feature_0 stays the original
    (the regression target), padding is never selected, the rates are the configured ones, and the batch
    contract hands the network exactly the zeroed / replaced features."""
    from mmf_multilevel.methods.batch import region_inputs
    from tests.helpers.stats import assert_rate

    dataset = make(CaptionDataset, "coco_captions", demo, "train", region_mask_probability=0.4,
                   region_zero_ratio=0.6, region_random_ratio=0.3)
    torch.manual_seed(0)
    samples = [dataset[i % len(dataset)] for i in range(600)]
    stored = FeatureCacheReader(str(demo / "features" / "regions.lmdb"))
    for s, i in zip(samples[:20], range(20)):
        count = int(s.image_info_0.max_features)
        original = stored.get(dataset.records[i]["image_id"])["features"][:count]
        np.testing.assert_allclose(s.image_feature_0[:count].numpy(), original)
    selected = torch.stack([s.region_selected for s in samples])
    zeroed = torch.stack([s.region_zeroed for s in samples])
    source = torch.stack([s.region_source for s in samples])
    real = torch.stack([torch.arange(6) < int(s.image_info_0.max_features) for s in samples])
    assert not (selected & ~real).any() and not (zeroed & ~selected).any() and not ((source >= 0) & ~selected).any()
    assert_rate(selected.sum().item() / real.sum().item(), 0.4, real.sum().item(), what="selected regions")
    assert_rate(zeroed.sum().item() / selected.sum().item(), 0.6, selected.sum().item(), what="zeroed")
    assert_rate((source >= 0).sum().item() / selected.sum().item(), 0.3, selected.sum().item(), what="replaced")
    assert bool(((source < 0) | real.gather(1, source.clamp(min=0))).all())  # replacements are real regions
    batch = SampleList(samples[:8])
    regions = region_inputs(batch, "test", DIM, "4d")
    assert torch.equal(regions.selected, batch.region_selected)
    assert torch.equal(regions.features, batch.image_feature_0)
    assert (regions.corrupted[batch.region_zeroed] == 0).all()
    rows, cols = (batch.region_source >= 0).nonzero(as_tuple=True)
    assert torch.equal(regions.corrupted[rows, cols], batch.image_feature_0[rows, batch.region_source[rows, cols]])
    kept = ~batch.region_zeroed & (batch.region_source < 0)
    assert torch.equal(regions.corrupted[kept], batch.image_feature_0[kept])
    # off by default (the corpus yaml): no decisions travel
    plain = make(CaptionDataset, "coco_captions", demo, "train")
    assert "region_selected" not in plain[0]
    with pytest.raises(ValueError, match="coco_captions.region_zero_ratio"):
        make(CaptionDataset, "coco_captions", demo, "train", region_zero_ratio=0.9, region_random_ratio=0.2)


def test_vqa_questions_as_a_pretraining_corpus(demo):
    """Questions take part in image-text matching behind itm_probability (another image's question,
    is_correct 0, the record's own targets), are MLM-masked by a masked_token processor, and off by
    default (fine-tuning): no is_correct, no lm_label_ids."""
    import random

    dataset = make(VQA2Dataset, "vqa2", demo, "train", itm_probability=0.5, region_mask_probability=0.15,
                   **{"processors.text_processor.type": "masked_token",
                      "processors.text_processor.params.mask_probability": 0.15})
    random.seed(1)
    samples = [dataset[i] for i in range(60)]
    correct = [int(s.is_correct) for s in samples]
    assert 10 < sum(correct) < 50
    vocab = dataset.text_processor._tokenizer
    for s, record in zip(samples, dataset.records[:60]):
        words = vocab.convert_ids_to_tokens([i for i, m in zip(s.input_ids.tolist(), s.input_mask.tolist()) if m])
        restored = [vocab.convert_ids_to_tokens(label) if label >= 0 else word
                    for word, label in zip(words, s.lm_label_ids.tolist())]
        question = " ".join(restored[1:-1]).replace(" ##", "")
        own = " ".join(vocab.tokenize(record["question"]))
        if int(s.is_correct) == 1:
            assert question == own.replace(" ##", "")
        else:  # a question of another image (the demo's templated questions can repeat across images)
            assert any(" ".join(vocab.tokenize(r["question"])).replace(" ##", "") == question
                       for r in dataset.records if r["image_id"] != record["image_id"])
        assert "targets" in s and "region_selected" in s
    labels = torch.stack([s.lm_label_ids for s in samples])
    assert (labels >= 0).any()
    plain = make(VQA2Dataset, "vqa2", demo, "train")[0]
    assert "is_correct" not in plain and "lm_label_ids" not in plain and "region_selected" not in plain


def test_every_corpus_builder_is_registered():
    for name in ("captions", "coco_captions", "vg_captions", "conceptual_captions", "sbu_captions", "vqa2"):
        builder = registry.get_builder_class(name)
        assert builder is not None, name
        assert os.path.isfile(builder.config_path())


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def bad(tmp_path, demo):
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    return target


def test_missing_lmdb(bad):
    shutil.rmtree(bad / "features" / "regions.lmdb")
    with pytest.raises(FileNotFoundError, match=r"region feature cache not found: .*regions\.lmdb \(dataset_config\.vqa2\.features\.train\)"):
        make(VQA2Dataset, "vqa2", bad)


def test_feature_dimension_mismatch(demo):
    with pytest.raises(FeatureDimensionError, match=rf"holds {DIM}-d region features but dataset_config\.vqa2\.feature_dim .* is 2048"):
        make(VQA2Dataset, "vqa2", demo, feature_dim=2048)


def test_image_without_features(bad):
    path = bad / "annotations" / "vqa_train.jsonl"
    lines = path.read_text().splitlines()
    extra = json.loads(lines[0])
    extra.update(question_id=999999, image_id="no_such_image")
    path.write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    with pytest.raises(MissingFeaturesError, match=r"1 of the 43 images named in .*vqa_train\.jsonl have no region features in .*regions\.lmdb: 'no_such_image'"):
        make(VQA2Dataset, "vqa2", bad)
    with pytest.warns(UserWarning, match="dropped their 1 of"):
        dataset = make(VQA2Dataset, "vqa2", bad, skip_missing_features=True)
    assert dataset.num_dropped == 1 and len(dataset) == len(lines)


def test_empty_caption_names_line(bad):
    path = bad / "annotations" / "captions_train.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = json.dumps({"image_id": json.loads(lines[4])["image_id"], "caption": "  "})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"captions_train\.jsonl:5: empty caption"):
        make(CaptionDataset, "coco_captions", bad)


def test_malformed_jsonl_line(bad):
    path = bad / "annotations" / "vqa_train.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"vqa_train\.jsonl:3: malformed JSON"):
        make(VQA2Dataset, "vqa2", bad)


def test_answer_outside_vocabulary(bad):
    path = bad / "annotations" / "vqa_train.jsonl"
    lines = path.read_text().splitlines()
    item = json.loads(lines[0])
    item["answers"] = ["purple"] * 10
    lines[0] = json.dumps(item)
    path.write_text("\n".join(lines) + "\n")
    strict = make(VQA2Dataset, "vqa2", bad, **{"processors.answer_processor.params.oov": "error_if_all"})
    with pytest.raises(ValueError, match=r"none of its answers is in the answer vocabulary .*answers\.txt: 'purple'"):
        strict[0]
    lenient = make(VQA2Dataset, "vqa2", bad)  # default: kept with an all-zero target, counted
    assert lenient[0].targets.sum() == 0
    assert registry.get("vqa2_answer_processor").num_all_oov >= 1


def test_missing_answers_in_train_split(bad):
    path = bad / "annotations" / "vqa_train.jsonl"
    lines = path.read_text().splitlines()
    item = json.loads(lines[1])
    del item["answers"]
    lines[1] = json.dumps(item)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"vqa_train\.jsonl:2: missing field 'answers' \(required in the train split\)"):
        make(VQA2Dataset, "vqa2", bad)


def test_mmf_layout_cache_reads_the_same(tmp_path, demo):
    """A cache in MMF's pickled layout (--mmf-compat) feeds the same samples."""
    target = tmp_path / "demo"
    shutil.copytree(demo, target, ignore=shutil.ignore_patterns("regions.lmdb"))
    source = FeatureCacheReader(str(demo / "features" / "regions.lmdb"))
    with FeatureCacheWriter(str(target / "features" / "regions.lmdb"), detector="demo_shapes", mmf_compat=True) as writer:
        for key, record in source.items():
            writer.write(key, {k: v for k, v in record.items() if k != "image_id"})
    ours = make(VQA2Dataset, "vqa2", demo)[3]
    theirs = make(VQA2Dataset, "vqa2", target)[3]
    torch.testing.assert_close(ours.image_feature_0, theirs.image_feature_0)
    torch.testing.assert_close(ours.image_info_0.bbox, theirs.image_info_0.bbox)


def test_every_region_yaml_lists_the_region_keys_with_the_base_defaults():
    """REGION_DEFAULTS is the one home of those values; each region dataset's yaml shows them, equal."""
    import glob

    from mmf_multilevel.datasets.base import REGION_DEFAULTS

    paths = [p for p in glob.glob(os.path.join(CONFIGS, "*", "*.yaml"))
             if "features:" in open(p).read() and "images:" not in open(p).read() and "synthetic_vl" not in p]
    assert len(paths) == 13, paths
    for path in paths:
        for name, node in OmegaConf.load(path).dataset_config.items():
            given = OmegaConf.to_container(node, resolve=False)
            for key, default in REGION_DEFAULTS.items():
                assert given.get(key, "missing") == default, f"{path}: {name}.{key}"
            assert "feature_dim" in given and "data_dir" in given, path


def test_a_question_corpus_reads_the_annotation_file_of_its_index(demo):
    """MMF hands each of a split's annotation files its index: a QA pre-training corpus reads that file."""
    from mmf_multilevel.datasets.vqa2 import VQA2Dataset

    config = dataset_config("vqa2", demo, **{"annotations.train": ["annotations/vqa_val.jsonl",
                                                                     "annotations/vqa_train.jsonl"],
                                             "features.train": ["features/regions.lmdb", "features/regions.lmdb"]})
    for key in config.processors:
        registry.unregister(f"vqa2_{key}")
    first, second = VQA2Dataset("vqa2", config, "train", 0), VQA2Dataset("vqa2", config, "train", 1)
    assert first.annotation_path.endswith("vqa_val.jsonl") and second.annotation_path.endswith("vqa_train.jsonl")
    assert len(first) != len(second)


@pytest.mark.parametrize("key", ["itm_probability", "region_mask_probability"])
def test_pretraining_probabilities_accept_the_closed_unit_interval_and_name_their_key(demo, key):
    dataset = make(CaptionDataset, "coco_captions", demo, **{key: 1.0})
    assert getattr(dataset, key) == 1.0
    with pytest.raises(ValueError, match=key):
        make(CaptionDataset, "coco_captions", demo, **{key: 1.5})


@pytest.mark.parametrize("key", ["itm_probability", "region_mask_probability", "region_zero_ratio",
                                 "region_random_ratio"])
def test_a_missing_pretraining_key_names_the_dataset_and_the_key(demo, key):
    config = dataset_config("coco_captions", demo)
    del config[key]
    with pytest.raises(KeyError, match=f"dataset_config.coco_captions.{key} is not set"):
        CaptionDataset("coco_captions", config, "train")


def test_every_caption_can_be_swapped_in_a_corpus_of_two_images(demo, tmp_path):
    """Two images are enough for a mismatched pair: at itm_probability 1 each caption comes from the other."""
    import random

    records = [json.loads(line) for line in (demo / "annotations" / "captions_train.jsonl").read_text().splitlines()]
    first_two = sorted({str(r["image_id"]) for r in records})[:2]
    two = tmp_path / "two_images.jsonl"
    one_each = [next(r for r in records if str(r["image_id"]) == image_id) for image_id in first_two]
    two.write_text("".join(json.dumps(r) + "\n" for r in one_each))  # two records: one caption per image
    dataset = make(CaptionDataset, "coco_captions", demo, itm_probability=1.0, **{"annotations.train": str(two)})
    assert len(dataset.records) == 2 and {str(r["image_id"]) for r in dataset.records} == set(first_two)
    random.seed(0)
    assert all(int(dataset[i].is_correct) == 0 for i in range(len(dataset)))


def test_mask_sample_regions_defaults_and_per_region_probabilities():
    """One sample's masked-region draw: by default every selected region is zeroed and none replaced;
    a ``(max_features,)`` probability tensor decides region by region; padding rows are never drawn."""
    from mmf.common.sample import Sample

    from mmf_multilevel.datasets.pretraining import mask_sample_regions

    def sample():
        s = Sample()
        s.image_feature_0 = torch.randn(5, 4)
        s.image_info_0 = Sample({"max_features": torch.tensor(4)})
        return s

    drawn = sample()
    selected = mask_sample_regions(drawn, 1.0)
    assert selected.tolist() == [True, True, True, True, False]
    assert torch.equal(drawn.region_zeroed, selected) and (drawn.region_source == -1).all()
    per_region = sample()
    selected = mask_sample_regions(per_region, torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]))
    assert selected.tolist() == [False, True, False, True, False] and selected.shape == (5,)
