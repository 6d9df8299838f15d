"""What ``benchmarks/compare.py`` needs from every method: its ``benchmark.py``, and the helpers those share.

Each method folder has a ``benchmark.py`` beside its ``testing.py``, so that a method stays one folder
read top to bottom: what it builds, how it is tested, and how it is measured. ``compare.py`` finds a
method by its folder (:func:`mmf_multilevel.methods.method_names`) and fails, naming the method, when
the folder has no ``benchmark.py``. A ``benchmark.py`` defines:

* ``REFERENCE``: the reference model each of its rows is divided by (``visual_bert``, ``lxmert``,
  ``albef``; see ``benchmarks/compare_references.py``);
* ``INPUT``: ``"regions"`` (region features from this project's BUTD R101-C4 detector) or ``"pixels"``;
* ``MODES``: the names of its modes (``("",)`` for a method with one);
* ``INFERENCE_HEAD``: the head type its inference rows run (the VQA head where it has one);
* ``model_config(size, mode, head_type)``: overrides of its ``defaults.yaml`` for a randomly
  initialised model at ``size`` (``base``: the paper's; ``tiny``: ``testing.tiny_config``), downloading
  nothing;
* ``train_batch(size, batch, mode)``: a pre-training batch of ``batch`` samples (``tiny``: its
  ``testing.tiny_batch``, whose size is fixed) and ``describe_batch(size, batch)``, the words for it;
* ``inference_batch(size, question, visual)``: the one-sample batch its inference head reads, from a
  tokenised question and what the pipeline's extraction / preprocessing stages gave (:func:`detections`
  or pixels);
* ``flops(size, mode)``: analytic FLOPs per sample, ``{"train": ..., "inference": ...}`` (see
  :data:`FLOP_RULE`).
"""
import importlib
import os
from typing import Dict

import torch

__all__ = ["FLOP_RULE", "BASE_BERT", "SIZES", "adapter", "build", "bert_layer", "cross_attention", "encoder",
           "mlm_decoder", "vqa_head", "question_batch", "detections", "attach_detections", "attach_pixels",
           "lm_labels", "vocab_folder"]

FLOP_RULE = ("FLOPs = 2 x multiply-adds of the matrix products (linear layers, attention products, convolutions); "
             "per sample; training = 3 x the forward of every pass with gradients (backward = 2 x forward) "
             "+ 1 x each pass without (momentum teachers, tokenisers)")
SIZES = ("base", "tiny")
#: BERT-base, random weights (``bert_model_name: null``: nothing downloaded)
BASE_BERT = dict(bert_model_name=None, vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)


