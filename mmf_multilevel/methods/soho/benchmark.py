"""SOHO's benchmark adapter for ``benchmarks/compare.py`` (the interface: ``methods/benchmarking.py``), and
SOHO's analytic cost (also printed by ``benchmarks/bench_soho.py``).

SOHO reads pixels: the ResNet-101 grid encoder (C5, 1x1 conv, 2x2 max-pool) and BERT-base over words +
cells. The pre-training step (paper §4.1): per image two matched and two mismatched 40-token texts at
600 x 1000, MLM + MVM + ITM, the dictionary update and the method's own SGD + AdamW; a sample is one
image-text pair. Reference: MMF's VisualBERT on detector regions, the region pipeline SOHO's paper
compares with (§4.5). Inference: the VQA head over a 16-token question + the 10 x 16 cells of a
600 x 1000 picture.
"""
import torch

from mmf_multilevel.methods import benchmarking as bm
from mmf_multilevel.methods.soho import testing

REFERENCE = "visual_bert"
INPUT = "pixels"
MODES = ("",)
INFERENCE_HEAD = "vqa"
#: images per pre-training step (each with 4 texts: 8 pairs)
BATCH = 2
H, I, LAYERS, ANSWERS, QUESTION = 768, 3072, 12, 3129, 16
IMAGE = (600, 1000)
BOTTLENECK_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
DIMS = {"base": dict(image=IMAGE, words=40, question=16), "tiny": dict(image=(128, 192), words=7, question=16)}


