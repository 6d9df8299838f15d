"""SIMLA's benchmark adapter for ``benchmarks/compare.py`` (the interface: ``methods/benchmarking.py``); with
``layout: albef`` the same model is the reference ALBEF (``benchmarks/compare_references.py``).

SIMLA reads pixels: a ViT-B/16 (DeiT-base) at 256 x 256 (16 x 16 patches + [CLS]) and a 12-layer BERT whose
upper 6 layers cross-attend to the image. One pre-training step, per sample: the online ViT and text
encoder (6 layers) with gradients; the momentum ViT and text encoder without; ITM over 3 pairs (the matched
one and a hard negative each way); MLM through the fusion pass (online, and the momentum teacher's without
gradients); MIM: the masked image through the ViT and the fusion pass, the dVAE tokens without gradients
(not counted: a small CNN on the 128 x 128 view). The fusion pass runs the caption through all 12 layers
(SIMLA) or the 6 fusion layers from the text encoder's output (ALBEF). Inference: the VQA head (generative:
the answer decoder ranks the top-k of 3,129 candidate answers) over a 16-token question.
"""
import os
import tempfile

import torch

from mmf_multilevel.methods import benchmarking as bm
from mmf_multilevel.methods.simla import testing

REFERENCE = "albef"
INPUT = "pixels"
MODES = ("",)
INFERENCE_HEAD = "vqa"
ANSWERS = 3129
DIMS = {
    "base": dict(hidden=768, intermediate=3072, layers=12, fusion=6, patches=256, patch=16, vocab=30522, tokens=30,
                 question=16, answers=ANSWERS, k_test=128, decoder=6, answer_tokens=3, masked_patches=75, mask=0.15),
    "tiny": dict(hidden=32, intermediate=64, layers=2, fusion=1, patches=16, patch=16, vocab=40, tokens=8, question=16,
                 answers=len(testing.TINY_ANSWERS), k_test=3, decoder=1, answer_tokens=2, masked_patches=6, mask=0.25),
}


def model_config(size, mode, head_type, layout="simla"):
    if size == "tiny":
        config = testing.tiny_config(head_type)
    else:
        config = dict(bm.BASE_BERT, training_head_type=head_type, vit_pretrained=False, init_mlm_from_bert=False,
                      optimization=dict(warmup_updates=0))
        if head_type == "vqa":
            files = bm.vocab_folder(os.path.join(tempfile.gettempdir(), "compare_simla_vocab"), answers=ANSWERS)
            config["vqa"] = dict(answer_list=files["answer_list"], tokenizer=files["tokenizer"])
    config["layout"] = layout
    if size == "tiny" and layout == "albef":
        config["fusion_layer"] = DIMS["tiny"]["fusion"]  # 1 text + 1 fusion layer of the 2-layer tiny BERT
    return config


def describe_batch(size, batch):
    d = DIMS[size]
    side = int(d["patches"] ** 0.5) * d["patch"]
    return f"{batch} x ({d['tokens']} tokens + a {side}x{side} image)"


def train_batch(size, batch, mode, seed=0):
    d = DIMS[size]
    if size == "tiny":
        return testing.tiny_batch("pretraining", seed=seed)
    out = testing.tiny_batch("pretraining", seed=seed, batch=batch, length=d["tokens"], vocab_size=d["vocab"],
                             dataset_name="compare")
    side = int(d["patches"] ** 0.5) * d["patch"]
    out.image = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))
    out.image_size = torch.tensor([[side, side]] * batch)
    out.input_ids[out.input_ids == testing.CLS] = 101  # the tiny ids of [CLS] / [SEP] / [MASK] -> BERT's
    out.input_ids[out.input_ids == testing.SEP] = 102
    out.input_ids[out.input_ids == testing.MASK] = 103
    return out


def inference_batch(size, question, visual):
    return bm.attach_pixels(bm.question_batch(question), visual)


def _vit(d, tokens):
    return d["layers"] * bm.bert_layer(tokens, d["hidden"], d["intermediate"]) + 2 * d["patches"] * 3 * d["patch"] ** 2 * d["hidden"]


def _fuse(d, text, image, layout):
    """The multimodal pass of ``text`` tokens reading ``image`` tokens."""
    H, I = d["hidden"], d["intermediate"]
    fusion = d["layers"] - d["fusion"]
    cross = fusion * (bm.bert_layer(text, H, I) + bm.cross_attention(text, image, H))
    return cross + (d["fusion"] * bm.bert_layer(text, H, I) if layout == "simla" else 0)


def flops(size, mode, layout="simla"):
    d = DIMS[size]
    H, I = d["hidden"], d["intermediate"]
    image, T = d["patches"] + 1, d["tokens"]
    vit, text = _vit(d, image), d["fusion"] * bm.bert_layer(T, H, I)
    mlm = _fuse(d, T, image, layout) + bm.mlm_decoder(d["mask"] * T, H, d["vocab"])
    mim = vit + _fuse(d, T, image, layout) + 2 * d["masked_patches"] * H * 8192  # + the image-vocabulary decoder
    with_grad = vit + text + 3 * _fuse(d, T, image, layout) + mlm + (mim if layout == "simla" else 0)
    without = vit + text + mlm  # the momentum model: ViT, text encoder, MLM teacher
    train = 3 * with_grad + without
    q = d["question"]
    answers = d["k_test"] * d["decoder"] * (bm.bert_layer(d["answer_tokens"], H, I) + bm.cross_attention(
        d["answer_tokens"], q, H))
    inference = vit + _fuse(d, q, image, layout) + (0 if layout == "simla" else d["fusion"] * bm.bert_layer(q, H, I)) \
        + answers + 2 * d["answers"] * d["answer_tokens"] * H * d["vocab"] / d["answers"] * d["k_test"]
    return {"train": train, "inference": inference}


def inference_image(size):
    """``(height, width)`` of the pixels the ViT reads (the picture resized to ``image_size``)."""
    side = int(DIMS[size]["patches"] ** 0.5) * DIMS[size]["patch"]
    return side, side
