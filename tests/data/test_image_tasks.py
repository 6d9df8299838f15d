"""Raw-image variants of the downstream tasks: same records, targets and text as the region twins."""
import json
import os
import shutil

import mmf  # noqa: F401
import pytest
import torch
from mmf.common.registry import registry
from mmf.common.sample import SampleList
from omegaconf import OmegaConf

from mmf_multilevel.datasets import generate as gen

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "datasets")
FILES = {
    "vqa2": "vqa", "nlvr2": "nlvr2", "snli_ve": "snli_ve", "gqa": "gqa", "vgqa": "vgqa",
    "coco_retrieval": "retrieval", "flickr30k_retrieval": "retrieval", "refcoco_plus": "refcoco+",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("image_tasks") / "demo"
    gen.generate(out, num_images=30, feature_dim=8, seed=4, progress=False)
    return out


def make(task, data_dir, split="val", **overrides):
    name = f"{task}_images"
    config = OmegaConf.load(os.path.join(CONFIGS, "image_tasks", f"{name}.yaml")).dataset_config[name]
    config.data_dir = str(data_dir)
    suffix = "testA" if task == "refcoco_plus" and split == "test" else split
    config.annotations[split] = f"annotations/{FILES[task]}_{suffix}.jsonl"
    config.processors.text_processor.params.tokenizer_config.type = os.path.join(str(data_dir), "vocab")
    config.processors.image_processor.params.preset = "default"
    if "answer_processor" in config.processors:
        config.processors.answer_processor.params.vocab_file = "answers.txt" if task == "vqa2" else "answers_gqa.txt"
    if "feature_dim" in config and task != "refcoco_plus":
        config.feature_dim = 8
    for dotted, value in overrides.items():
        OmegaConf.update(config, dotted, value, merge=False)
    for key in config.processors:
        registry.unregister(f"{name}_{key}")
    dataset = registry.get_builder_class(name)().load(config, split)
    dataset.init_processors()
    return dataset


@pytest.mark.parametrize("task", sorted(FILES))
def test_every_task_has_a_raw_image_twin(task, demo):
    dataset = make(task, demo, "val")
    sample = dataset[0]
    if task == "nlvr2":
        assert sample.img0.image.shape == (3, 224, 224) and sample.img1.image.shape == (3, 224, 224)
    else:
        assert sample.image.shape == (3, 224, 224) and sample.image.dtype == torch.float32
        assert "image_feature_0" not in sample
    assert int(sample.id) == 0
    batch = SampleList([dataset[i] for i in range(3)])
    assert batch.get_batch_size() == 3


@pytest.mark.parametrize("task, path", [("snli_ve", "snli_ve/defaults.yaml"), ("vqa2", "vqa2/defaults.yaml")])
def test_targets_and_text_match_the_region_twin(task, path, demo):
    images = make(task, demo, "val")
    config = OmegaConf.load(os.path.join(CONFIGS, path)).dataset_config[task]
    config.data_dir = str(demo)
    config.feature_dim = 8
    config.annotations.val = f"annotations/{FILES[task]}_val.jsonl"
    config.processors.text_processor.params.tokenizer_config.type = os.path.join(str(demo), "vocab")
    if task == "vqa2":
        config.processors.answer_processor.params.vocab_file = "answers.txt"
    for key in config.processors:
        registry.unregister(f"{task}_{key}")
    regions = registry.get_builder_class(task)().load(config, "val")
    regions.init_processors()
    assert len(regions) == len(images)
    for i in range(5):
        a, b = regions[i], images[i]
        torch.testing.assert_close(a.targets, b.targets)
        torch.testing.assert_close(a.input_ids, b.input_ids)


def test_gqa_flip_swaps_question_and_answer(tmp_path, demo):
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    path = target / "annotations" / "gqa_train.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    side = next(r for r in records if r["answer"] in ("left", "right"))
    path.write_text(json.dumps(side) + "\n")
    always = {"processors.image_processor.params.train": {"hflip": 1.0, "randaugment": None}}
    flipped = make("gqa", target, "train", **always)
    vocab = gen.gqa_answer_vocabulary()
    other = "right" if side["answer"] == "left" else "left"
    sample = flipped[0]
    assert bool(sample.image_flipped) and int(sample.answer_index) == vocab.index(other)
    plain = make("gqa", target, "train", swap_left_right=False, **always)
    assert int(plain[0].answer_index) == vocab.index(side["answer"])


def test_refcoco_box_supervision_refuses_augmented_images(demo):
    with pytest.raises(ValueError, match=r"supervision 'box' needs un-augmented images in the 'train' split"):
        make("refcoco_plus", demo, "train", augment_splits=["train"])
    weak = make("refcoco_plus", demo, "train", augment_splits=["train"], supervision="none")
    sample = weak[0]
    assert "targets" not in sample and sample.image.shape == (3, 224, 224)
    boxed = make("refcoco_plus", demo, "val")[0]
    assert boxed.proposal_boxes.shape == (100, 4) and int(boxed.num_proposals) >= 1 and "targets" in boxed


def test_nlvr2_images_need_the_paired_layout(demo):
    with pytest.raises(ValueError, match="use 'paired'"):
        make("nlvr2", demo, input_layout="concatenated")
    assert make("nlvr2", demo).swap_left_right is False


def test_missing_image_is_named(tmp_path, demo):
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    records = [json.loads(line) for line in (target / "annotations" / "snli_ve_val.jsonl").read_text().splitlines()]
    os.remove(target / "images" / f"{records[0]['image_id']}.jpg")
    with pytest.raises(KeyError, match=records[0]["image_id"]):
        make("snli_ve", target)


def test_rc10_unimodal_image_patches():
    """rc10's unimodal_image: its missing config is ours, and a batch of two images keeps both."""
    from mmf.models.unimodal import UnimodalBase, UnimodalModal

    assert os.path.isfile(UnimodalModal.config_path())
    base = UnimodalBase.__new__(UnimodalBase)
    torch.nn.Module.__init__(base)
    base.encoder = lambda x: x * 2
    out = UnimodalBase.forward(base, torch.ones(2, 3, 1, 1))
    assert out.shape == (2, 3) and torch.equal(out, torch.full((2, 3), 2.0))


def test_tools_build_the_processors_of_their_own_config_not_the_registered_ones(demo):
    """MMF's build_processors reuses ``<dataset>_<key>`` from the registry: a dataset built for a second config in
    the same process keeps the first one's image size. init_fresh_processors (what the ranking, grounding and
    picture tools call) builds the new config's processors."""
    from mmf_multilevel.datasets.base import init_fresh_processors

    make("refcoco_plus", demo)  # registers refcoco_plus_images_image_processor at the default 224
    name = "refcoco_plus_images"
    config = OmegaConf.load(os.path.join(CONFIGS, "image_tasks", f"{name}.yaml")).dataset_config[name]
    config.data_dir = str(demo)
    config.annotations.val = "annotations/refcoco+_val.jsonl"
    config.processors.text_processor.params.tokenizer_config.type = os.path.join(str(demo), "vocab")
    config.processors.image_processor.params = OmegaConf.create({"eval": {"size": [64, 64]}})
    stale = registry.get_builder_class(name)().load(config, "val")
    stale.init_processors()
    assert stale[0].image.shape == (3, 224, 224)  # MMF's reuse: the failure mode this guards against
    fresh = init_fresh_processors(registry.get_builder_class(name)().load(config, "val"))
    assert fresh[0].image.shape == (3, 64, 64)
    assert registry.get(f"{name}_image_processor") is fresh.image_processor
