"""MVPTR's benchmark adapter for ``benchmarks/compare.py`` (the interface: ``methods/benchmarking.py``).

The pre-training step: the text encoder (L = 6 layers) over 35 tokens + 5 phrase slots, the visual
encoder (6 layers) over 20 tag slots + 50 regions, and the multimodal encoder (6 layers) over every
fused pair: the n matched pairs, a sampled negative per caption and the hard negatives WPG adds, about
2.5 n pairs (counted as 2.5 per sample); MCR, VSC, ITM, MLM and WPG on top. Reference: MMF's VisualBERT
(a 12-layer single-stream model of the same depth). Inference: the VQA head (3,129 answers) over a
16-token question + the detector's 20 most confident classes as tags + 100 regions.
"""
import torch

from mmf_multilevel.methods import benchmarking as bm
from mmf_multilevel.methods.mvptr import testing

REFERENCE = "visual_bert"
INPUT = "regions"
MODES = ("",)
INFERENCE_HEAD = "vqa"
CONCEPT_ROWS, ANSWERS = 86051, 3129
#: fused pairs per caption in a pre-training step (matched + sampled negative + WPG's hard negatives)
PAIRS_PER_SAMPLE = 2.5
DIMS = {
    "base": dict(hidden=768, intermediate=3072, stage=6, vocab=30522, rows=CONCEPT_ROWS, features=2048, tokens=35,
                 phrases=5, tags=20, regions=50, question=16, inference_regions=100, answers=ANSWERS,
                 mask=0.15, tag_mask=0.25),
    "tiny": dict(hidden=32, intermediate=64, stage=1, vocab=40, rows=44, features=testing.FEATURES, tokens=8,
                 phrases=2, tags=testing.TAGS, regions=testing.REGIONS, question=16, inference_regions=5,
                 answers=testing.ANSWERS, mask=0.25, tag_mask=0.2),
}


def model_config(size, mode, head_type):
    if size == "tiny":
        return testing.tiny_config(head_type)
    config = dict(bm.BASE_BERT, training_head_type=head_type, num_embeddings=CONCEPT_ROWS,
                  pretraining=dict(init_heads_from_bert=False))
    if head_type == "vqa":
        config.update(num_answers=ANSWERS, losses=[{"type": "logit_bce"}])
    return config


def describe_batch(size, batch):
    d = DIMS[size]
    return f"{batch} x ({d['tokens']} tokens + {d['phrases']} phrases, {d['tags']} tags, {d['regions']} regions)"


def synthetic_batch(batch, seed=0, dataset_type="train"):
    """An ``mvptr_captions``-like batch at base size: masked captions with 5 phrase slots, tags with MCR labels,
    regions with boxes, distinct images."""
    from mmf.common.sample import SampleList

    d = DIMS["base"]
    vocab, rows = d["vocab"], d["rows"]
    g = torch.Generator().manual_seed(seed)
    slots = d["tokens"] + d["phrases"]
    ids = torch.randint(1000, vocab, (batch, slots), generator=g)
    ids[:, 0], ids[:, slots - 1] = 101, 102
    phrases = torch.zeros(batch, slots, dtype=torch.long)
    phrases[:, d["tokens"] - 1:slots - 1] = 1
    ids[phrases.bool()] = torch.randint(vocab, rows, (int(phrases.sum()),), generator=g)
    labels = torch.full((batch, slots), -100)
    chosen = (torch.rand(batch, slots, generator=g) < d["mask"]) & ~phrases.bool()
    chosen[:, 0] = chosen[:, slots - 1] = False
    labels[chosen] = ids[chosen]
    ids[chosen] = 103
    tags = torch.randint(1000, vocab, (batch, d["tags"]), generator=g)
    tags[:, 0], tags[:, -1] = 101, 102
    mcr = torch.full((batch, d["tags"]), -100)
    picked = torch.rand(batch, d["tags"], generator=g) < d["tag_mask"]
    picked[:, 0] = picked[:, -1] = False
    mcr[picked] = tags[picked]
    tags[picked] = 103
    out = SampleList()
    out.input_ids, out.input_mask, out.segment_ids = ids, torch.ones_like(ids), torch.zeros_like(ids)
    out.lm_label_ids, out.phrase_slots = labels, phrases
    out.tag_ids, out.tag_mask, out.mcr_label_ids = tags, torch.ones_like(tags), mcr
    info = SampleList()
    regions = d["regions"]
    corner = torch.rand(batch, regions, 2, generator=g) * 300
    info.bbox = torch.cat([corner, corner + 20 + torch.rand(batch, regions, 2, generator=g) * 300], -1)
    info.image_width = torch.full((batch,), 640)
    info.image_height = torch.full((batch,), 640)
    info.max_features = torch.full((batch,), regions)
    out.image_feature_0, out.image_info_0 = torch.rand(batch, regions, d["features"], generator=g), info
    out.image_index = torch.arange(batch)
    out.dataset_name, out.dataset_type = "compare", dataset_type
    return out


def train_batch(size, batch, mode, seed=0):
    if size == "tiny":
        return testing.tiny_batch("pretraining", seed=seed)
    return synthetic_batch(batch, seed)


def inference_batch(size, question, visual):
    """The question, the regions and, as tags, ``[CLS]`` + the detector's classes of the first boxes (the most
    confident) mapped onto word ids + ``[SEP]``: what ``mvptr_vqa2`` reads."""
    d = DIMS[size]
    batch = bm.attach_detections(bm.question_batch(question), visual, d["features"])
    words = visual["labels"][: d["tags"] - 2] % (d["vocab"] - 5) + 5
    cls, sep = (2, 3) if size == "tiny" else (101, 102)
    tags = torch.cat([torch.tensor([cls]), words, torch.tensor([sep])])
    batch.tag_ids = torch.nn.functional.pad(tags, (0, d["tags"] - tags.numel()))[None]
    batch.tag_mask = (batch.tag_ids != 0).long()
    return batch


def flops(size, mode):
    d = DIMS[size]
    H, I, L = d["hidden"], d["intermediate"], d["stage"]
    text, visual = d["tokens"] + d["phrases"], d["tags"] + d["regions"]
    embed = 2 * d["regions"] * (d["features"] + 6) * H
    unimodal = L * (bm.bert_layer(text, H, I) + bm.bert_layer(visual, H, I)) + embed
    fused = PAIRS_PER_SAMPLE * L * bm.bert_layer(text + visual, H, I)
    heads = bm.mlm_decoder(d["mask"] * d["tokens"], H, d["rows"]) + bm.mlm_decoder(d["tag_mask"] * d["tags"], H, d["rows"])
    train = 3 * (unimodal + fused + heads)
    q_visual = d["tags"] + d["inference_regions"]
    inference = L * (bm.bert_layer(d["question"], H, I) + bm.bert_layer(q_visual, H, I)
                     + bm.bert_layer(d["question"] + q_visual, H, I)) \
        + 2 * d["inference_regions"] * (d["features"] + 6) * H + 2 * (H * H + 2 * H * H + 2 * H * d["answers"])
    return {"train": train, "inference": inference}
