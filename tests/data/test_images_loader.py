"""Raw-image datasets in DataLoader workers (fork and spawn) with the trainer's per-sample seeding,
and one end-to-end run through the stock ``mmf_run``: MMF rc10's own ``unimodal_image`` model
(a ResNet-152 on ``sample_list.image``) trained on ``coco_captions_images``."""
import os
import re
import zipfile

import mmf  # noqa: F401
import pytest
import torch
from mmf.common.batch_collator import BatchCollator
from mmf.common.registry import registry
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from helpers.mmf import run_mmf
from mmf_multilevel import images as I
from mmf_multilevel.datasets import images as D
from mmf_multilevel.datasets.generate import generate
from mmf_multilevel.trainers.data import ResumableSampler, SeededDataset, make_loader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "datasets", "captions_images", "coco_captions_images.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    out = root / "demo"
    generate(out, num_images=24, feature_dim=8, progress=False)
    with zipfile.ZipFile(root / "images.zip", "w") as archive:
        for name in sorted(os.listdir(out / "images")):
            archive.write(out / "images" / name, f"images/{name}")
    I.build_image_lmdb(out / "images", root / "images.lmdb", progress=False)
    return {"data": out, "folder": out / "images", "zip": root / "images.zip", "lmdb": root / "images.lmdb"}


def make_dataset(demo, kind, split="train"):
    name = "coco_captions_images"
    config = OmegaConf.load(CONFIG).dataset_config[name]
    config.data_dir = str(demo["data"])
    config.images = {split: str(demo[kind])}
    config.processors.text_processor.params.tokenizer_config.type = str(demo["data"] / "vocab")
    config.processors.text_processor.params.max_seq_length = 16
    config.processors.image_processor.params.train = {"size": 48}
    config.processors.image_processor.params.eval = {"size": [48, 48]}
    for key in config.processors:
        registry.unregister(f"{name}_{key}")
    dataset = D.ImageCaptionDataset(name, config, split)
    dataset.init_processors()
    return dataset


def epoch(dataset, workers, seed=5):
    """{dataset index: (image_id, image tensor, flipped, input_ids)} over one shuffled epoch."""
    sampler = ResumableSampler(dataset, shuffle=True, seed=seed)
    order = sampler.shard()
    loader = make_loader(dataset, 4, sampler, workers, False, seed, BatchCollator(dataset.dataset_name, dataset.dataset_type))
    items = []
    for batch in loader:
        assert batch.image.shape[1:] == (3, 48, 48) and batch.input_ids.shape[1] == 16
        assert batch.dataset_name == "coco_captions_images"
        for i, image_id in enumerate(batch.image_id):
            items.append((image_id, batch.image[i].clone(), bool(batch.image_flipped[i]), batch.input_ids[i].clone()))
    assert len(items) == len(order) == len(dataset)
    return dict(zip(order, items))


@pytest.mark.parametrize("kind", ["folder", "zip", "lmdb"])
def test_two_workers_with_per_sample_seeds(demo, kind):
    dataset = make_dataset(demo, kind)
    two = epoch(dataset, 2)
    for index, (image_id, _, _, _) in two.items():
        assert image_id == dataset.records[index]["image_id"]
    # the augmentation (and masking) of a sample depends on (seed, epoch, index) only, not on the worker count
    one, again = epoch(dataset, 1), epoch(dataset, 2)
    for index in two:
        for other in (one, again):
            assert torch.equal(two[index][1], other[index][1]) and two[index][2] == other[index][2]
            assert torch.equal(two[index][3], other[index][3])
    flips = [item[2] for item in two.values()]
    assert any(flips) and not all(flips)
    # another seed, other crops
    reseeded = epoch(dataset, 2, seed=6)
    assert sum(not torch.equal(two[i][1], reseeded[i][1]) for i in two) > len(two) // 2


@pytest.mark.slow
def test_spawned_workers_reopen_the_sources(demo):
    for kind in ("zip", "lmdb"):
        dataset = make_dataset(demo, kind, split="val")
        dataset.image_source.get(dataset.records[0]["image_id"])  # a handle open in the parent
        loader = DataLoader(SeededDataset(dataset, 3), batch_size=6, num_workers=2, multiprocessing_context="spawn",
                            collate_fn=BatchCollator(dataset.dataset_name, dataset.dataset_type))
        batches = list(loader)
        assert sum(b.image.shape[0] for b in batches) == len(dataset)
        expected = dataset[0].image
        assert torch.equal(batches[0].image[0], expected)  # eval pipeline: same pixels in any process


PLUGIN = '''
import os

from mmf.models.unimodal import UnimodalModal

# rc10's wheel lacks configs/models/unimodal/image.yaml: point the model at the one beside this file
# (what mmf_multilevel.compat does for visual_bert)
UnimodalModal.config_path = classmethod(lambda cls: os.path.join(os.path.dirname(__file__), "unimodal_image.yaml"))

'''

MODEL_CONFIG = """
model_config:
  unimodal_image:
    direct_features_input: false
    modal_hidden_size: 2048
    modal_encoder:
      type: resnet152
      params:
        pretrained: false
        pool_type: avg
        num_output_features: 1
    classifier:
      type: mlp
      params:
        in_dim: 2048
        out_dim: 2
        hidden_dim: 32
        num_layers: 0
    losses:
    - type: cross_entropy
"""

RUN_CONFIG = """
model: unimodal_image
datasets: coco_captions_images
run_type: train_val

dataset_config:
  coco_captions_images:
    data_dir: {data}
    annotations:
      train: annotations/captions_train.jsonl
      val: annotations/captions_val.jsonl
      test: annotations/captions_test.jsonl
    images:
      train: {lmdb}
      val: {zip}
      test: images
    itm_targets: true
    processors:
      text_processor:
        params:
          max_seq_length: 16
          tokenizer_config:
            type: {data}/vocab
      image_processor:
        params:
          preset: simla_pretrain
          train:
            size: 64
          eval:
            size: [64, 64]

optimizer:
  type: adam_w
  params:
    lr: 1.0e-4

evaluation:
  metrics:
  - accuracy

training:
  trainer: mmf_multilevel
  seed: 3
  batch_size: 4
  num_workers: 2
  max_updates: 4
  log_interval: 2
  checkpoint_interval: 4
  evaluation_interval: 4
  tensorboard: false
  early_stop:
    criteria: coco_captions_images/accuracy
    minimize: false
"""


@pytest.mark.slow
def test_mmf_run_trains_an_mmf_image_model_on_raw_images(demo, tmp_path):
    plugin = tmp_path / "image_test_plugin"
    plugin.mkdir()
    (plugin / "__init__.py").write_text(PLUGIN)
    (plugin / "unimodal_image.yaml").write_text(MODEL_CONFIG)
    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG.format(data=demo["data"], lmdb=demo["lmdb"], zip=demo["zip"]))
    save = tmp_path / "save"
    result = run_mmf(tmp_path, f"env.user_dir={plugin}", f"env.save_dir={save}", config=str(config), timeout=600)
    log = (save / "train.log").read_text()
    assert re.search(r"train/coco_captions_images/cross_entropy: [0-9.]+", log), log[-3000:]
    assert re.search(r"val/coco_captions_images/accuracy: [0-9.]+", log), log[-3000:]
    assert (save / "current.ckpt").is_file()
    assert result.returncode == 0