def _ceil(a, b):
    return -(-a // b)


def resnet_flops(depth, height, width):
    """FLOPs of a torchvision/timm bottleneck ResNet's convolutions up to C5 (stride in the 3x3 conv,
    7x7/2 stem, 3x3/2 max-pool): ``(flops, (h, w) of C5)``."""
    def conv(h, w, cin, cout, k, stride=1):
        ho, wo = _ceil(h, stride), _ceil(w, stride)
        return ho * wo * cout * cin * k * k, ho, wo

    macs, h, w = conv(height, width, 3, 64, 7, 2)
    h, w = _ceil(h, 2), _ceil(w, 2)
    cin = 64
    for stage, blocks in enumerate(BOTTLENECK_BLOCKS[depth]):
        width_ = 64 * 2 ** stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            a, _, _ = conv(h, w, cin, width_, 1)
            b, ho, wo = conv(h, w, width_, width_, 3, stride)
            c, _, _ = conv(ho, wo, width_, 4 * width_, 1)
            macs += a + b + c
            if block == 0:
                macs += conv(h, w, cin, 4 * width_, 1, stride)[0]
            h, w, cin = ho, wo, 4 * width_
    return 2 * macs, (h, w)


def encoder_flops(length, layers=LAYERS, hidden=H, intermediate=I):
    """Forward FLOPs of ``layers`` BERT blocks over ``length`` tokens: Q, K, V and output projections,
    the two attention products and the feed-forward network."""
    per_layer = 4 * length * hidden * hidden + 2 * length * length * hidden + 2 * length * hidden * intermediate
    return 2 * layers * per_layer


def vqa_head_flops(hidden=H, answers=ANSWERS):
    """MMF/LXMERT's VQA head on the pooled [CLS] (the pooler included): H->H, H->2H, 2H->answers."""
    return 2 * (hidden * hidden + hidden * 2 * hidden + 2 * hidden * answers)


def soho_inference_flops(height=IMAGE[0], width=IMAGE[1], words=QUESTION, depth=101):
    cnn, (h, w) = resnet_flops(depth, height, width)
    cells = _ceil(h, 2) * _ceil(w, 2)
    return {
        "cnn": cnn + 2 * h * w * 2048 * H,  # ResNet to C5 + the 1x1 conv to the hidden size (then the 2x2 pool)
        "transformer": encoder_flops(words + cells) + vqa_head_flops(),
        "cells": cells,
    }



def soho_training_flops(images=2, texts_per_image=4, matched_per_image=2, words=40, cells=160, vd_size=2048,
                        masked_words=6, masked_cells=24, cnn_per_text=False, height=IMAGE[0], width=IMAGE[1]):
    """One pre-training update, 3 x the forward: the CNN once per image (``cnn_per_text``: once per
    text), the matching pass over every pair, the masked pass over the matched pairs, the dictionary's
    distances, the MLM and MVM decoders on the masked positions and the ITM head."""
    cnn = soho_inference_flops(height, width)["cnn"] * (images * texts_per_image if cnn_per_text else images)
    pairs, matched = images * texts_per_image, images * matched_per_image
    transformer = (pairs + matched) * encoder_flops(words + cells)
    distances = 2 * (images * texts_per_image if cnn_per_text else images) * cells * vd_size * H
    heads = 2 * matched * (masked_words * (H * H + H * 30522) + masked_cells * (H * H + H * vd_size)) + 2 * pairs * H * 2
    return 3 * (cnn + transformer + heads) + distances  # the dictionary's nearest entry has no backward



def model_config(size, mode, head_type):
    if size == "tiny":
        return testing.tiny_config(head_type)
    config = dict(bm.BASE_BERT, training_head_type=head_type, backbone_pretrained=False, freeze_resnet_epochs=0,
                  pretraining=dict(init_mlm_from_bert=False))
    if head_type == "vqa":
        config.update(num_answers=ANSWERS, losses=[{"type": "logit_bce"}])
    return config


def describe_batch(size, batch):
    d = DIMS[size]
    return f"{batch} images x 4 texts ({d['words']} tokens) at {d['image'][0]}x{d['image'][1]}"


def count_samples(sample_list):
    return int(sample_list.pairs.input_ids.size(0))


def train_batch(size, batch, mode, seed=0):
    d = DIMS[size]
    if size == "tiny":
        return testing.pretraining_batch(num_images=batch, seed=seed, height=d["image"][0], width=d["image"][1])
    from mmf.common.sample import SampleList

    from mmf_multilevel.methods.soho.pretraining import compose_itm_pairs

    g = torch.Generator().manual_seed(seed)
    layout = compose_itm_pairs(batch, 2, generator=g)
    count = layout["pair_image_index"].numel()
    ids = torch.randint(1000, 30522, (count, d["words"]), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    masked, labels = bm.lm_labels(ids, g)
    out, pairs = SampleList(), SampleList()
    out.image = torch.randn(batch, 3, *d["image"], generator=g)
    out.image_size = torch.tensor([list(d["image"])] * batch)
    pairs.input_ids, pairs.lm_label_ids, pairs.input_mask = masked, labels, torch.ones_like(ids)
    pairs.segment_ids = torch.zeros_like(ids)
    pairs.is_correct, pairs.pair_image_index = layout["is_correct"], layout["pair_image_index"]
    out.pairs = pairs
    out.dataset_name, out.dataset_type = "compare", "train"
    return out


def optimizer(model):
    """SOHO's own optimizers (SGD on the CNN, AdamW on the rest) behind one ``step``."""
    return model.configure_optimizer(None)


def inference_batch(size, question, visual):
    return bm.attach_pixels(bm.question_batch(question), visual)


def flops(size, mode):
    if size == "tiny":  # resnet10t + a 2-layer, 32-wide BERT: only the transformer is counted
        d = DIMS[size]
        cells = -(-d["image"][0] // 64) * -(-d["image"][1] // 64)
        return {"train": 3 * 1.5 * encoder_flops(d["words"] + cells, 2, 32, 64),
                "inference": encoder_flops(d["question"] + cells, 2, 32, 64) + vqa_head_flops(32, testing.ANSWERS)}
    # per pair: 2 images x 4 texts -> 8 pairs
    inference = soho_inference_flops()
    return {"train": soho_training_flops() / 8, "inference": inference["cnn"] + inference["transformer"]}


def inference_image(size):
    """``(height, width)`` of the pixels SOHO reads (the picture at its own size)."""
    return DIMS[size]["image"]
