"""MVPTR speed on this machine: a pre-training step against HF VisualBertForPreTraining, and retrieval inference
(two-stage vs every pair), at base size.

``train`` (default): one training step = forward + backward + AdamW on a batch of ``--batch`` samples of 35
tokens + 5 phrases, 20 tag slots and 50 regions (2048-d + 6-d box), BERT-base:

* ``mvptr``: the registered ``mvptr`` model (``training_head_type: pretraining``, random init, the
  86,051-row concept table) - MCR, VSC, ITM over ``n`` matched + ``n`` negative pairs, MLM, WPG; one
  forward of the 6-layer text and visual encoders and the 6-layer multimodal encoder over ~2.5 n pairs;
* ``hf``: ``transformers.VisualBertForPreTraining`` with 12 layers over the same 40 tokens + 50 regions
  (MLM + its sentence-image head) - a single-stream model of BERT-base depth.

Each configuration runs in its own process (its peak RSS is its own), fp32 and bf16 autocast,
alternating rounds; printed: median step, samples/s, ratio to HF, peak RSS.

``retrieval``: the costs of ranking a ``--images`` x ``--captions`` gallery (1k x 5k, COCO-5k-like): the
rate of the uni-modal encoders (captions/s, images/s: each encoded once) and of the multimodal ITM pass
(pairs/s, fused from cached uni-modal outputs), measured on samples; then the wall time of two-stage
ranking (top ``k_c`` = 128 captions per image and ``k_i`` = 64 images per caption, the distinct pairs
counted from the similarity matrix) and of scoring every pair, from those rates. Scoring the 5M pairs
themselves is out of reach of this CPU (see the printed hours); the agreement of the two rankings is
measured on the trained demo model (projects/mvptr/demo.sh).

    python benchmarks/bench_mvptr.py [--steps 3] [--rounds 2] [--batch 8]
    python benchmarks/bench_mvptr.py retrieval [--images 1000 --captions 5000 --precisions fp32,bf16]
"""
import argparse
import json
import os
import platform
import sys
import time

from training_bench import (
    add_run_options,
    child_options,
    items_per_second,
    peak_rss_mib,
    run_rounds,
    step_seconds,
    two_stage_pair_count,
)

TOKENS, PHRASES, TAGS, REGIONS, FEATURES = 35, 5, 20, 50, 2048
CONCEPT_ROWS = 86051


def synthetic_batch(batch, seed=0, dataset_type="train"):
    """The base-size ``mvptr_captions``-like batch of MVPTR's benchmark adapter (``methods/mvptr/benchmark.py``)."""
    from mmf_multilevel.methods.mvptr.benchmark import synthetic_batch as build

    return build(batch, seed, dataset_type)


def build_mvptr(head_type="pretraining", layers=12, hidden=768):
    import mmf  # noqa: F401  (registers the plugin)
    from omegaconf import OmegaConf

    from mmf_multilevel.methods.mvptr.model import MVPTR

    config = OmegaConf.merge(OmegaConf.load(MVPTR.config_path()).model_config.mvptr, {
        "bert_model_name": None, "num_embeddings": CONCEPT_ROWS, "training_head_type": head_type,
        "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": hidden // 64,
        "intermediate_size": 4 * hidden})
    model = MVPTR(config)
    model.build()
    return model


def run_one(kind, precision, args):
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    B = args.batch
    batch = synthetic_batch(B)
    if kind == "mvptr":
        model = build_mvptr(layers=args.layers)

        def loss_fn():
            return sum(model(batch)["losses"].values())
    else:
        from transformers import VisualBertConfig, VisualBertForPreTraining

        config = VisualBertConfig(visual_embedding_dim=FEATURES, num_hidden_layers=args.layers, hidden_size=768,
                                  num_attention_heads=12, intermediate_size=3072)
        model = VisualBertForPreTraining(config)
        T = TOKENS + PHRASES
        ids = batch.input_ids.clamp(max=config.vocab_size - 1)
        full_labels = torch.cat([batch.lm_label_ids, torch.full((B, REGIONS), -100, dtype=torch.long)], dim=1)
        itm = torch.randint(0, 2, (B,))

        def loss_fn():
            out = model(input_ids=ids, attention_mask=torch.ones(B, T, dtype=torch.long), token_type_ids=torch.zeros_like(ids),
                        visual_embeds=batch.image_feature_0, visual_attention_mask=torch.ones(B, REGIONS, dtype=torch.long),
                        visual_token_type_ids=torch.ones(B, REGIONS, dtype=torch.long), labels=full_labels,
                        sentence_image_labels=itm)
            return out.loss

    times = step_seconds(model, loss_fn, args.steps, precision)
    return {"kind": kind, "precision": precision, "step_times": times, "peak_rss_mib": peak_rss_mib(),
            "params_m": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6}


