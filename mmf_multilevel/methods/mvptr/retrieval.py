"""MVPTR's retrieval inference (paper §4.2): two-stage ranking, and MVPTR-Uni (§4.3, Table 2).

The gallery's images and captions are each run through the uni-modal encoders **once**
(:func:`encode_gallery`); their VSC similarity ranks every caption for every image. Two-stage: for each
image the top ``k_c`` = 128 captions, for each caption the top ``k_i`` = 64 images are re-scored by the
multimodal encoder and the ITM head (a pair in both candidate lists is fused once, from the cached
uni-modal outputs); the others keep no score (ranked last). MVPTR-Uni: the VSC similarity alone, a
dual-encoder retriever with no multimodal pass. Scoring every pair with the multimodal encoder
(``--all-pairs``) is the cost the two stages avoid; ``mmf_run`` evaluation of a ``retrieval`` model does
that through the stock loop.
The encoders, the similarity and the re-ranking score are :class:`MVPTRDualEncoder` (the model's
``retrieval_encoders()``), which the predictor's retrieval (:mod:`mmf_multilevel.predict.retrieve`) ranks with
as well; there ``retrieval.uni`` of the config (``projects/mvptr/retrieval_uni.yaml``) chooses MVPTR-Uni.

    python -m mmf_multilevel.methods.mvptr.retrieval --config projects/mvptr/retrieval_coco.yaml \\
        --checkpoint save/mvptr_coco/mvptr_final.pth [--split test] [--uni | --all-pairs] [overrides ...]

prints R@1/5/10 of both directions and RSUM (``--out`` writes them as JSON).
"""
import argparse
import json
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from mmf_multilevel.evaluation.retrieval import rank_gallery as rank_scored_gallery
from mmf_multilevel.methods.dual_encoder import DualEncoder, concat_rows, select_rows

__all__ = ["MVPTRDualEncoder", "Gallery", "encode_gallery", "rank_gallery", "load_model", "main"]


class MVPTRDualEncoder(DualEncoder):
    """MVPTR's retrieval as a :class:`~mmf_multilevel.methods.dual_encoder.DualEncoder`: the uni-modal encoders'
    outputs (captions; tags + regions) and masks, the VSC similarity of their global vectors (paper §3.3, Eq. 1,
    scaled as in training), and the multimodal encoder's ITM log-odds over a pair (§3.3, Eq. 4). Two-stage
    (§4.2): the top ``retrieval.top_k_texts`` captions of an image and ``retrieval.top_k_images`` images of a
    caption re-scored; with ``retrieval.uni`` (MVPTR-Uni, §4.3) the similarity alone ranks."""

    def __init__(self, model):
        self.model = model
        r = model.settings.retrieval
        if r.uni:
            self.rerank = None
            self.description = "VSC similarity alone (MVPTR-Uni, MVPTR paper §4.3)"
        else:
            self.rerank = (int(r.top_k_texts), int(r.top_k_images))
            self.description = (f"VSC similarity, the top {r.top_k_texts} captions of an image / {r.top_k_images} "
                                "images of a caption re-ranked by the ITM log-odds (MVPTR paper §4.2)")

    def encode_texts(self, batch):
        from mmf_multilevel.methods.batch import text_inputs

        text = text_inputs(batch, "mvptr")
        return {"states": self.model.backbone.encode_text(text.input_ids, text.mask, text.segment_ids),
                "mask": text.mask}

    def encode_images(self, batch):
        from mmf_multilevel.methods.batch import region_inputs

        regions = region_inputs(batch, "mvptr", self.model.settings.feature_dim, "6d")
        visual, mask = self.model.backbone.encode_visual(batch.tag_ids, batch.tag_mask, regions.features,
                                                         regions.boxes, regions.mask)
        return {"states": visual, "mask": mask}

    def similarity(self, images, texts):
        from mmf_multilevel.methods.mvptr.losses import vsc_scale

        net = self.model.backbone
        g_t, g_v = net.global_embeddings(texts["states"], images["states"])
        return (g_v @ g_t.t()) * vsc_scale(net.logit_scale, self.model.settings.pretraining.vsc_max_logit_scale)

    def match(self, images, texts):
        model = self.model
        head = model.itm_head if hasattr(model, "itm_head") else model.heads.itm
        _, pooled, _ = model.backbone.fuse(texts["states"], texts["mask"], images["states"], images["mask"])
        logits = head(pooled).float()
        return logits[:, 1] - logits[:, 0]


@dataclass
class Gallery:
    """A retrieval split through the uni-modal encoders (:class:`MVPTRDualEncoder`): captions (``states`` ``(T,
    40, H)`` and their ``mask``), images (tags + regions, ``states`` ``(I, 20 + K, H)`` and their ``mask``), the
    VSC similarity ``(I, T)`` (scaled) and the ground truth ``(I, T)``."""

    texts: Dict[str, torch.Tensor]
    images: Dict[str, torch.Tensor]
    similarity: torch.Tensor
    gt: torch.Tensor


