"""SemVLP's benchmark adapter for ``benchmarks/compare.py`` (the interface: ``methods/benchmarking.py``).

Modes: ``single`` (objects and text through the 12 shared blocks together) and ``two`` (each stream
through them alone, the object stream cross-attending to the text's last layer in blocks above
``cross_layer_start``); the pre-training step runs one mode (``mode_schedule`` fixed to it). Reference:
HF LXMERT, the two-stream model SemVLP's paper compares with. Inference: the VQA head (``classification``,
3,129 answers) over a 16-token question + 100 detected objects + [IMG].
"""
import torch

from mmf_multilevel.methods import benchmarking as bm
from mmf_multilevel.methods.semvlp import testing
from mmf_multilevel.methods.testing import masked_regions, region_batch

REFERENCE = "lxmert"
INPUT = "regions"
MODES = ("single", "two")
INFERENCE_HEAD = "classification"
ANSWERS = 3129
#: per size: width, FFN, layers, L_s, vocabulary, feature width, object classes, caption tokens, objects
DIMS = {
    "base": dict(hidden=768, intermediate=3072, layers=12, cross_start=6, vocab=30522, features=2048, classes=1600,
                 tokens=20, regions=100, question=16, answers=ANSWERS, mask=0.15),
    "tiny": dict(hidden=32, intermediate=64, layers=2, cross_start=1, vocab=40, features=testing.FEATURES,
                 classes=testing.CLASSES, tokens=8, regions=5, question=16, answers=testing.LABELS, mask=0.25),
}


def model_config(size, mode, head_type):
    if size == "tiny":
        config = testing.tiny_config(head_type)
    else:
        config = dict(bm.BASE_BERT, training_head_type=head_type, pretraining=dict(init_mlm_from_bert=False))
        if head_type == "classification":
            config.update(num_labels=ANSWERS, losses=[{"type": "logit_bce"}])
    config["mode_schedule"] = mode or "single"
    config["mode"] = mode or "single"
    return config


def describe_batch(size, batch):
    d = DIMS[size]
    return f"{batch} x ({d['tokens']} tokens + {d['regions']} objects)"


def train_batch(size, batch, mode, seed=0):
    if size == "tiny":
        return testing.tiny_batch("pretraining", seed=seed)
    d = DIMS[size]
    g = torch.Generator().manual_seed(seed)
    out = region_batch("compare", batch=batch, length=d["tokens"], num_regions=d["regions"], feature_dim=d["features"],
                       vocab_size=d["vocab"], seed=seed, num_classes=d["classes"])
    out.input_ids, out.lm_label_ids = bm.lm_labels(out.input_ids, g)
    out.lm_label_ids = out.lm_label_ids.masked_fill(out.input_mask == 0, -1)
    masked_regions(out, prob=0.15, seed=seed + 1)
    out.is_correct = torch.arange(batch) % 2
    return out


def inference_batch(size, question, visual):
    return bm.attach_detections(bm.question_batch(question), visual, DIMS[size]["features"])


def _encoder(mode, d, tokens, objects):
    H, I, L = d["hidden"], d["intermediate"], d["layers"]
    n1 = objects + 1  # + [IMG]
    if mode == "single":
        core = L * bm.bert_layer(tokens + n1, H, I)
    else:  # both streams through the L blocks; blocks above L_s: objects cross-attend to the text's last layer
        core = L * (bm.bert_layer(tokens, H, I) + bm.bert_layer(n1, H, I)) \
            + (L - d["cross_start"]) * bm.cross_attention(n1, tokens, H)
    return core + 2 * objects * (d["features"] + 4) * H


def flops(size, mode):
    d = DIMS[size]
    H = d["hidden"]
    masked_t, masked_o = d["mask"] * d["tokens"], d["mask"] * d["regions"]
    heads = bm.mlm_decoder(masked_t, H, d["vocab"]) \
        + 2 * masked_o * (2 * H * H + H * d["features"] + H * d["classes"]) + 2 * H * H  # MLM, MRFR + MRC, pooler
    train = 3 * (_encoder(mode or "single", d, d["tokens"], d["regions"]) + heads)
    inference = _encoder(mode or "single", d, d["question"], d["regions"]) + bm.vqa_head(H, d["answers"])
    return {"train": train, "inference": inference}
