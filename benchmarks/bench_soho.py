"""SOHO's speed: end-to-end VQA inference against the region pipeline (paper §4.5), and the pre-training step.

    python benchmarks/bench_soho.py flops                    # analytic FLOPs per stage only (instant)
    python benchmarks/bench_soho.py inference [--repeats 3] [--precisions fp32,bf16]
    python benchmarks/bench_soho.py training [--rounds 1] [--steps 3] [--precisions fp32,bf16]

``inference`` (§4.5's setting): one 600 x 1000 image and a 16-token question -> VQA scores (3,129
answers), batch 1, no gradient, random weights (the cost does not depend on the values), each stage
timed on its own, both pipelines in the same process, alternating repeat by repeat (region, SOHO,
region, SOHO, ...) so that a change in the machine's load falls on both; medians are reported.

* ``region`` - this project's region pipeline: the BUTD Faster R-CNN R101-C4 of the feature
  extractor (``mmf_multilevel.extraction``: backbone to C4, RPN with 300 proposals, the dilated res5
  box head on every proposal, then bottom-up attention's per-class NMS over all 1,600 classes keeping
  100 boxes), and a 12-layer BERT-base single-stream transformer over 16 words + 100 regions (μ-VLA's
  network) with the VQA head. The attribute head, which the cache stores but VQA does not read, is
  left out.
* ``soho`` - SOHO's two stages: the ResNet-101 grid encoder (C5, 1x1 conv, 2x2 max-pool: 10 x 16 =
  160 cells) and the same 12-layer transformer over 16 words + 160 cells with the same VQA head. As
  fine-tuned models do (§4.2), the transformer reads the features before the visual dictionary.

Both pipelines' CNNs run in the same memory layout (``--layout``; SOHO's default is channels_last,
see ``GridEncoder``) and precision; the analytic FLOPs are printed beside each stage.

``training``: one pre-training update of the full-size model (ResNet-101, BERT-base, k = 2,048) on
2 images x 4 texts (two matched, two mismatched, §4.1) at 600 x 1000 with 40-token texts: MLM + MVM +
ITM, backward, the dictionary update and the method's own SGD + AdamW step. Reference in the same run:
the same update with the CNN run once per text instead of once per image (the 8 pairs given 8 copies
of their images), which is what a pair-per-sample pipeline does. Each configuration runs in its own
process (peak RSS is its own).

FLOPs are analytic (2 x multiply-adds of the convolutions, linear layers and attention products;
training = 3 x forward); ``tests/core/test_benchmarks.py`` checks the formulas against
``torch.utils.flop_counter`` on the real modules.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

from bench_extract import ANALYTIC, c4_flops
from training_bench import add_run_options, child_options, peak_rss_mib, run_rounds, step_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmf_multilevel.methods.soho.benchmark import (  # noqa: E402  (the analytic cost lives beside the method)
    encoder_flops,
    resnet_flops,  # noqa: F401  (tests read it here)
    soho_inference_flops,
    soho_training_flops,
    vqa_head_flops,
)

H, I, LAYERS, ANSWERS = 768, 3072, 12, 3129
IMAGE = (600, 1000)
QUESTION, REGIONS, PROPOSALS = 16, 100, 300



# --------------------------------------------------------------------------- analytic cost
def region_inference_flops(height=IMAGE[0], width=IMAGE[1], words=QUESTION, regions=REGIONS, proposals=PROPOSALS):
    detector = c4_flops(**ANALYTIC["butd_r101"], height=height, width_px=width, proposals=proposals)
    return {
        "backbone": detector["backbone"],
        "rpn": detector["rpn"],
        "box_head": detector["res5_head"] + detector["predictor"],
        "selection": 0,  # NMS: comparisons, no multiply-adds
        "transformer": encoder_flops(words + regions) + 2 * regions * (2048 + 5) * H + vqa_head_flops(),
    }


# --------------------------------------------------------------------------- inference
def build_inference_models(channels_last=True):
    import torch
    from transformers import BertConfig

    from mmf_multilevel.extraction import detectors
    from mmf_multilevel.methods.muvla.network import MuVLANetwork
    from mmf_multilevel.methods.soho.network import SOHONetwork
    from mmf_multilevel.modules.heads import VQAHead
    from mmf_multilevel.modules.text import BertTextEncoder

    torch.manual_seed(0)
    cfg = detectors.load_config("butd_r101")
    detector = detectors.build_random_detector(cfg, seed=0).eval()
    if channels_last:
        detector.to(memory_format=torch.channels_last)
    region = MuVLANetwork(BertTextEncoder.from_config(BertConfig()), 2048).eval()
    region_head = VQAHead(H, ANSWERS).eval()
    soho = SOHONetwork(BertTextEncoder.from_config(BertConfig()), backbone="resnet101", pretrained_backbone=False,
                       channels_last=channels_last).eval()
    soho_head = VQAHead(H, ANSWERS).eval()
    return detector, (region, region_head), (soho, soho_head)


def make_inputs():
    """A smooth random 600 x 1000 picture (BGR 0-255 for the caffe detector, ImageNet-normalised RGB for
    SOHO) and a 16-token question."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, IMAGE[0] // 20, IMAGE[1] // 20, generator=g)
    rgb = F.interpolate(coarse, size=IMAGE, mode="bilinear", align_corners=False)[0]  # [0, 1]
    bgr = rgb.flip(0) * 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = ((rgb - mean) / std)[None]
    question = torch.randint(1000, 30522, (1, QUESTION), generator=g)
    question[0, 0], question[0, -1] = 101, 102
    return bgr, pixels, question, torch.ones(1, QUESTION, dtype=torch.long)


