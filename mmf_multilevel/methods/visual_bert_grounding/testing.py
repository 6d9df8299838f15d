"""Tiny VisualBERT grounding models and batches for the method contract (see ``methods/testing.py``)."""
import torch

from mmf_multilevel.methods.testing import TINY_BERT, region_batch

FEATURES, REGIONS = 16, 5


def tiny_config(head_type):
    return dict(TINY_BERT, training_head_type=head_type, visual_embedding_dim=FEATURES,
                losses=[{"type": "cross_entropy"}])


def tiny_batch(head_type, seed=0):
    """A RefCOCO+-like batch: an expression, the proposals' features and ``targets`` = the index of
    the best proposal (a real region of each sample)."""
    batch = region_batch("visual_bert_grounding_contract", feature_dim=FEATURES, num_regions=REGIONS, seed=seed)
    batch.targets = torch.tensor([0, 2, 1][: batch.input_ids.size(0)])
    return batch
