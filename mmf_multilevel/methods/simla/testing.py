"""Tiny SIMLA models and batches for the method contract (see ``methods/testing.py``) and SIMLA's tests."""
import torch

from mmf_multilevel.methods.testing import TINY_BERT

#: the tiny vocabulary's ids (``methods/testing.py``: [CLS] = 2, [SEP] = 3, [MASK] = 4; padding 0)
CLS, SEP, MASK, PAD = 2, 3, 4, 0
#: 64x64 images, patch 16 -> a 4x4 grid (17 tokens); the dVAE's 32x32 view, stride 8 -> 16 tokens
IMAGE_SIZE = 64
#: a one-block, 32-wide ViT (its width = the BERT's, as the cross-attention needs)
TINY_VIT = dict(vit="vit_tiny_patch16_224", vit_pretrained=False, vit_options=dict(embed_dim=32, depth=1, num_heads=4),
                image_size=IMAGE_SIZE)
IMAGE_VOCAB, EMBED_DIM, QUEUE_SIZE = 24, 16, 16


def tiny_config(head_type):
    return dict(TINY_BERT, **TINY_VIT, training_head_type=head_type, embed_dim=EMBED_DIM, image_vocab=IMAGE_VOCAB,
                queue_size=QUEUE_SIZE, mim_masked_patches=6, mim_min_block=2, dvae_random_hidden=8,
                dvae_random_blocks=1, init_mlm_from_bert=False, cls_token_id=CLS, sep_token_id=SEP,
                pad_token_id=PAD, optimization=dict(warmup_updates=0))


def tiny_batch(head_type, seed=0, batch=4, length=8, vocab_size=40, dataset_name="simla_contract"):
    """A caption batch on raw images as ``coco_captions_images`` gives it: ``[CLS] words [SEP]`` (every
    other caption shorter, zero-padded), two words of each replaced by [MASK] with ``lm_label_ids`` (-1
    elsewhere), ``image`` ``(B, 3, 64, 64)`` with ``image_size``. ``retrieval``: aligned pairs as
    ``coco_retrieval_images`` gives them, unmasked, with ``image_index``: the first two captions describe one
    image (the same pixels), the others one image each."""
    from mmf.common.sample import SampleList

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch, length), generator=generator)
    lengths = torch.tensor([length if i % 2 == 0 else length - 3 for i in range(batch)])
    mask = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids = ids * mask
    labels = torch.full_like(ids, -1)
    masked = ids.clone()
    for row in range(batch):
        for position in (torch.randperm(int(lengths[row]) - 2, generator=generator)[:2] + 1).tolist():
            labels[row, position] = ids[row, position]
            masked[row, position] = MASK
    sample_list = SampleList()
    sample_list.input_ids, sample_list.input_mask, sample_list.lm_label_ids = masked, mask, labels
    sample_list.segment_ids = torch.zeros_like(ids)
    sample_list.image = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    sample_list.image_size = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * batch)
    if head_type == "retrieval":
        del sample_list["lm_label_ids"]
        sample_list.input_ids = ids
        image_index = torch.tensor([0] + list(range(batch - 1)))
        sample_list.image = sample_list.image[image_index]
        sample_list.image_index = image_index
    sample_list.dataset_name, sample_list.dataset_type = dataset_name, "train"
    return sample_list
