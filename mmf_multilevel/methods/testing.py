"""Tiny inputs for the contract every method passes (``tests/methods/test_contract.py``).

Each method folder has a ``testing.py`` with ``tiny_config(head_type)`` (overrides of its typed
defaults that give a tiny, randomly initialised model) and ``tiny_batch(head_type)`` (a
``SampleList`` such as its datasets produce, built with the helpers here). A method that is
registered gets the contract tests by having these two functions.
"""
import torch

__all__ = ["TINY_BERT", "region_batch", "attach_regions", "mlm_labels", "masked_regions"]

#: a 2-layer, 32-wide BERT over a 40-word vocabulary ([CLS] = 2, [SEP] = 3, [MASK] = 4, as the demo's)
TINY_BERT = dict(bert_model_name=None, vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
CLS, SEP = 2, 3


def _sample_list():
    from mmf.common.sample import SampleList

    return SampleList()


def _regions(generator, batch, num, feature_dim, num_classes):
    info = _sample_list()
    width = torch.randint(200, 640, (batch,), generator=generator)
    height = torch.randint(200, 480, (batch,), generator=generator)
    corner = torch.rand(batch, num, 2, generator=generator) * 0.5
    extent = 0.1 + torch.rand(batch, num, 2, generator=generator) * 0.4
    scale = torch.stack([width, height], -1).view(batch, 1, 2).float()
    info.bbox = torch.cat([corner, corner + extent], -1) * scale.repeat(1, 1, 2)
    info.image_width, info.image_height = width, height
    info.max_features = torch.tensor([num] + [max(1, num - 2)] * (batch - 1))
    info.objects = torch.randint(0, num_classes, (batch, num), generator=generator)
    info.cls_prob = torch.rand(batch, num, num_classes, generator=generator).softmax(-1)
    features = torch.rand(batch, num, feature_dim, generator=generator)
    return features, info


def attach_regions(sample_list, generator, num, feature_dim, num_classes=4, paired=False):
    """Region features and MMF's ``image_info_0`` (boxes in pixels, sizes, counts, detector labels);
    ``paired``: one set under each of ``img0`` / ``img1`` (NLVR2's paired layout)."""
    batch = sample_list.input_ids.size(0)
    sides = ("img0", "img1") if paired else (None,)
    for side in sides:
        features, info = _regions(generator, batch, num, feature_dim, num_classes)
        target = sample_list
        if side is not None:
            target = _sample_list()
            sample_list[side] = target
        target.image_feature_0, target.image_info_0 = features, info
    return sample_list


def region_batch(dataset_name, batch=3, length=8, num_regions=5, feature_dim=16, vocab_size=40, seed=0,
                 dataset_type="train", paired=False, num_classes=4):
    """A batch of ``[CLS] words [SEP]`` texts (the second and later samples shorter, zero-padded)
    with region features: what the region datasets produce, before any pre-training targets."""
    generator = torch.Generator().manual_seed(seed)
    sample_list = _sample_list()
    ids = torch.randint(5, vocab_size, (batch, length), generator=generator)
    lengths = torch.tensor([length] + [max(3, length - 3)] * (batch - 1))
    mask = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    sample_list.input_ids = ids * mask
    sample_list.input_mask = mask
    sample_list.segment_ids = torch.zeros_like(ids)
    attach_regions(sample_list, generator, num_regions, feature_dim, num_classes, paired=paired)
    sample_list.dataset_name, sample_list.dataset_type = dataset_name, dataset_type
    return sample_list


def mlm_labels(sample_list, seed=1):
    """``lm_label_ids`` with two labelled positions per sample (their current ids; -1 elsewhere); the ids
    themselves are left as they are (a test that needs [MASK] in them puts it there)."""
    generator = torch.Generator().manual_seed(seed)
    ids = sample_list.input_ids
    labels = torch.full_like(ids, -1)
    for row in range(ids.size(0)):
        real = int(sample_list.input_mask[row].sum())
        for position in torch.randperm(real - 2, generator=generator)[:2] + 1:
            labels[row, position] = ids[row, position]
    return labels


def masked_regions(sample_list, prob=0.5, seed=1, zero_ratio=1.0, random_ratio=0.0):
    """The masked-region decisions a pre-training dataset puts in each sample (``region_selected``,
    ``region_zeroed``, ``region_source``), drawn over the batch's real regions with a seeded generator
    and at least one region per sample."""
    from mmf_multilevel.modules.masking import draw_region_masking
    from mmf_multilevel.modules.visual import num_boxes_to_mask

    features, info = sample_list.image_feature_0, sample_list.image_info_0
    real = num_boxes_to_mask(info.max_features.view(-1), features.size(1))
    masking = draw_region_masking(real, prob, torch.Generator().manual_seed(seed), zero_ratio=zero_ratio,
                                  random_ratio=random_ratio, ensure_one=True)
    sample_list.region_selected, sample_list.region_zeroed, sample_list.region_source = masking
    return sample_list
