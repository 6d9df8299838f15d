"""Tiny MVPTR models and batches for the method contract (see ``methods/testing.py``)."""
import torch

from mmf_multilevel.methods.testing import TINY_BERT, mlm_labels, region_batch

FEATURES, REGIONS, TAGS, MASK, ANSWERS = 16, 5, 6, 4, 7


def tiny_config(head_type):
    # num_hidden_layers counts text + multimodal layers (1 + 1 here); 4 concept rows above the 40 words
    config = dict(TINY_BERT, training_head_type=head_type, feature_dim=FEATURES, num_tag_slots=TAGS,
                  num_embeddings=TINY_BERT["vocab_size"] + 4)
    if head_type in ("retrieval", "snli_ve"):
        config.update(losses=[{"type": "cross_entropy"}])
    elif head_type == "vqa":
        config.update(num_answers=ANSWERS, losses=[{"type": "logit_bce"}])
    elif head_type == "refcoco":  # the tiny network has one multimodal layer
        config.update(refcoco={"layer": 1})
    return config


def tiny_batch(head_type, seed=0, batch=3):
    """``mvptr_captions``' fields: captions with two phrase slots before [SEP] and MLM labels, tags with MCR
    labels, regions, and each caption's image."""
    sample_list = region_batch("mvptr_contract", batch=batch, length=10, feature_dim=FEATURES, num_regions=REGIONS,
                               seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    ids, mask = sample_list.input_ids, sample_list.input_mask
    phrases = torch.zeros_like(ids)
    for row in range(ids.size(0)):
        sep = int(mask[row].sum()) - 1
        if row != 1:  # the second caption has no phrase
            ids[row, sep - 2:sep] = torch.randint(40, 44, (2,), generator=g)
            phrases[row, sep - 2:sep] = 1
    sample_list.phrase_slots = phrases
    labels = mlm_labels(sample_list).masked_fill(phrases.bool(), -100)
    sample_list.lm_label_ids = labels.masked_fill(labels < 0, -100)
    tags = torch.randint(5, 40, (ids.size(0), TAGS), generator=g)
    tags[:, 0], tags[:, 4] = 2, 3
    tag_mask = (torch.arange(TAGS) < 5).long().expand(ids.size(0), TAGS).clone()
    tags = tags * tag_mask
    mcr = torch.full_like(tags, -100)
    mcr[:, 2] = tags[:, 2]
    tags[:, 2] = MASK
    sample_list.tag_ids, sample_list.tag_mask, sample_list.mcr_label_ids = tags, tag_mask, mcr
    sample_list.image_index = torch.arange(ids.size(0))
    if head_type == "refcoco":  # mvptr_refcoco_plus: proposals = the regions, a gold box each
        del sample_list["lm_label_ids"], sample_list["mcr_label_ids"], sample_list["phrase_slots"]
        info = sample_list.image_info_0
        sample_list.proposal_boxes = info.bbox
        sample_list.num_proposals = info.max_features
        sample_list.gold_box = info.bbox[:, 0] + 3.0
        sample_list.targets = torch.zeros(ids.size(0), dtype=torch.long)
    if head_type in ("vqa", "snli_ve"):  # mvptr_vqa2 / mvptr_snli_ve: unmasked, no phrases, task targets
        del sample_list["lm_label_ids"], sample_list["mcr_label_ids"], sample_list["phrase_slots"]
        size = ids.size(0)
        sample_list.targets = (torch.rand(size, ANSWERS, generator=g) if head_type == "vqa"
                               else torch.tensor([0, 2, 1, 0][:size]))
    if head_type == "retrieval":  # aligned training pairs (mvptr_coco_retrieval), no MLM/MCR masking
        sample_list.text_index = torch.arange(ids.size(0))
        sample_list.targets = torch.ones(ids.size(0), dtype=torch.long)
        del sample_list["lm_label_ids"], sample_list["mcr_label_ids"]
    return sample_list
