"""VisualBERT grounding's benchmark adapter for ``benchmarks/compare.py`` (the interface:
``methods/benchmarking.py``).

MMF's VisualBERT encoder with a per-region scorer; its one head type (``classification``) is also its
training step: a RefCOCO+ expression (20 tokens) against 100 proposals, cross-entropy over the
proposals. Reference: MMF's VisualBERT (pre-training head). Inference: the scorer over a 16-token
expression + 100 detected regions (the best region is its answer).
"""
import torch

from mmf_multilevel.methods import benchmarking as bm
from mmf_multilevel.methods.testing import region_batch
from mmf_multilevel.methods.visual_bert_grounding import testing

REFERENCE = "visual_bert"
INPUT = "regions"
MODES = ("",)
INFERENCE_HEAD = "classification"
DIMS = {
    "base": dict(hidden=768, intermediate=3072, layers=12, features=2048, tokens=20, regions=100, question=16),
    "tiny": dict(hidden=32, intermediate=64, layers=2, features=testing.FEATURES, tokens=8, regions=testing.REGIONS,
                 question=16),
}


def model_config(size, mode, head_type):
    if size == "tiny":
        return testing.tiny_config(head_type)
    return dict(bm.BASE_BERT, training_head_type=head_type, random_initialize=True)


def describe_batch(size, batch):
    d = DIMS[size]
    return f"{batch} x ({d['tokens']} tokens + {d['regions']} regions)"


def train_batch(size, batch, mode, seed=0):
    if size == "tiny":
        return testing.tiny_batch("classification", seed=seed)
    d = DIMS[size]
    out = region_batch("compare", batch=batch, length=d["tokens"], num_regions=d["regions"], feature_dim=d["features"],
                       vocab_size=30522, seed=seed, num_classes=1600)
    out.targets = torch.arange(batch) % 3
    return out


def inference_batch(size, question, visual):
    return bm.attach_detections(bm.question_batch(question), visual, DIMS[size]["features"])


def flops(size, mode):
    d = DIMS[size]
    H, I, L = d["hidden"], d["intermediate"], d["layers"]

    def forward(tokens):
        regions = d["regions"]
        return L * bm.bert_layer(tokens + regions, H, I) + 2 * regions * d["features"] * H + 2 * regions * (H * H + H)

    return {"train": 3 * forward(d["tokens"]), "inference": forward(d["question"])}