def _timed(times, name, fn):
    start = time.perf_counter()
    out = fn()
    times[name] = time.perf_counter() - start
    return out


def run_region(detector, region, bgr, question, text_mask, precision, channels_last=True):
    """The region pipeline on one image; stage name -> seconds, and the number of proposals."""
    import torch

    from mmf_multilevel.extraction.extractor import select_regions

    network, head = region
    times = {}
    with torch.no_grad(), _autocast(precision):
        def backbone():
            batch = detector.preprocess_image([{"image": bgr}])
            pixels = batch.tensor.contiguous(memory_format=torch.channels_last) if channels_last else batch.tensor
            return batch, detector.backbone(pixels)

        batch, features = _timed(times, "backbone", backbone)
        proposals, _ = _timed(times, "rpn", lambda: detector.proposal_generator(batch, features, None))
        boxes = [p.proposal_boxes for p in proposals]
        pooled, cls_prob = _timed(times, "box_head", lambda: detector.roi_heads.region_outputs(features, boxes))

        def selection():
            box_tensor = boxes[0].tensor.float()
            chosen, _ = select_regions(box_tensor, cls_prob, REGIONS, REGIONS, 0.2, 0.3)
            return pooled[chosen], box_tensor[chosen]

        feats, kept = _timed(times, "selection", selection)

        def transformer():
            height, width = IMAGE
            scale = kept.new_tensor([width, height, width, height])
            xyxy = kept / scale
            area = ((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]))[:, None]
            region_boxes = torch.cat([xyxy, area], 1)[None]
            out = network(question, text_mask, feats[None].float(), region_boxes,
                          torch.ones(1, feats.size(0), dtype=torch.long))
            return head(out["pooled"])

        scores = _timed(times, "transformer", transformer)
    assert scores.shape == (1, ANSWERS), scores.shape
    return times, len(proposals[0]), feats.size(0)


def run_soho(soho, pixels, question, text_mask, precision):
    import torch

    network, head = soho
    times = {}
    with torch.no_grad(), _autocast(precision):
        image = _timed(times, "cnn", lambda: network.encode_image(pixels, quantise=False))

        def transformer():
            out = network.joint(question, text_mask, image["visual"], image["mask"], image["grid"])
            return head(out["pooled"])

        scores = _timed(times, "transformer", transformer)
    assert scores.shape == (1, ANSWERS), scores.shape
    return times, image["features"].size(1)