@torch.no_grad()
def encode_gallery(model, dataset, batch_size: int = 64) -> Gallery:
    """Every image and every caption of ``dataset`` (an ``mvptr_*_retrieval`` split) through the
    uni-modal encoders of ``model`` (an ``mvptr`` model), once each."""
    from mmf.common.sample import Sample, SampleList

    encoder = MVPTRDualEncoder(model)
    device = next(model.backbone.parameters()).device
    texts = []
    for start in range(0, dataset.num_texts, batch_size):
        batch = SampleList([Sample(dict(dataset._text(t))) for t in range(start, min(start + batch_size, dataset.num_texts))])
        texts.append(encoder.encode_texts(batch.to(device)))
    images = []
    for start in range(0, dataset.num_images, batch_size):
        samples = []
        for index in range(start, min(start + batch_size, dataset.num_images)):
            sample = Sample()
            dataset.attach_visual(sample, dataset.records[index]["image_id"])
            dataset.add_tags(sample)
            samples.append(sample)
        images.append(encoder.encode_images(SampleList(samples).to(device)))
    texts, images = concat_rows(texts), concat_rows(images)
    similarity = encoder.similarity(images, texts)
    return Gallery(texts, images, similarity.cpu(), dataset.ground_truth())


def match_function(model, gallery: Gallery):
    """``(image_idx, text_idx) -> ITM log-odds`` of those pairs, fused from the cached uni-modal outputs."""
    encoder = MVPTRDualEncoder(model)

    @torch.no_grad()
    def match(image_idx, text_idx):
        return encoder.match(select_rows(gallery.images, image_idx), select_rows(gallery.texts, text_idx))

    return match


def rank_gallery(model, gallery: Gallery, mode: str = "two_stage", k_texts: int = 128, k_images: int = 64,
                 chunk_size: int = 256) -> Dict[str, float]:
    """R@1/5/10 both ways and RSUM of ``mode``: ``two_stage`` (VSC top-k re-ranked by ITM), ``uni``
    (MVPTR-Uni: VSC alone) or ``all_pairs`` (ITM on every pair); plus ``pairs_fused`` and ``seconds``."""
    if mode not in ("two_stage", "uni", "all_pairs"):
        raise ValueError(f"mode must be two_stage, uni or all_pairs, got {mode!r}")
    return rank_scored_gallery(gallery.similarity, gallery.gt, match_function(model, gallery),
                               "similarity" if mode == "uni" else mode, k_texts, k_images, chunk_size)


def load_model(config, checkpoint: Optional[str]):
    """The config's ``mvptr`` model as MMF builds it, with ``checkpoint``'s weights (strict), in eval mode."""
    from mmf_multilevel.methods.base import load_method_model

    return load_method_model(config, "mvptr", checkpoint)


def build_split(config, split: str):
    """The config's first dataset (an ``mvptr_*_retrieval``), ``split`` of it, processors ready."""
    from mmf.common.registry import registry

    from mmf_multilevel.datasets.base import init_fresh_processors

    name = str(config.datasets).split(",")[0].strip()
    builder = registry.get_builder_class(name)
    if builder is None or not name.startswith("mvptr_") or not name.endswith("_retrieval"):
        raise ValueError(f"datasets: {name!r} is not an MVPTR retrieval dataset (mvptr_coco_retrieval, "
                         "mvptr_flickr30k_retrieval)")
    dataset = builder.dataset_class(name, config.dataset_config[name], split)
    return init_fresh_processors(dataset)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.mvptr.retrieval",
                                     description="MVPTR retrieval: two-stage inference (paper §4.2) or MVPTR-Uni.")
    parser.add_argument("--config", required=True, help="an mvptr retrieval project (projects/mvptr/retrieval_*.yaml)")
    parser.add_argument("--checkpoint", default=None, help="the model's weights (.pth / .ckpt); none: as built")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--uni", action="store_true", help="MVPTR-Uni: the VSC similarity alone")
    group.add_argument("--all-pairs", action="store_true", help="the multimodal ITM score of every pair")
    parser.add_argument("--top-k-texts", type=int, default=None, help="k_c (default model_config.mvptr.retrieval)")
    parser.add_argument("--top-k-images", type=int, default=None, help="k_i (default model_config.mvptr.retrieval)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the metrics here as JSON")
    parser.add_argument("opts", nargs="*", help="config overrides, as for mmf_run (env.data_dir=...)")
    args = parser.parse_args(argv)
    from mmf_multilevel.compat.launcher import load_run_config

    try:
        config = load_run_config(args.config, args.opts)
        model = load_model(config, args.checkpoint)
        dataset = build_split(config, args.split)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    r = model.settings.retrieval
    mode = "uni" if args.uni else "all_pairs" if args.all_pairs else "two_stage"
    gallery = encode_gallery(model, dataset, args.batch_size)
    metrics = rank_gallery(model, gallery, mode, args.top_k_texts or r.top_k_texts, args.top_k_images or r.top_k_images)
    print(f"{mode} on {dataset.num_images} images x {dataset.num_texts} captions ({metrics['pairs_fused']} pairs fused, "
          f"{metrics['seconds']:.1f} s)")
    print("  ".join(f"{key} {metrics[key]:.2f}" for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"mode": mode, **metrics}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
