"""Tiny SIMLA models and batches for the method contract (see ``methods/testing.py``) and SIMLA's tests."""
import atexit
import functools
import json
import os
import shutil
import tempfile
from typing import Tuple

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


#: the tiny candidate answers of the VQA head (words of the tiny vocabulary; one or two word pieces each)
TINY_ANSWERS = ("w5", "w6", "w7 w8", "w9", "w10 w11", "w12")


@functools.lru_cache(maxsize=None)
def tiny_answer_files() -> Tuple[str, str]:
    """``(answer list, tokenizer folder)`` for the tiny VQA head, written once per process to a temporary
    folder (removed at exit): the 40-word vocabulary ``[PAD] [UNK] [CLS] [SEP] [MASK] w5 .. w39`` (the ids of
    ``methods/testing.py``) and :data:`TINY_ANSWERS`."""
    folder = tempfile.mkdtemp(prefix="simla_tiny_vocab_")
    atexit.register(shutil.rmtree, folder, True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, 40)]
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(words) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, handle)
    answers = os.path.join(folder, "answers.txt")
    with open(answers, "w", encoding="utf-8") as handle:
        handle.write("\n".join(TINY_ANSWERS) + "\n")
    return answers, folder


def tiny_config(head_type):
    config = dict(TINY_BERT, **TINY_VIT, training_head_type=head_type, embed_dim=EMBED_DIM, image_vocab=IMAGE_VOCAB,
                  queue_size=QUEUE_SIZE, mim_masked_patches=6, mim_min_block=2, dvae_random_hidden=8,
                  dvae_random_blocks=1, init_mlm_from_bert=False, cls_token_id=CLS, sep_token_id=SEP,
                  pad_token_id=PAD, gradcam_layer=1, optimization=dict(warmup_updates=0))
    if head_type in ("nlvr2", "nlvr2_assignment"):
        config["nlvr2_shared_layers"] = 1  # the 2-layer tiny BERT as 3 layers: layer 0, then layer 1 twice
    if head_type == "vqa":
        answers, tokenizer = tiny_answer_files()
        # a 1-layer decoder from the 2-layer encoder's upper layer
        config["vqa"] = dict(answer_list=answers, tokenizer=tokenizer, decoder_layers=1, decoder_from_layer=1, k_test=3)
    return config


def tiny_batch(head_type, seed=0, batch=4, length=8, vocab_size=40, dataset_name="simla_contract"):
    """A caption batch on raw images as ``coco_captions_images`` gives it: ``[CLS] words [SEP]`` (every
    other caption shorter, zero-padded), two words of each replaced by [MASK] with ``lm_label_ids`` (-1
    elsewhere), ``image`` ``(B, 3, 64, 64)`` with ``image_size``. ``retrieval``: aligned pairs as
    ``coco_retrieval_images`` gives them, unmasked, with ``image_index``: the first two captions describe one
    image (the same pixels), the others one image each. ``grounding``: the same pairs as the weakly supervised
    ``refcoco_plus_images`` gives them (expressions), with :func:`attach_proposals`."""
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
    if head_type in ("retrieval", "grounding"):
        del sample_list["lm_label_ids"]
        sample_list.input_ids = ids
        image_index = torch.tensor([0] + list(range(batch - 1)))
        sample_list.image = sample_list.image[image_index]
        sample_list.image_index = image_index
    if head_type in ("vqa", "snli_ve"):
        # questions / hypotheses as vqa2_images / snli_ve_images give them: unmasked
        del sample_list["lm_label_ids"]
        sample_list.input_ids = ids
    if head_type == "vqa":
        # ten annotators' answers as candidate indices (-1: outside the list); one question has none in it
        answers = torch.randint(0, len(TINY_ANSWERS), (batch, 10), generator=generator)
        answers[0, 3:] = 1
        answers[1, :] = -1
        answers[1, 0] = 2
        answers[batch - 1, :] = -1
        sample_list.answers_indices = answers
    if head_type == "snli_ve":
        sample_list.targets = torch.arange(batch) % 3
    if head_type == "nlvr2":
        # nlvr2_images: the statement with two images (img0.image, img1.image) and true / false
        from mmf.common.sample import SampleList as Side

        del sample_list["lm_label_ids"]
        sample_list.input_ids = ids
        for side in ("img0", "img1"):
            sample_list[side] = Side({"image": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)})
        del sample_list["image"]
        sample_list.targets = torch.arange(batch) % 2
    if head_type == "grounding":
        attach_proposals(sample_list, generator)
    sample_list.dataset_name, sample_list.dataset_type = dataset_name, "train"
    return sample_list


def attach_proposals(sample_list, generator, proposals=5, max_features=6, original=(90, 120)):
    """RefCOCO+'s box fields on a batch (``refcoco_plus_images``): ``proposal_boxes`` ``(B, max_features, 4)``
    random xyxy boxes in an original image of ``original`` = (height, width) pixels (zero-padded after
    ``proposals``), ``num_proposals``, ``gold_box`` (the first proposal) and ``image_info_0`` with
    ``image_height`` / ``image_width``."""
    from mmf.common.sample import SampleList

    batch = sample_list.input_ids.size(0)
    height, width = original
    corner = torch.rand(batch, proposals, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
    size = (0.2 + 0.2 * torch.rand(batch, proposals, 2, generator=generator)) * torch.tensor([width, height])
    boxes = torch.zeros(batch, max_features, 4)
    boxes[:, :proposals] = torch.cat([corner, corner + size], dim=-1)
    sample_list.proposal_boxes = boxes
    sample_list.num_proposals = torch.full((batch,), proposals, dtype=torch.long)
    sample_list.gold_box = boxes[:, 0].clone()
    info = SampleList()
    info.image_height = torch.full((batch,), height, dtype=torch.long)
    info.image_width = torch.full((batch,), width, dtype=torch.long)
    sample_list.image_info_0 = info
    return sample_list