def adapter(name: str):
    """The ``benchmark`` module of method ``name``; a clear error when the method has none."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(os.path.join(here, name, "benchmark.py")):
        raise LookupError(f"method {name!r} is registered but has no benchmark adapter "
                          f"(mmf_multilevel/methods/{name}/benchmark.py; see mmf_multilevel/methods/benchmarking.py)")
    return importlib.import_module(f"mmf_multilevel.methods.{name}.benchmark")


def build(name: str, overrides: Dict, seed: int = 0):
    """The registered model ``name`` from its ``defaults.yaml`` + ``overrides``, built as MMF builds it."""
    from mmf.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_model_class(name)
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config[name], overrides)
    torch.manual_seed(seed)
    model = cls(config)
    model.build()
    model.init_losses()
    return model


# --------------------------------------------------------------------------- analytic FLOPs (forward)
def bert_layer(length: int, hidden: int, intermediate: int, kv: int = None) -> int:
    """One transformer block over ``length`` tokens: Q, K, V, output projections, the two attention products
    and the feed-forward network (``kv``: the keys' length when it differs, e.g. a masked-out memory)."""
    kv = length if kv is None else kv
    return 2 * (4 * length * hidden * hidden + 2 * length * kv * hidden + 2 * length * hidden * intermediate)


def cross_attention(length: int, memory: int, hidden: int, memory_width: int = None) -> int:
    """A cross-attention module: Q and output projections on ``length`` tokens, K and V on ``memory`` tokens
    of ``memory_width`` (default ``hidden``), the two attention products."""
    memory_width = hidden if memory_width is None else memory_width
    return 2 * (2 * length * hidden * hidden + 2 * memory * memory_width * hidden + 2 * length * memory * hidden)


def encoder(length: int, layers: int, hidden: int = 768, intermediate: int = 3072) -> int:
    return layers * bert_layer(length, hidden, intermediate)


def mlm_decoder(masked: float, hidden: int, vocab: int) -> float:
    """The MLM head on ``masked`` positions: the transform (H x H) and the decoder to the vocabulary."""
    return 2 * masked * (hidden * hidden + hidden * vocab)


def vqa_head(hidden: int, answers: int) -> int:
    """The pooler and MMF/LXMERT's VQA head: H -> H, H -> 2H, 2H -> answers."""
    return 2 * (hidden * hidden + hidden * 2 * hidden + 2 * hidden * answers)


# --------------------------------------------------------------------------- batches
def question_batch(ids: torch.Tensor, dataset_name: str = "compare", dataset_type: str = "test"):
    """A batch holding tokenised texts ``ids`` (``B x T``, no padding) as the datasets give them."""
    from mmf.common.sample import SampleList

    batch = SampleList()
    batch.input_ids = ids
    batch.input_mask = torch.ones_like(ids)
    batch.segment_ids = torch.zeros_like(ids)
    batch.dataset_name, batch.dataset_type = dataset_name, dataset_type
    return batch


def detections(features: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
               labels: torch.Tensor = None) -> Dict:
    """What the extraction stage hands a region method for one image: ``features`` ``(N, D)``, ``boxes``
    ``(N, 4)`` in pixels (x1, y1, x2, y2), the image size and the detector's class of each box."""
    if labels is None:
        labels = torch.zeros(features.size(0), dtype=torch.long)
    return {"features": features, "boxes": boxes, "height": height, "width": width, "labels": labels}


def attach_detections(batch, found: Dict, feature_dim: int):
    """``image_feature_0`` / ``image_info_0`` of one image from :func:`detections` (MMF's feature-cache
    layout). A feature width other than the model's (tiny models) keeps the first ``feature_dim`` channels."""
    from mmf.common.sample import SampleList

    features = found["features"].float()
    if features.size(-1) != feature_dim:
        features = features[:, :feature_dim]
    info = SampleList()
    info.bbox = found["boxes"].float()[None]
    info.image_width = torch.tensor([found["width"]])
    info.image_height = torch.tensor([found["height"]])
    info.max_features = torch.tensor([features.size(0)])
    info.objects = found["labels"][None]
    batch.image_feature_0, batch.image_info_0 = features[None], info
    return batch


def attach_pixels(batch, pixels: torch.Tensor, field: str = "image"):
    """A preprocessed ``(1, 3, H, W)`` image as the image datasets give it (``image``, ``image_size``)."""
    batch[field] = pixels
    batch[f"{field}_size"] = torch.tensor([list(pixels.shape[-2:])])
    return batch


def lm_labels(ids: torch.Tensor, generator: torch.Generator, prob: float = 0.15, mask_id: int = 103,
              ignore: int = -1):
    """``(masked ids, labels)``: ``prob`` of each text's positions between [CLS] and [SEP] (at least one)
    replaced by ``mask_id``, their ids as labels, ``ignore`` elsewhere."""
    chosen = torch.rand(ids.shape, generator=generator) < prob
    chosen[:, 0] = chosen[:, -1] = False
    chosen[:, 1] |= ~chosen.any(1)
    labels = torch.where(chosen, ids, torch.full_like(ids, ignore))
    return ids.masked_fill(chosen, mask_id), labels


def vocab_folder(folder: str, size: int = 30522, answers: int = 0) -> Dict:
    """A BERT-uncased-like tokenizer folder (``[PAD] [unused..] [UNK] [CLS] [SEP] [MASK]`` at BERT's ids, the
    other entries made-up words) and, with ``answers``, an answer list of that many one- or two-word
    answers: what a base-size generative head needs without downloading a tokenizer."""
    import json

    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    words = [special.get(i, f"[unused{i}]" if i < 999 else f"w{i}") for i in range(size)]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(words) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, handle)
    out = {"tokenizer": folder}
    if answers:
        path = os.path.join(folder, "answers.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(f"w{1000 + i}" if i % 3 else f"w{1000 + i} w{2000 + i}" for i in range(answers)) + "\n")
        out["answer_list"] = path
    return out
