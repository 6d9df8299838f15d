"""μ-VLA pre-training speed and memory against HF transformers' VisualBertForPreTraining, same run.

One training step = forward + backward + AdamW step on one batch of ``--batch`` samples of
``--tokens`` text tokens + ``--regions`` 2048-d regions (default 8 x (60 + 100), BERT-base):

* ``muvla``: ``MuVLANetwork`` + ``MuVLAPretrainingHeads`` - MLM (15 % of the tokens), masked-region
  feature regression (15 % of the regions) and ITM, AdamW with ``foreach``;
* ``hf``: ``transformers.VisualBertForPreTraining`` of the same size - MLM over the same labels and
  its sentence-image head (no region loss: it does less work), AdamW with ``foreach``.

Each configuration runs in its own process (peak RSS is then that configuration's), in fp32 and
under bf16 autocast. Printed: median step time, samples/s, peak RSS, the ratio to HF, and the
analytic model FLOPs per sample (forward + backward = 3 x forward) and the achieved FLOP/s.

    python benchmarks/bench_muvla.py [--steps 4] [--rounds 2] [--batch 8] [--layers 12]
"""
import argparse
import json
import os
import platform
import sys
import time

from training_bench import add_run_options, child_options, peak_rss_mib, run_rounds, step_seconds


def flops_per_sample(layers, hidden, intermediate, length, vocab, masked, regions_masked, feature_dim):
    """Forward FLOPs (2 x multiply-adds) of one sample; training is 3 x this."""
    attention = 2 * (4 * length * hidden * hidden + 2 * length * length * hidden)
    ffn = 2 * 2 * length * hidden * intermediate
    encoder = layers * (attention + ffn)
    visual = 2 * 100 * feature_dim * hidden
    heads = 2 * masked * (hidden * hidden + hidden * vocab) + 2 * regions_masked * (hidden * hidden + hidden * feature_dim)
    return encoder + visual + heads


def run_one(kind, precision, args):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import BertConfig

    config = BertConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                        intermediate_size=4 * args.hidden, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    B, T, N, D = args.batch, args.tokens, args.regions, 2048
    input_ids = torch.randint(1000, config.vocab_size, (B, T))
    text_mask = torch.ones(B, T, dtype=torch.long)
    features = torch.rand(B, N, D)
    xy = torch.rand(B, N, 2) * 0.5
    wh = torch.rand(B, N, 2) * 0.5
    boxes = torch.cat([xy, xy + wh, (wh[..., :1] * wh[..., 1:])], dim=-1)
    region_mask = torch.ones(B, N, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    chosen = torch.rand(B, T) < 0.15
    chosen[:, 0] = False
    labels[chosen] = input_ids[chosen]
    region_sel = torch.rand(B, N) < 0.15
    itm_labels = torch.randint(0, 2, (B,))

    if kind == "muvla":
        from mmf_multilevel.methods.muvla import MuVLANetwork, MuVLAPretrainingHeads
        from mmf_multilevel.modules.text import BertTextEncoder

        network = MuVLANetwork(BertTextEncoder.from_config(config), D)
        heads = MuVLAPretrainingHeads(network, 0)
        model = torch.nn.ModuleDict({"network": network, "heads": heads})

        def loss_fn():
            out = network(input_ids, text_mask, features, boxes, region_mask)
            sel = labels != -100
            mlm = F.cross_entropy(heads.mlm(out["text"][sel]).float(), labels[sel])
            mrfr = F.mse_loss(heads.mrfr(out["regions"][region_sel]).float(), features[region_sel])
            itm = F.cross_entropy(heads.itm(out["pooled"]).float(), itm_labels)
            return mlm + mrfr + itm
    else:
        from transformers import VisualBertConfig, VisualBertForPreTraining

        vconfig = VisualBertConfig(visual_embedding_dim=D, **{k: getattr(config, k) for k in (
            "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
            "hidden_dropout_prob", "attention_probs_dropout_prob")})
        model = VisualBertForPreTraining(vconfig)
        full_labels = torch.cat([labels, torch.full((B, N), -100, dtype=torch.long)], dim=1)

        def loss_fn():
            out = model(input_ids=input_ids, attention_mask=text_mask, token_type_ids=torch.zeros_like(input_ids),
                        visual_embeds=features, visual_attention_mask=region_mask,
                        visual_token_type_ids=torch.ones(B, N, dtype=torch.long),
                        labels=full_labels, sentence_image_labels=itm_labels)
            return out.loss

    return {"kind": kind, "precision": precision, "step_times": step_seconds(model, loss_fn, args.steps, precision),
            "peak_rss_mib": peak_rss_mib(),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "masked": int(chosen.sum()) / B,
            "regions_masked": int(region_sel.sum()) / B}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--regions", type=int, default=100)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args)))
        return 0
    import torch

    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"batch {args.batch} x ({args.tokens} tokens + {args.regions} regions), {args.layers} layers, hidden {args.hidden}")
    options = child_options(args, ("tokens", "regions", "layers", "hidden"))
    print(f"{'precision':>9} {'model':>6} {'step s':>8} {'samples/s':>10} {'vs hf':>6} {'peak RSS MiB':>13} "
          f"{'GFLOP/sample':>13} {'GFLOP/s':>8}")
    for precision in args.precisions.split(","):
        results = run_rounds(os.path.abspath(__file__), options, ("hf", "muvla"), precision, args.rounds, args.batch)
        for kind in ("hf", "muvla"):
            r = results[kind]
            masked = r["masked"] if kind == "muvla" else args.tokens + args.regions  # HF scores every position
            regions_masked = r["regions_masked"] if kind == "muvla" else 0
            flops = 3 * flops_per_sample(args.layers, args.hidden, 4 * args.hidden, args.tokens + args.regions, 30522,
                                         masked, regions_masked, 2048)
            ratio = r["samples_per_s"] / results["hf"]["samples_per_s"]
            print(f"{precision:>9} {kind:>6} {r['step_s']:>8.2f} {r['samples_per_s']:>10.2f} {ratio:>5.2f}x "
                  f"{r['peak_rss_mib']:>13.0f} {flops / 1e9:>13.1f} {flops * r['samples_per_s'] / 1e9:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
