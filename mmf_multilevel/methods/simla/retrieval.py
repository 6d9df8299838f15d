"""SIMLA's retrieval inference (paper §3.6: the unimodal encoders retrieve the top-k candidates of a query,
the multimodal encoder re-ranks them), fine-tuned or zero-shot.

The gallery's images go through the ViT once and its captions through the BERT in text mode once
(:func:`encode_gallery`); the cosine of their projected [CLS] features (``f_v · f_t``, no temperature, as
the official ``Retrieval.py``) ranks every caption for every image and every image for every caption.
Two-stage (the default): each query's top ``k`` candidates (``model_config.simla.k_test``; the official
256 for COCO, 128 for Flickr30K) are re-scored by the multimodal BERT reading the cached image tokens and
the ITM head's "match" logit; the others are ranked last. ``--itc-only``: the ITC similarity alone (no
multimodal pass). ``--all-pairs``: the ITM score of every pair, what ``mmf_run`` evaluation of a
``retrieval`` model with ``eval_pairs: all`` computes through the stock loop. The encoders, the similarity and
the re-ranking score are :class:`SIMLADualEncoder` (the model's ``retrieval_encoders()``), which the predictor's
retrieval over a folder of images (:mod:`mmf_multilevel.predict.retrieve`) ranks with as well.

    python -m mmf_multilevel.methods.simla.retrieval --config projects/simla/retrieval_coco.yaml \\
        --checkpoint save/simla_coco/simla_final.pth [--split test] [--itc-only | --all-pairs] [--k 256] \\
        [overrides ...]

Zero-shot: the same command on a pre-training checkpoint (``projects/simla/zero_shot_flickr.yaml``); a
pre-training model has the ITM head too, and both head types hold the same modules. Prints R@1/5/10 of
both directions and RSUM (``--out`` writes them as JSON).
"""
import argparse
import json
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from mmf_multilevel.evaluation.retrieval import rank_gallery as rank_scored_gallery
from mmf_multilevel.methods.dual_encoder import DualEncoder, concat_rows, select_rows

__all__ = ["SIMLADualEncoder", "Gallery", "encode_gallery", "rank_gallery", "load_model", "build_split", "main",
           "DATASETS", "HEAD_TYPES"]

#: the raw-image retrieval datasets this command ranks
DATASETS = ("coco_retrieval_images", "flickr30k_retrieval_images")
#: the SIMLA models it accepts: fine-tuned, or pre-trained (zero-shot)
HEAD_TYPES = ("retrieval", "pretraining")


class SIMLADualEncoder(DualEncoder):
    """SIMLA's retrieval (paper §3.6) as a :class:`~mmf_multilevel.methods.dual_encoder.DualEncoder`: the ViT's
    image tokens and the normalised projected image [CLS] ``g_v``; the caption's ids, mask and ``g_l`` (the BERT
    in text mode); the ITC similarity ``g_v · g_l`` (no temperature, as the official ``Retrieval.py``); the
    multimodal BERT over the image tokens and the ITM head's "match" logit; the top ``k_test`` re-ranked both
    ways. Both head types it ranks with (:data:`HEAD_TYPES`) hold these modules."""

    def __init__(self, model):
        self.model = model
        k = int(model.settings.k_test)
        self.rerank = (k, k)
        self.description = f"ITC similarity, the top {k} re-ranked by the ITM match logit (SIMLA paper §3.6)"

    def encode_images(self, batch):
        from mmf_multilevel.methods.batch import pixel_inputs

        embeds = self.model.backbone.image_encoder(pixel_inputs(batch, "simla").pixels)
        return {"embeds": embeds, "feature": self.model.heads.image_feature(embeds[:, 0])}

    def encode_texts(self, batch):
        from mmf_multilevel.methods.batch import text_inputs

        text = text_inputs(batch, "simla")
        states = self.model.backbone.text_encoder.encode_text(text.input_ids, text.mask)
        return {"input_ids": text.input_ids, "mask": text.mask, "feature": self.model.heads.text_feature(states[:, 0])}

    def similarity(self, images, texts):
        return images["feature"] @ texts["feature"].t()

    def match(self, images, texts):
        from mmf_multilevel.methods.simla.losses import ITM_MATCH

        fused = self.model.backbone.text_encoder.fuse(texts["input_ids"], texts["mask"], images["embeds"])
        return self.model.heads.itm_logits(fused[:, 0])[:, ITM_MATCH].float()


@dataclass
class Gallery:
    """A retrieval split through the unimodal encoders: the captions' and the images' embeddings
    (:class:`SIMLADualEncoder`: ids, masks and ``g_l``; the image tokens ``(I, 1 + N, H)``, the cross-attention
    memory, and ``g_v``), the ITC similarity ``(I, T)`` and the ground truth ``(I, T)``."""

    texts: Dict[str, torch.Tensor]
    images: Dict[str, torch.Tensor]
    similarity: torch.Tensor
    gt: torch.Tensor


