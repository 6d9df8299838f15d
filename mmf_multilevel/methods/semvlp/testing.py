"""Tiny SemVLP models and batches for the method contract (see ``methods/testing.py``)."""
import torch

from mmf_multilevel.methods.testing import TINY_BERT, masked_regions, mlm_labels, region_batch

FEATURES, LABELS, CLASSES = 16, 5, 4


def tiny_config(head_type):
    config = dict(TINY_BERT, training_head_type=head_type, feature_dim=FEATURES, cross_layer_start=1,
                  mode_schedule="alternate",
                  pretraining=dict(num_object_labels=CLASSES))
    if head_type == "classification":
        config.update(num_labels=LABELS, losses=[{"type": "logit_bce"}])
    elif head_type in ("nlvr2", "retrieval"):
        config.update(losses=[{"type": "cross_entropy"}])
    return config


def tiny_batch(head_type, seed=0):
    batch = region_batch("semvlp_contract", feature_dim=FEATURES, seed=seed, paired=head_type == "nlvr2",
                         num_classes=CLASSES)
    size = batch.input_ids.size(0)
    if head_type == "pretraining":
        batch.lm_label_ids = mlm_labels(batch)
        masked_regions(batch, prob=0.5, seed=seed + 1)
        batch.is_correct = torch.tensor([1, 0, 1][:size])
    elif head_type == "classification":
        batch.targets = torch.rand(size, LABELS, generator=torch.Generator().manual_seed(seed))
    else:
        batch.targets = torch.tensor([1, 0, 1][:size])
    return batch
