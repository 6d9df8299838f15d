"""SemVLP training speed per mode against HF transformers' LxmertForPreTraining, same run.

One training step = forward + backward + AdamW step on ``--batch`` samples of ``--tokens`` text
tokens + ``--objects`` 2048-d objects (default 8 x (20 + 100) + SemVLP's [IMG]), base size:

* ``semvlp-single`` / ``semvlp-two``: ``SemVLPNetwork`` (12 shared blocks, cross-attention above
  L_s = 6) + ``SemVLPPretrainingHeads`` - MLM (15 %), object feature regression + detected-label
  classification (15 %), ITM - through ``pretraining_losses``;
* ``lxmert``: ``transformers.LxmertForPreTraining`` (its default 9 language / 5 vision / 5
  cross-modality layers) with the same MLM labels, its object-feature and object-label losses and
  image-text matching (QA off).

The two models do different amounts of work per sample, so besides samples/s the figure to compare
is the achieved FLOP/s (analytic FLOPs per sample x samples/s). Each configuration runs in its own
process (peak RSS is its own), in fp32 and under bf16 autocast.

    python benchmarks/bench_semvlp.py [--steps 4] [--rounds 2] [--batch 8]
"""
import argparse
import json
import os
import platform
import sys
import time

from training_bench import add_run_options, child_options, peak_rss_mib, run_rounds, step_seconds

H, I, V, D = 768, 3072, 30522, 2048


def layer_flops(q_len, kv_len, cross=False):
    """Forward FLOPs of one BERT block (self-attention + FFN) or of one cross-attention module."""
    if cross:
        return 2 * (2 * q_len * H * H + 2 * kv_len * H * H + 2 * q_len * kv_len * H)
    return 2 * (4 * q_len * H * H + 2 * q_len * q_len * H) + 2 * 2 * q_len * H * I


def semvlp_flops(mode, t, n, masked_t, masked_o, num_labels=1600):
    n1 = n + 1
    if mode == "single":
        encoder = 12 * layer_flops(t + n1, t + n1)
    else:  # both streams through the 12 blocks, 6 cross-attention modules on the object stream
        encoder = 12 * (layer_flops(t, t) + layer_flops(n1, n1)) + 6 * layer_flops(n1, t, cross=True)
    heads = 2 * masked_t * (H * H + H * V) + 2 * masked_o * (2 * H * H + H * D + H * num_labels)
    return 3 * (encoder + 2 * n * (D + 4) * H + heads)


def lxmert_flops(t, n, masked_t, masked_o, num_labels=1600):
    language = 9 * layer_flops(t, t)
    vision = 5 * layer_flops(n, n)
    cross = 5 * (layer_flops(t, n, cross=True) + layer_flops(n, t, cross=True) + layer_flops(t, t) + layer_flops(n, n))
    heads = 2 * t * (H * H + H * V) + 2 * n * (2 * H * H + H * D + H * num_labels)  # LXMERT scores every position
    return 3 * (language + vision + cross + 2 * n * (D + 4) * H + heads)


def run_one(kind, precision, args):
    import torch

    torch.manual_seed(0)
    B, T, N = args.batch, args.tokens, args.objects
    input_ids = torch.randint(1000, V, (B, T))
    text_mask = torch.ones(B, T, dtype=torch.long)
    features = torch.rand(B, N, D)
    xy = torch.rand(B, N, 2) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(B, N, 2) * 0.5], dim=-1)
    labels = torch.full((B, T), -100, dtype=torch.long)
    chosen = torch.rand(B, T) < 0.15
    chosen[:, 0] = False
    labels[chosen] = input_ids[chosen]
    obj_sel = torch.rand(B, N) < 0.15
    obj_labels = torch.randint(0, 1600, (B, N))
    matched = torch.randint(0, 2, (B,))
    if kind.startswith("semvlp"):
        from transformers import BertConfig

        from mmf_multilevel.methods.semvlp import SemVLPNetwork, SemVLPPretrainingHeads, pretraining_losses
        from mmf_multilevel.modules.text import BertTextEncoder

        network = SemVLPNetwork(BertTextEncoder.from_config(BertConfig()), D, 6)
        heads = SemVLPPretrainingHeads(network, 1600)
        model = torch.nn.ModuleDict({"network": network, "heads": heads})
        mode = kind.split("-")[1]

        def loss_fn():
            inputs = features.masked_fill(obj_sel.unsqueeze(-1), 0.0)
            out = network(input_ids, text_mask, inputs, boxes, torch.ones(B, N, dtype=torch.long), mode=mode)
            losses = pretraining_losses(heads, out, labels, features, obj_sel, obj_labels, matched)
            return sum(losses.values())
    else:
        from transformers import LxmertConfig, LxmertForPreTraining

        model = LxmertForPreTraining(LxmertConfig(num_object_labels=1600, num_attr_labels=400, task_qa=False,
                                                  visual_attr_loss=False, visual_obj_loss=True, visual_feat_loss=True))
        obj_targets = {"obj": (obj_labels, torch.ones(B, N)), "feat": (features, obj_sel.float())}

        def loss_fn():
            inputs = features.masked_fill(obj_sel.unsqueeze(-1), 0.0)
            out = model(input_ids=input_ids, visual_feats=inputs, visual_pos=boxes, attention_mask=text_mask,
                        labels=labels, obj_labels=obj_targets, matched_label=matched)
            return out.loss
    measured = step_seconds(model, loss_fn, args.steps, precision, profile=args.profile)
    times, split = measured if args.profile else (measured, {})
    return {"step_times": times, **split, "masked_t": int(chosen.sum()) / B,
            "masked_o": int(obj_sel.sum()) / B, "peak_rss_mib": peak_rss_mib()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--objects", type=int, default=100)
    p.add_argument("--profile", action="store_true",
                   help="profile one more step per run: time in matrix products (GEMM) vs everything else")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args)))
        return 0
    import torch

    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"batch {args.batch} x ({args.tokens} tokens + {args.objects} objects)")
    print(f"{'precision':>9} {'model':>14} {'step s':>7} {'samples/s':>10} {'GFLOP/sample':>13} {'GFLOP/s':>8} "
          f"{'FLOP/s vs lxmert':>17} {'peak RSS MiB':>13}")
    options = child_options(args, ("tokens", "objects"), flags=("profile",))
    for precision in args.precisions.split(","):
        rows = run_rounds(os.path.abspath(__file__), options, ("lxmert", "semvlp-single", "semvlp-two"), precision,
                          args.rounds, args.batch)
        for kind, r in rows.items():
            if kind == "lxmert":
                flops = lxmert_flops(args.tokens, args.objects, r["masked_t"], r["masked_o"])
            else:
                flops = semvlp_flops(kind.split("-")[1], args.tokens, args.objects, r["masked_t"], r["masked_o"])
            r["gflop"] = flops / 1e9
            r["gflops"] = flops * r["samples_per_s"] / 1e9
        for kind, r in rows.items():
            print(f"{precision:>9} {kind:>14} {r['step_s']:>7.2f} {r['samples_per_s']:>10.2f} {r['gflop']:>13.1f} "
                  f"{r['gflops']:>8.1f} {r['gflops'] / rows['lxmert']['gflops']:>16.2f}x {r['peak_rss_mib']:>13.0f}"
                  + (f"  GEMM {r['gemm_s']:.2f} s of {r['ops_s']:.2f} s in operators "
                     f"({r['gemm_s'] / r['ops_s']:.0%}), {r['gflop'] * args.batch / r['gemm_s']:.0f} GFLOP/s inside GEMMs"
                     if args.profile else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