def _autocast(precision):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def inference(args):
    import torch

    region_flops, soho_flops = region_inference_flops(), soho_inference_flops()
    channels_last = args.layout == "channels_last"
    detector, region, soho = build_inference_models(channels_last)
    bgr, pixels, question, text_mask = make_inputs()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; one {IMAGE[0]}x{IMAGE[1]} image + {QUESTION}-token question -> {ANSWERS} VQA "
          f"scores, batch 1, median of {args.repeats} after 1 warm-up; both CNNs {args.layout}")
    print(f"{'precision':>9} {'pipeline':>8} {'stage':>12} {'ms':>9} {'GFLOPs':>8} {'GFLOP/s':>8}")
    for precision in args.precisions.split(","):
        region_runs, soho_runs = [], []
        for repeat in range(args.repeats + 1):
            r = run_region(detector, region, bgr, question, text_mask, precision, channels_last)
            s = run_soho(soho, pixels, question, text_mask, precision)
            if repeat:  # the first is the warm-up
                region_runs.append(r)
                soho_runs.append(s)
        proposals, kept = region_runs[0][1], region_runs[0][2]
        cells = soho_runs[0][1]
        totals = {}
        for name, runs, flops in (("region", [r[0] for r in region_runs], region_flops),
                                  ("soho", [s[0] for s in soho_runs], soho_flops)):
            stages = {stage: statistics.median(run[stage] for run in runs) for stage in runs[0]}
            totals[name] = statistics.median(sum(run.values()) for run in runs)
            for stage, seconds in stages.items():
                gflop = flops[stage] / 1e9
                rate = f"{gflop / seconds:>8.1f}" if gflop else f"{'-':>8}"
                print(f"{precision:>9} {name:>8} {stage:>12} {seconds * 1e3:>9.1f} {gflop:>8.1f} {rate}")
            total_flop = sum(v for k, v in flops.items() if k != "cells") / 1e9
            print(f"{precision:>9} {name:>8} {'total':>12} {totals[name] * 1e3:>9.1f} {total_flop:>8.1f} "
                  f"{total_flop / totals[name]:>8.1f}")
        flop_ratio = sum(v for v in region_flops.values()) / (soho_flops["cnn"] + soho_flops["transformer"])
        print(f"  {precision}: region {totals['region'] * 1e3:.0f} ms / SOHO {totals['soho'] * 1e3:.0f} ms = "
              f"{totals['region'] / totals['soho']:.1f}x (analytic FLOP ratio {flop_ratio:.1f}x; {proposals} proposals, "
              f"{kept} regions, {cells} SOHO cells; paper, V100: 464 / 44 ms = 10.5x)")
    return 0


# --------------------------------------------------------------------------- training
def soho_model():
    import torch
    from mmf.common.registry import registry
    from omegaconf import OmegaConf

    from mmf_multilevel.methods.soho.model import SOHO

    # what mmf_run registers and MMF's Losses read
    registry.register("config", OmegaConf.create({"evaluation": {"predict": False}, "training": {"update_frequency": 1}}))

    config = OmegaConf.merge(OmegaConf.load(SOHO.config_path()).model_config.soho, {
        "bert_model_name": None, "backbone_pretrained": False, "training_head_type": "pretraining",
        "freeze_resnet_epochs": 0, "pretraining": {"init_mlm_from_bert": False}})
    torch.manual_seed(0)
    model = SOHO(config)
    model.build()
    model.init_losses()
    return model


def pretraining_batch(words, cnn_per_text):
    """2 images x (2 matched + 2 mismatched) 40-token texts with 15 % of the words masked, in SOHO's
    corpus layout (``pairs``); ``cnn_per_text``: every text gets its own copy of its image."""
    import torch
    from mmf.common.sample import SampleList

    from mmf_multilevel.methods.soho.pretraining import compose_itm_pairs

    g = torch.Generator().manual_seed(0)
    images = 2
    layout = compose_itm_pairs(images, 2, generator=g)
    count = layout["pair_image_index"].numel()
    ids = torch.randint(1000, 30522, (count, words), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    chosen = torch.rand(count, words, generator=g) < 0.15
    chosen[:, 0] = chosen[:, -1] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, -1))
    batch = SampleList()
    pixels = torch.randn(images, 3, *IMAGE, generator=g)
    pairs = SampleList()
    pairs.input_ids = ids.masked_fill(chosen, 103)
    pairs.lm_label_ids, pairs.input_mask = labels, torch.ones_like(ids)
    pairs.segment_ids = torch.zeros_like(ids)
    pairs.is_correct = layout["is_correct"]
    if cnn_per_text:
        batch.image = pixels[layout["pair_image_index"]]
        pairs.pair_image_index = torch.arange(count)
    else:
        batch.image = pixels
        pairs.pair_image_index = layout["pair_image_index"]
    batch.image_size = torch.tensor([list(IMAGE)] * batch.image.size(0))
    batch.pairs = pairs
    batch.dataset_name, batch.dataset_type = "soho_bench", "train"
    return batch