@torch.no_grad()
def encode_gallery(model, dataset, batch_size: int = 64) -> Gallery:
    """Every image of ``dataset`` (a ``*_retrieval_images`` split) through the ViT and every caption through
    the BERT in text mode, once each (:class:`SIMLADualEncoder`); their normalised projected [CLS] features give
    the similarity."""
    from mmf.common.sample import Sample, SampleList

    device = next(model.parameters()).device
    encoder = SIMLADualEncoder(model)
    texts = []
    for start in range(0, dataset.num_texts, batch_size):
        stop = min(start + batch_size, dataset.num_texts)
        batch = SampleList([Sample(dict(dataset._text(t))) for t in range(start, stop)])
        texts.append(encoder.encode_texts(batch.to(device)))
    images = []
    for start in range(0, dataset.num_images, batch_size):
        samples = []
        for index in range(start, min(start + batch_size, dataset.num_images)):
            sample = Sample()
            dataset.attach_visual(sample, dataset.records[index]["image_id"])
            samples.append(sample)
        images.append(encoder.encode_images(SampleList(samples).to(device)))
    texts, images = concat_rows(texts), concat_rows(images)
    similarity = encoder.similarity(images, texts)
    return Gallery(texts, images, similarity.float().cpu(), dataset.ground_truth())


def match_function(model, gallery: Gallery):
    """``(image_idx, text_idx) -> ITM match logit`` of those pairs (the official re-ranking score
    ``itm_head(...)[:, 1]``), the multimodal BERT reading the cached image tokens."""
    encoder = SIMLADualEncoder(model)

    @torch.no_grad()
    def match(image_idx, text_idx):
        return encoder.match(select_rows(gallery.images, image_idx), select_rows(gallery.texts, text_idx))

    return match


def rank_gallery(model, gallery: Gallery, mode: str = "two_stage", k: int = 256,
                 chunk_size: int = 256) -> Dict[str, float]:
    """R@1/5/10 both ways and RSUM of ``mode``: ``two_stage`` (ITC top-``k`` of each query re-ranked by ITM),
    ``itc`` (the ITC similarity alone) or ``all_pairs`` (ITM on every pair); plus ``pairs_fused`` and
    ``seconds``."""
    if mode not in ("two_stage", "itc", "all_pairs"):
        raise ValueError(f"mode must be two_stage, itc or all_pairs, got {mode!r}")
    return rank_scored_gallery(gallery.similarity, gallery.gt, match_function(model, gallery),
                               "similarity" if mode == "itc" else mode, k, None, chunk_size)


def load_model(config, checkpoint: Optional[str]):
    """The config's ``simla`` model (head type ``retrieval`` or ``pretraining``) as MMF builds it, with
    ``checkpoint``'s weights (strict; either head type's checkpoint fits either), in eval mode."""
    from mmf_multilevel.methods.base import load_method_model

    if config.get("model") == "simla":
        head_type = config.model_config.simla.get("training_head_type")
        if head_type not in HEAD_TYPES:
            raise ValueError(f"model_config.simla.training_head_type is {head_type!r}; this command ranks with "
                             f"one of {list(HEAD_TYPES)}")
    return load_method_model(config, "simla", checkpoint)


def build_split(config, split: str):
    """The config's first dataset (``coco_retrieval_images`` or ``flickr30k_retrieval_images``), ``split``
    of it as a gallery (``eval_pairs: all``), processors ready."""
    from mmf.common.registry import registry
    from omegaconf import open_dict

    from mmf_multilevel.datasets.base import init_fresh_processors

    name = str(config.datasets).split(",")[0].strip()
    if name not in DATASETS:
        raise ValueError(f"datasets: {name!r} is not a raw-image retrieval dataset ({', '.join(DATASETS)})")
    builder = registry.get_builder_class(name)
    dataset_config = config.dataset_config[name]
    with open_dict(dataset_config):
        dataset_config.eval_pairs = "all"
    dataset = builder.dataset_class(name, dataset_config, split)
    return init_fresh_processors(dataset)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.simla.retrieval",
                                     description="SIMLA retrieval: ITC top-k re-ranked by ITM (paper §3.6).")
    parser.add_argument("--config", required=True,
                        help="a simla retrieval project (projects/simla/retrieval_*.yaml, zero_shot_flickr.yaml)")
    parser.add_argument("--checkpoint", default=None,
                        help="the model's weights (.pth / .ckpt), fine-tuned or pre-trained; none: as built")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--itc-only", action="store_true", help="the ITC similarity alone, no multimodal pass")
    group.add_argument("--all-pairs", action="store_true", help="the ITM score of every pair")
    parser.add_argument("--k", type=int, default=None, help="candidates re-ranked per query (default "
                        "model_config.simla.k_test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the metrics here as JSON")
    parser.add_argument("opts", nargs="*", help="config overrides, as for mmf_run (env.data_dir=...)")
    args = parser.parse_args(argv)
    from mmf_multilevel.compat.launcher import load_run_config

    try:
        config = load_run_config(args.config, args.opts)
        model = load_model(config, args.checkpoint).to(args.device)
        dataset = build_split(config, args.split)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mode = "itc" if args.itc_only else "all_pairs" if args.all_pairs else "two_stage"
    k = int(args.k or model.settings.k_test)
    gallery = encode_gallery(model, dataset, args.batch_size)
    metrics = rank_gallery(model, gallery, mode, k)
    print(f"{mode}{f' (k {k})' if mode == 'two_stage' else ''} on {dataset.num_images} images x "
          f"{dataset.num_texts} captions ({metrics['pairs_fused']} pairs fused, {metrics['seconds']:.1f} s)")
    print("  ".join(f"{key} {metrics[key]:.2f}" for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10",
                                                           "rsum")))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"mode": mode, "k": k, **metrics}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
