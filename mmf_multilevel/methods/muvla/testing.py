"""Tiny μ-VLA models and batches for the method contract (see ``methods/testing.py``)."""
import torch

from mmf_multilevel.methods.muvla.network import TASK_IDS
from mmf_multilevel.methods.testing import TINY_BERT, mlm_labels, region_batch

FEATURES, LABELS, TAGS, REGIONS = 16, 5, 6, 5


def tiny_config(head_type):
    config = dict(TINY_BERT, training_head_type=head_type, feature_dim=FEATURES, classifier_dropout=0.0,
                  pretraining=dict(num_tags=TAGS))
    if head_type == "classification":
        config.update(num_labels=LABELS, losses=[{"type": "logit_bce"}])
    elif head_type in ("nlvr2", "refcoco"):
        config.update(losses=[{"type": "cross_entropy"}])
    return config


def tiny_batch(head_type, seed=0):
    batch = region_batch("muvla_contract", feature_dim=FEATURES, num_regions=REGIONS, seed=seed,
                         paired=head_type == "nlvr2")
    size = batch.input_ids.size(0)
    if head_type == "pretraining":  # an I-S batch: MLM on matched pairs and ITM
        batch.muvla_task = torch.full((size,), TASK_IDS["image_sentence"])
        batch.is_correct = torch.tensor([1, 0, 1][:size])
        batch.lm_label_ids = mlm_labels(batch).masked_fill((batch.is_correct == 0).view(-1, 1), -1)
    elif head_type == "classification":
        batch.targets = torch.rand(size, LABELS, generator=torch.Generator().manual_seed(seed))
    elif head_type == "refcoco":
        batch.targets = torch.tensor([0, 2, 1][:size])
    else:
        batch.targets = torch.tensor([1, 0, 1][:size])
    return batch
