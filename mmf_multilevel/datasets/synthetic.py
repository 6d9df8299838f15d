"""``synthetic_vl``: random text + region-feature samples with a learnable target.

For smoke tests, benchmarks and trying out a model/trainer setup without data: the
same sample index always gives the same sample, and the classification target is a
fixed function of the sample (argmax of a fixed projection of the mean region
feature plus the first token), so a model can learn it and the loss must drop.

Fields follow MMF's conventions for region-based models such as ``visual_bert``:
``input_ids``, ``input_mask``, ``segment_ids`` (L), ``image_feature_0`` (R x D),
``image_info_0.max_features`` (number of real regions), ``targets`` (class index,
``task: classification``) or ``lm_label_ids`` (``task: pretraining``; -1 = not masked).
"""
import os

import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample
from mmf.datasets.base_dataset import BaseDataset
from mmf.datasets.base_dataset_builder import BaseDatasetBuilder

from mmf_multilevel.paths import CONFIG_DIR as PATHS_CONFIG_DIR

CONFIG_DIR = PATHS_CONFIG_DIR  # the shipped configs (top-level configs/ in a checkout)


class SyntheticVLDataset(BaseDataset):
    def __init__(self, config, dataset_type, dataset_name="synthetic_vl"):
        super().__init__(dataset_name, config, dataset_type)
        sizes = config.num_samples
        self.length = int(sizes[dataset_type] if dataset_type in sizes else sizes["train"])
        self.seq_length = int(config.seq_length)
        self.num_features = int(config.num_features)
        self.feature_dim = int(config.feature_dim)
        self.vocab_size = int(config.vocab_size)
        self.num_labels = int(config.num_labels)
        self.task = config.task
        if self.task not in ("classification", "pretraining"):
            raise ValueError(f"dataset_config.{dataset_name}.task must be 'classification' or 'pretraining', got {self.task!r}")
        offset = {"train": 0, "val": 1, "test": 2}[dataset_type]
        self.seed = int(config.seed) * 10 + offset
        generator = torch.Generator().manual_seed(int(config.seed))
        self.projection = torch.randn(self.feature_dim, self.num_labels, generator=generator)
        self.token_bias = torch.randn(self.vocab_size, self.num_labels, generator=generator)

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        length = int(torch.randint(3, self.seq_length + 1, (1,), generator=generator))
        regions = int(torch.randint(1, self.num_features + 1, (1,), generator=generator))
        input_ids = torch.zeros(self.seq_length, dtype=torch.long)
        input_ids[:length] = torch.randint(1, self.vocab_size, (length,), generator=generator)
        input_mask = torch.zeros(self.seq_length, dtype=torch.long)
        input_mask[:length] = 1
        features = torch.zeros(self.num_features, self.feature_dim)
        features[:regions] = torch.randn(regions, self.feature_dim, generator=generator)

        sample = Sample()
        sample.input_ids = input_ids
        sample.input_mask = input_mask
        sample.segment_ids = torch.zeros(self.seq_length, dtype=torch.long)
        sample.image_feature_0 = features
        sample.image_info_0 = Sample({"max_features": torch.tensor(regions, dtype=torch.long)})
        if self.task == "classification":
            logits = features[:regions].mean(0) @ self.projection + self.token_bias[input_ids[0]]
            sample.targets = logits.argmax().long()
        else:
            labels = torch.full((self.seq_length,), -1, dtype=torch.long)
            chosen = torch.rand(length, generator=generator) < 0.15
            chosen[int(torch.randint(0, length, (1,), generator=generator))] = True
            labels[:length][chosen] = input_ids[:length][chosen]
            masked = input_ids.clone()
            masked[:length][chosen] = 0
            sample.input_ids = masked
            sample.lm_label_ids = labels
        return sample


@registry.register_builder("synthetic_vl")
class SyntheticVLBuilder(BaseDatasetBuilder):
    def __init__(self):
        super().__init__("synthetic_vl")

    @classmethod
    def config_path(cls):
        return os.path.join(CONFIG_DIR, "datasets", "synthetic_vl", "defaults.yaml")

    def build(self, config, dataset_type="train", *args, **kwargs):
        return None

    def load(self, config, dataset_type="train", *args, **kwargs):
        self.dataset = SyntheticVLDataset(config, dataset_type)
        return self.dataset

    def update_registry_for_model(self, config):
        # read by classification heads that size themselves from the dataset
        registry.register(f"{self.dataset_name}_num_final_outputs", config.num_labels)
