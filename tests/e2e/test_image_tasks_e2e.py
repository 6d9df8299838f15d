"""Raw-image task datasets through the stock mmf_run with MMF's own image model (unimodal_image)."""
import re

import pytest

from helpers.mmf import run_mmf
from mmf_multilevel.datasets import generate as gen

TASKS = {
    # task: (annotation prefix, classifier outputs, loss, metric, answer vocabulary)
    "snli_ve": ("snli_ve", 3, "cross_entropy", "accuracy", None),
    "vqa2": ("vqa", 19, "logit_bce", "vqa_official_accuracy", "answers.txt"),
    "gqa": ("gqa", 13, "logit_bce", "gqa_accuracy", "answers_gqa.txt"),
    "coco_retrieval": ("retrieval", 2, "cross_entropy", "retrieval_rsum", None),
}

CONFIG = """
model: unimodal_image
datasets: {name}
run_type: train_val
model_config:
  unimodal_image:
    modal_encoder:
      params:
        pretrained: false
    classifier:
      params:
        out_dim: {outputs}
        hidden_dim: 32
    losses:
    - type: {loss}
dataset_config:
  {name}:
    data_dir: {data}
    annotations:
      train: annotations/{prefix}_train.jsonl
      val: annotations/{prefix}_val.jsonl
      test: annotations/{prefix}_test.jsonl
    processors:
      text_processor:
        params:
          max_seq_length: 16
          tokenizer_config:
            type: {data}/vocab
      image_processor:
        params:
          preset: simla_finetune
          train:
            size: 64
          eval:
            size: [64, 64]
{answers}
optimizer:
  type: adam_w
  params:
    lr: 1.0e-4
evaluation:
  metrics:
  - {metric}
training:
  trainer: mmf_multilevel
  batch_size: 4
  num_workers: 0
  max_updates: 3
  log_interval: 3
  checkpoint_interval: 3
  evaluation_interval: 3
  early_stop:
    criteria: total_loss
    minimize: true
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("image_tasks_e2e") / "demo"
    gen.generate(out, num_images=20, feature_dim=8, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_raw_image_task_through_mmf_run(task, data, tmp_path):
    prefix, outputs, loss, metric, vocab = TASKS[task]
    name = f"{task}_images"
    answers = "" if vocab is None else f"      answer_processor:\n        params:\n          vocab_file: {vocab}\n"
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(name=name, outputs=outputs, loss=loss, data=data, prefix=prefix, answers=answers, metric=metric))
    save = tmp_path / "save"
    run_mmf(tmp_path, f"env.save_dir={save}", "training.progress_bar=False", config=str(config), timeout=600)
    log = (save / "train.log").read_text()
    assert re.search(rf"val/{name}/{metric}: [0-9.]+", log), log[-3000:]
    assert (save / "current.ckpt").is_file()


@pytest.mark.slow
def test_images_of_different_sizes_batch_without_a_canvas(data, tmp_path):
    """SOHO's resize (shorter side, capped longer side) with ``pad_to: null``: the trainer uses the
    dataset's collate_fn, which pads each batch to its own largest image (MMF's collator could not
    stack them)."""
    prefix, outputs, loss, metric, vocab = TASKS["snli_ve"]
    name = "snli_ve_images"
    text = CONFIG.format(name=name, outputs=outputs, loss=loss, data=data, prefix=prefix, answers="", metric=metric)
    text = text.replace("""          preset: simla_finetune
          train:
            size: 64
          eval:
            size: [64, 64]""", """          preset: soho
          train:
            size: 48
            max_size: 80
            pad_to: null
          eval:
            size: 48
            max_size: 80
            pad_to: null""")
    assert "pad_to: null" in text
    config = tmp_path / "run.yaml"
    config.write_text(text)
    save = tmp_path / "save"
    run_mmf(tmp_path, f"env.save_dir={save}", "training.progress_bar=False", config=str(config), timeout=600)
    log = (save / "train.log").read_text()
    assert re.search(rf"val/{name}/{metric}: [0-9.]+", log), log[-3000:]

    from mmf.common.registry import registry

    from mmf_multilevel.datasets.images import collate_images
    from mmf_multilevel.trainers.multilevel_trainer import _collator

    registry.unregister(f"{name}_image_processor")
    registry.unregister(f"{name}_text_processor")
    from omegaconf import OmegaConf

    dataset_config = OmegaConf.load(config).dataset_config[name]
    builder = registry.get_builder_class(name)()
    base = OmegaConf.load(builder.config_path()).dataset_config[name]
    dataset = builder.load(OmegaConf.merge(base, dataset_config), "val")
    dataset.init_processors()
    samples = [dataset[i] for i in range(4)]
    sizes = {tuple(s["image"].shape[-2:]) for s in samples}
    assert len(sizes) > 1, sizes  # the demo images' aspect ratios differ
    batch = _collator(dataset)(samples)
    assert batch["image"].shape[-2:] == (max(h for h, _ in sizes), max(w for _, w in sizes))
    assert batch["image"].shape == collate_images(samples)["image"].shape