def run_one_training(kind, precision, args):
    import torch

    model = soho_model()
    model.train()
    batch = pretraining_batch(args.words, cnn_per_text=kind == "cnn-per-text")
    optimizer = model.configure_optimizer(None)

    def loss_fn():
        return sum(model(batch)["losses"].values())

    times = step_seconds(model, loss_fn, args.steps, precision, optimizer=optimizer,
                         after_backward=lambda: model.synchronize(1), warmup=args.warmup)
    used = model.backbone.dictionary.usage_summary()
    return {"step_times": times, "peak_rss_mib": peak_rss_mib(), "images": int(batch.image.size(0)),
            "pairs": int(batch.pairs.input_ids.size(0)), "params": sum(p.numel() for p in model.parameters()),
            "dictionary": {k: float(v) for k, v in used.items()}, "torch_threads": torch.get_num_threads()}


def training(args):
    import torch

    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"SOHO pre-training update, 2 images x 4 texts ({args.words} tokens) at {IMAGE[0]}x{IMAGE[1]}, "
          f"R101 + BERT-base, k = 2048")
    print(f"{'precision':>9} {'variant':>13} {'step s':>7} {'pairs/s':>8} {'vs ref':>7} {'GFLOP/step':>11} "
          f"{'GFLOP/s':>8} {'peak RSS MiB':>13}")
    options = child_options(args, ("words", "warmup"))
    kinds = tuple(args.kinds.split(","))
    for precision in args.precisions.split(","):
        rows = run_rounds(os.path.abspath(__file__), ["training", *options], kinds, precision, args.rounds, 1)
        for kind, r in rows.items():
            r["gflop"] = soho_training_flops(words=args.words, cnn_per_text=kind == "cnn-per-text") / 1e9
            r["pairs_per_s"] = r["pairs"] / r["step_s"]
        for kind, r in rows.items():
            ratio = r["pairs_per_s"] / rows["cnn-per-text"]["pairs_per_s"] if "cnn-per-text" in rows else float("nan")
            print(f"{precision:>9} {kind:>13} {r['step_s']:>7.2f} {r['pairs_per_s']:>8.2f} "
                  f"{ratio:>6.2f}x {r['gflop']:>11.0f} "
                  f"{r['gflop'] / r['step_s']:>8.1f} {r['peak_rss_mib']:>13.0f}")
        last = rows[kinds[-1]]
        print(f"  {last['params'] / 1e6:.1f} M parameters; dictionary after the last update: {last['dictionary']}")
    return 0


# --------------------------------------------------------------------------- entry
def flops_only():
    region, soho = region_inference_flops(), soho_inference_flops()
    print(f"analytic forward GFLOPs, {IMAGE[0]}x{IMAGE[1]} image + {QUESTION}-token question -> VQA scores:")
    print("  region pipeline: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in region.items())
          + f"; total {sum(region.values()) / 1e9:.1f}")
    print(f"  soho: cnn {soho['cnn'] / 1e9:.1f}, transformer {soho['transformer'] / 1e9:.1f} ({soho['cells']} cells); "
          f"total {(soho['cnn'] + soho['transformer']) / 1e9:.1f}")
    print(f"  ratio {sum(region.values()) / (soho['cnn'] + soho['transformer']):.1f}x")
    for per_text in (False, True):
        print(f"  pre-training update ({'CNN per text' if per_text else 'CNN per image'}): "
              f"{soho_training_flops(cnn_per_text=per_text) / 1e9:.0f} GFLOPs")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    sub.add_parser("flops", help="analytic FLOPs per stage")
    q = sub.add_parser("inference", help="§4.5: SOHO vs the region pipeline, per stage")
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--precisions", default="fp32,bf16")
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last",
                   help="memory layout of both pipelines' CNNs (soho's default: channels_last)")
    t = sub.add_parser("training", help="pre-training update: samples/s and peak memory")
    add_run_options(t)
    t.set_defaults(rounds=1, steps=3)
    t.add_argument("--words", type=int, default=40)
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    t.add_argument("--kinds", default="cnn-per-text,soho",
                   help="cnn-per-text (the reference: the CNN once per text) and/or soho (once per image)")
    args = p.parse_args(argv)
    if args.part == "flops":
        return flops_only()
    if args.part == "inference":
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return inference(args)
    if args.one:
        print(json.dumps(run_one_training(args.one[0], args.one[1], args)))
        return 0
    return training(args)


if __name__ == "__main__":
    sys.exit(main())
