"""μ-VLA's benchmark adapter for ``benchmarks/compare.py`` (the interface: ``methods/benchmarking.py``).

The pre-training step is an image-sentence batch (MLM on the matched pairs, masked-region feature
regression, ITM) through the single-stream BERT over ``[text ; regions]``. Reference: MMF's VisualBERT,
the single-stream model μ-VLA starts from. Inference: the VQA head (``classification``, 3,129 answers)
over a 16-token question + 100 detected regions.
"""
import torch

from mmf_multilevel.methods import benchmarking as bm
from mmf_multilevel.methods.muvla import testing
from mmf_multilevel.methods.muvla.network import TASK_IDS
from mmf_multilevel.methods.testing import masked_regions, region_batch

REFERENCE = "visual_bert"
INPUT = "regions"
MODES = ("",)
INFERENCE_HEAD = "classification"
ANSWERS = 3129
DIMS = {
    "base": dict(hidden=768, intermediate=3072, layers=12, vocab=30522, features=2048, tokens=20, regions=100,
                 question=16, answers=ANSWERS, mask=0.15),
    "tiny": dict(hidden=32, intermediate=64, layers=2, vocab=40, features=testing.FEATURES, tokens=8,
                 regions=testing.REGIONS, question=16, answers=testing.LABELS, mask=0.25),
}


def model_config(size, mode, head_type):
    if size == "tiny":
        return testing.tiny_config(head_type)
    config = dict(bm.BASE_BERT, training_head_type=head_type, pretraining=dict(init_heads_from_bert=False))
    if head_type == "classification":
        config.update(num_labels=ANSWERS, losses=[{"type": "logit_bce"}])
    return config


def describe_batch(size, batch):
    d = DIMS[size]
    return f"{batch} x ({d['tokens']} tokens + {d['regions']} regions)"


def train_batch(size, batch, mode, seed=0):
    if size == "tiny":
        return testing.tiny_batch("pretraining", seed=seed)
    d = DIMS[size]
    g = torch.Generator().manual_seed(seed)
    out = region_batch("compare", batch=batch, length=d["tokens"], num_regions=d["regions"], feature_dim=d["features"],
                       vocab_size=d["vocab"], seed=seed, num_classes=1600)
    out.muvla_task = torch.full((batch,), TASK_IDS["image_sentence"])
    out.is_correct = torch.arange(batch) % 2
    out.input_ids, labels = bm.lm_labels(out.input_ids, g)
    out.lm_label_ids = labels.masked_fill((out.input_mask == 0) | (out.is_correct == 0).view(-1, 1), -1)
    masked_regions(out, prob=0.15, seed=seed + 1)
    return out


def inference_batch(size, question, visual):
    return bm.attach_detections(bm.question_batch(question), visual, DIMS[size]["features"])


def flops(size, mode):
    d = DIMS[size]
    H, I, L = d["hidden"], d["intermediate"], d["layers"]
    visual = 2 * d["regions"] * (d["features"] + 5) * H
    # MLM on the matched half of the pairs, MRFR on the masked regions, ITM on the pooled state
    heads = bm.mlm_decoder(0.5 * d["mask"] * d["tokens"], H, d["vocab"]) \
        + 2 * d["mask"] * d["regions"] * (H * H + H * d["features"]) + 2 * H * H
    train = 3 * (L * bm.bert_layer(d["tokens"] + d["regions"], H, I) + visual + heads)
    inference = L * bm.bert_layer(d["question"] + d["regions"], H, I) + visual + bm.vqa_head(H, d["answers"])
    return {"train": train, "inference": inference}
