"""SIMLA speed on this machine at base size: a pre-training update against the ALBEF layout on the same batch,
and retrieval inference (ITC top-k re-ranked by ITM against scoring every pair).

``train`` (default): one optimizer update = ``on_update_start`` (the EMA step) + forward + backward + the model's
own AdamW (``configure_optimizer``: the momentum copies excluded), on ``--batch`` captions of 25 tokens with
256x256 images, DeiT-B/16 + BERT-base with random weights (nothing downloaded):

* ``simla``: ``training_head_type: pretraining``, ITC + ITM + MLM + MIM + PSL (paper Eq. 10), the momentum passes,
  a random dVAE tokenizer of the real architecture and 8,192 tokens;
* ``simla_no_xmm_psl``: the same network with ``mim: false, psl: false`` (ITC + ITM + MLM): what the shared
  BERT costs against ALBEF's split one on the same objectives;
* ``albef``: ``layout: albef`` (6 text + 6 fusion layers), ITC + ITM + MLM: ALBEF's pre-training.

Each configuration in its own process (its peak RSS is its own), fp32 and bf16 autocast, alternating rounds;
printed: median step, samples/s, ratio to ALBEF, peak RSS.

``retrieval``: the costs of ranking a ``--images`` x ``--captions`` gallery (1k x 5k, COCO-5k-like) at 384x384:
the rates of the ViT (images/s), the text mode (captions/s; 40 tokens) and the multimodal pass + ITM head over
cached image tokens (pairs/s), measured on samples, fp32 and bf16; then the wall time of two-stage ranking (each
image's and each caption's top ``--k`` = 256 by the ITC cosine, each distinct pair fused once: counted from a
random similarity matrix of the gallery's size, the most the ITC stage can hand over) and of fusing every pair
(UNITER-style), from those rates, and each one's effective pairs/s (gallery pairs ranked per second).
Fusing the 5M pairs themselves is out of reach of this CPU (the printed hours).

    python benchmarks/bench_simla.py [--steps 2] [--rounds 2] [--batch 4]
    python benchmarks/bench_simla.py retrieval [--images 1000 --captions 5000 --k 256 --precisions fp32,bf16]
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

TOKENS, IMAGE, RETRIEVAL_IMAGE, CAPTION = 25, 256, 384, 40
KINDS = ("albef", "simla_no_xmm_psl", "simla")


def build_simla(overrides):
    """The registered ``simla`` model from its defaults + ``overrides``, as MMF builds it (MMF's losses read the
    run config from the registry: a minimal one is registered)."""
    from mmf.common.registry import registry
    from omegaconf import OmegaConf

    from mmf_multilevel.methods.benchmarking import build

    registry.register("config", OmegaConf.create({"evaluation": {"predict": False}, "training": {"update_frequency": 1}}))
    return build("simla", overrides)


def base_overrides(kind, head_type="pretraining", image_size=IMAGE):
    from mmf_multilevel.methods.benchmarking import BASE_BERT

    config = dict(BASE_BERT, training_head_type=head_type, vit_pretrained=False, init_mlm_from_bert=False,
                  image_size=image_size, optimization=dict(warmup_updates=0), queue_size=65536)
    if kind == "albef":
        config.update(layout="albef", fusion_layer=6, mim=False, psl=False)
    elif kind == "simla_no_xmm_psl":
        config.update(mim=False, psl=False)
    return config


def caption_batch(batch, seed=0):
    """A ``coco_captions_images``-like batch at base size: 25-token captions (15 % masked), 256x256 images."""
    import torch

    from mmf_multilevel.methods.simla import testing

    out = testing.tiny_batch("pretraining", seed=seed, batch=batch, length=TOKENS, vocab_size=30522,
                             dataset_name="bench")
    for tiny, bert in ((testing.CLS, 101), (testing.SEP, 102), (testing.MASK, 103)):
        out.input_ids[out.input_ids == tiny] = bert
    out.image = torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
    out.image_size = torch.tensor([[IMAGE, IMAGE]] * batch)
    return out


def run_one(kind, precision, args):
    import torch

    from mmf_multilevel.methods.progress import TrainingProgress

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_simla(base_overrides(kind))
    batch = caption_batch(args.batch)
    optimizer = model.configure_optimizer(None)
    update = [0]

    def loss_fn():
        model.on_update_start(TrainingProgress(update=update[0], epoch=0))
        update[0] += 1
        return sum(model(batch)["losses"].values())

    times = step_seconds(model, loss_fn, args.steps, precision, optimizer=optimizer)
    trained = {id(p): p for _, p in model.trainable_parameters()}
    return {"kind": kind, "precision": precision, "step_times": times, "peak_rss_mib": peak_rss_mib(),
            "params_m": sum(p.numel() for p in trained.values()) / 1e6}


def train_main(args):
    import torch

    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"batch {args.batch} x ({TOKENS} tokens + a {IMAGE}x{IMAGE} image), DeiT-B/16 + BERT-base, momentum pass "
          "included")
    options = child_options(args, ())
    print(f"{'precision':>9} {'model':>16} {'trained M':>10} {'step s':>8} {'samples/s':>10} {'vs albef':>9} "
          f"{'peak RSS MiB':>13}")
    rows = []
    for precision in args.precisions.split(","):
        results = run_rounds(os.path.abspath(__file__), options, KINDS, precision, args.rounds, args.batch)
        for kind in KINDS:
            r = results[kind]
            ratio = r["samples_per_s"] / results["albef"]["samples_per_s"]
            rows.append(dict(r, ratio_to_albef=ratio))
            print(f"{precision:>9} {kind:>16} {r['params_m']:>10.1f} {r['step_s']:>8.2f} {r['samples_per_s']:>10.2f} "
                  f"{ratio:>8.2f}x {r['peak_rss_mib']:>13.0f}")
    if args.json:
        print(json.dumps(rows))
    return 0


def retrieval_main(args):
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_simla(dict(base_overrides("simla", "retrieval", RETRIEVAL_IMAGE), mlm=False, mim=False,
                                psl=False)).eval()
    vit, bert, heads = model.backbone.image_encoder, model.backbone.text_encoder, model.heads
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.sample, 3, RETRIEVAL_IMAGE, RETRIEVAL_IMAGE, generator=g)
    ids = torch.randint(1000, 30522, (args.sample, CAPTION), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"SIMLA base at {RETRIEVAL_IMAGE}x{RETRIEVAL_IMAGE} ({vit.grid_size[0] * vit.grid_size[1] + 1} image "
          f"tokens), captions of {CAPTION} tokens, gallery {args.images} images x {args.captions} captions, k {args.k}")

    def rate(fn, count):
        return items_per_second(fn, count, args.repeats)

    two_stage_pairs = two_stage_pair_count(args.images, args.captions, args.k, args.k, generator=g)
    all_pairs = args.images * args.captions
    print(f"{'precision':>9} {'images/s':>9} {'captions/s':>11} {'pairs/s':>8} {'encode s':>9} {'two-stage pairs':>16} "
          f"{'two-stage h':>12} {'pairs/s':>8} {'all-pairs h':>12} {'pairs/s':>8} {'speed-up':>9}")
    rows = []
    for precision in args.precisions.split(","):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            images_per_s = rate(lambda: heads.image_feature(vit(pixels)[:, 0]), args.sample)
            captions_per_s = rate(lambda: heads.text_feature(bert.encode_text(ids, mask)[:, 0]), args.sample)
            image_tokens = vit(pixels)
            pair_t = torch.arange(args.chunk) % args.sample
            pair_i = (torch.arange(args.chunk) * 7 + 3) % args.sample

            def fuse():
                fused = bert.fuse(ids[pair_t], mask[pair_t], image_tokens[pair_i])
                return heads.itm_logits(fused[:, 0])

            pairs_per_s = rate(fuse, args.chunk)
        encode = args.images / images_per_s + args.captions / captions_per_s
        two = encode + two_stage_pairs / pairs_per_s
        every = encode + all_pairs / pairs_per_s
        row = dict(precision=precision, images_per_s=images_per_s, captions_per_s=captions_per_s,
                   pairs_per_s=pairs_per_s, encode_s=encode, two_stage_pairs=two_stage_pairs, two_stage_s=two,
                   two_stage_pairs_per_s=all_pairs / two, all_pairs=all_pairs, all_pairs_s=every,
                   all_pairs_pairs_per_s=all_pairs / every)
        rows.append(row)
        print(f"{precision:>9} {images_per_s:>9.2f} {captions_per_s:>11.1f} {pairs_per_s:>8.2f} {encode:>9.0f} "
              f"{two_stage_pairs:>16,} {two / 3600:>12.1f} {all_pairs / two:>8.1f} {every / 3600:>12.1f} "
              f"{all_pairs / every:>8.1f} {every / two:>8.1f}x")
    if args.json:
        print(json.dumps(rows))
    return 0


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "retrieval":
        p = argparse.ArgumentParser(prog="bench_simla.py retrieval", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--images", type=int, default=1000)
        p.add_argument("--captions", type=int, default=5000)
        p.add_argument("--k", type=int, default=256, help="ITC candidates re-ranked per query (COCO's k_test)")
        p.add_argument("--sample", type=int, default=8, help="images / captions per timed encoder batch")
        p.add_argument("--chunk", type=int, default=32, help="pairs per timed multimodal batch")
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--precisions", default="fp32,bf16")
        p.add_argument("--json", action="store_true")
        return retrieval_main(p.parse_args(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.set_defaults(batch=4, steps=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args)))
        return 0
    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