def train_main(args):
    import torch

    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"batch {args.batch} x ({TOKENS} tokens + {PHRASES} phrases, {TAGS} tags, {REGIONS} regions), BERT-base")
    options = child_options(args, ("layers",))
    print(f"{'precision':>9} {'model':>6} {'params M':>9} {'step s':>8} {'samples/s':>10} {'vs hf':>6} {'peak RSS MiB':>13}")
    for precision in args.precisions.split(","):
        results = run_rounds(os.path.abspath(__file__), options, ("hf", "mvptr"), precision, args.rounds, args.batch)
        for kind in ("hf", "mvptr"):
            r = results[kind]
            ratio = r["samples_per_s"] / results["hf"]["samples_per_s"]
            print(f"{precision:>9} {kind:>6} {r['params_m']:>9.1f} {r['step_s']:>8.2f} {r['samples_per_s']:>10.2f} "
                  f"{ratio:>5.2f}x {r['peak_rss_mib']:>13.0f}")
    return 0


def retrieval_main(args):
    import torch

    from mmf_multilevel.methods.batch import region_inputs, text_inputs

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_mvptr("retrieval").eval()
    net = model.backbone
    batch = synthetic_batch(args.sample, dataset_type="test")
    text = text_inputs(batch, "mvptr")
    regions = region_inputs(batch, "mvptr", FEATURES, "6d")
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"MVPTR base, gallery {args.images} images x {args.captions} captions, k_c {args.k_texts}, k_i {args.k_images}")

    def rate(fn, count):
        return items_per_second(fn, count, 3)

    # the distinct pairs two-stage ranking fuses (top-k of a similarity matrix of the gallery's size)
    two_stage_pairs = two_stage_pair_count(args.images, args.captions, args.k_texts, args.k_images)
    all_pairs = args.images * args.captions
    print(f"{'precision':>9} {'captions/s':>11} {'images/s':>9} {'pairs/s':>8} {'encode s':>9} "
          f"{'two-stage pairs':>16} {'two-stage s':>12} {'all pairs':>10} {'all-pairs s':>12} {'speed-up':>9}")
    rows = []
    for precision in args.precisions.split(","):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            texts = net.encode_text(text.input_ids, text.mask)
            visual, vmask = net.encode_visual(batch.tag_ids, batch.tag_mask, regions.features, regions.boxes, regions.mask)
            captions_per_s = rate(lambda: net.encode_text(text.input_ids, text.mask), args.sample)
            images_per_s = rate(lambda: net.encode_visual(batch.tag_ids, batch.tag_mask, regions.features, regions.boxes,
                                                          regions.mask), args.sample)
            n = args.sample
            pair_t = torch.arange(args.chunk) % n
            pair_i = (torch.arange(args.chunk) * 7 + 3) % n

            def fuse():
                _, pooled, _ = net.fuse(texts, text.mask, visual, vmask, pair_t, pair_i)
                return model.itm_head(pooled)

            pairs_per_s = rate(fuse, args.chunk)
        encode = args.captions / captions_per_s + args.images / images_per_s
        two = encode + two_stage_pairs / pairs_per_s
        every = encode + all_pairs / pairs_per_s
        rows.append(dict(precision=precision, captions_per_s=captions_per_s, images_per_s=images_per_s,
                         pairs_per_s=pairs_per_s, encode_s=encode, two_stage_pairs=two_stage_pairs, two_stage_s=two,
                         all_pairs=all_pairs, all_pairs_s=every))
        print(f"{precision:>9} {captions_per_s:>11.1f} {images_per_s:>9.1f} {pairs_per_s:>8.1f} {encode:>9.0f} "
              f"{two_stage_pairs:>16,} {two:>12.0f} {all_pairs:>10,} {every:>12.0f} {every / two:>8.1f}x")
    if args.json:
        print(json.dumps(rows))
    return 0


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "retrieval":
        p = argparse.ArgumentParser(prog="bench_mvptr.py retrieval", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--images", type=int, default=1000)
        p.add_argument("--captions", type=int, default=5000)
        p.add_argument("--k-texts", type=int, default=128)
        p.add_argument("--k-images", type=int, default=64)
        p.add_argument("--sample", type=int, default=32, help="captions / images per timed encoder batch")
        p.add_argument("--chunk", type=int, default=64, help="pairs per timed multimodal batch")
        p.add_argument("--precisions", default="fp32,bf16")
        p.add_argument("--json", action="store_true")
        return retrieval_main(p.parse_args(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args)))
        return 0
    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
