"""Every registered method side by side: parameters, analytic FLOPs, training samples/s and peak memory,
and end-to-end VQA-style inference latency per stage, each row against its reference model measured in the
same run (HF VisualBERT, HF LXMERT, ALBEF = ``simla`` with ``layout: albef``; ``compare_references.py``).

    python benchmarks/compare.py [--size base|tiny] [--device cpu|cuda] [--precision fp32|bf16|fp16]
                                 [--methods semvlp,soho,...] [--quick] [--record]

Every method folder under ``mmf_multilevel/methods/`` is a row (one per mode) through its ``benchmark.py``
(``methods/benchmarking.py``); a registered method without one stops the command with its name. Random
weights, nothing downloaded.

* training: forward + backward + optimizer step (fused AdamW; a method's own optimizer where it has one) on
  the adapter's pre-training batch (``batch`` column), after 2 untimed steps; samples/s from the median
  step; peak memory = the process's peak RSS on CPU (libraries included), ``max_memory_allocated`` on CUDA.
* inference, batch 1, no gradient: ``decode`` (PIL from a JPEG of a smooth random 600 x 1000 picture),
  ``extraction`` (region rows: this project's BUTD Faster R-CNN R101-C4, random weights with calibrated norms,
  300 proposals, bottom-up attention's per-class NMS keeping 100 boxes; measured once per round as its own
  configuration and the same for every region row; the region rows' models then read random features of the
  same shape), ``preprocess`` (pixel rows: resize + normalise to the model's input; region rows: the
  detections into the model's batch) and ``model`` (a random 16-token question, no tokeniser, through the
  inference head: VQA where the method has one). ``total`` = the sum of the stages' medians.
* FLOPs: analytic, per sample (``methods/benchmarking.py``: FLOP_RULE); with ``--device cuda`` the model FLOP
  utilisation = achieved FLOP/s / the device's peak for the precision (a small table of known GPUs, or
  ``--peak-tflops``); on CPU it is printed when ``--peak-tflops`` gives the processor's peak.

Each configuration runs in its own process (forked from this one after the imports), in alternating rounds
(c1 c2 ... c1 c2 ...), and the medians over the rounds are reported, so a change in the shared machine's load
falls on every row. ``--size tiny`` runs the methods' tiny test configurations (a smoke run: the figures say
nothing about the methods). Writes ``<out>/compare_<date>_<size>.csv`` and ``.png``; ``--record`` appends the
table to ``benchmarks/RESULTS.md``.
"""
import argparse
import csv
import io
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

IMAGE = {"base": (600, 1000), "tiny": (64, 96)}
QUESTION, REGIONS, PROPOSALS = 16, 100, 300
TINY_REGIONS = 5
STAGES = ("decode", "extraction", "preprocess", "model")
#: peak dense TFLOP/s per precision of known devices (vendor figures, no sparsity)
PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
    "V100": {"fp32": 15.7, "bf16": None, "fp16": 125.0},
    "L4": {"fp32": 30.3, "bf16": 121.0, "fp16": 121.0},
    "T4": {"fp32": 8.1, "bf16": None, "fp16": 65.0},
}
COLUMNS = ("row", "method", "mode", "reference", "input", "params_m", "train_gflop", "inference_gflop", "batch",
           "samples_per_s", "train_vs_ref", "peak_mem_mib", "decode_ms", "extraction_ms", "preprocess_ms", "model_ms",
           "total_ms", "latency_vs_ref", "train_mfu", "inference_mfu")


# --------------------------------------------------------------------------- entries
def entries(methods):
    """``(row, kind, name, mode)`` for every method row (one per mode) and every reference they need."""
    from compare_references import REFERENCES

    from mmf_multilevel.methods import benchmarking as bm

    rows, needed = [], []
    for name in methods:
        adapter = bm.adapter(name)
        for mode in adapter.MODES:
            rows.append((f"{name}-{mode}" if mode else name, "method", name, mode))
        if adapter.REFERENCE not in REFERENCES:
            raise LookupError(f"method {name!r}: its REFERENCE {adapter.REFERENCE!r} is not one of {sorted(REFERENCES)}")
        if adapter.REFERENCE not in needed:
            needed.append(adapter.REFERENCE)
    return [(f"ref:{r}", "reference", r, "") for r in needed] + rows


def describe(kind, name):
    from compare_references import REFERENCES

    from mmf_multilevel.methods import benchmarking as bm

    return REFERENCES[name] if kind == "reference" else bm.adapter(name)


# --------------------------------------------------------------------------- measurement (child side)
def _autocast(args):
    import contextlib

    import torch

    if args.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(args.device, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)


def _sync(args):
    import torch

    if args.device == "cuda":
        torch.cuda.synchronize()


def _timed(args, fn):
    _sync(args)
    start = time.perf_counter()
    out = fn()
    _sync(args)
    return out, time.perf_counter() - start


def _peak_mib(args):
    import torch

    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _to(obj, device):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        for key in list(obj.keys()):
            obj[key] = _to(obj[key], device)
    return obj


def decode(jpeg):
    import numpy as np
    from PIL import Image

    return np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def measure_training(kind, name, mode, args):
    import torch

    from mmf_multilevel.methods import benchmarking as bm

    spec = describe(kind, name)
    batch = args.batch or getattr(spec, "BATCH", 8)
    optimizer = None
    if kind == "reference":
        model, loss_fn, samples = spec.train_model(args.size, batch)
    else:
        model = bm.build(name, spec.model_config(args.size, mode, "pretraining" if "pretraining" in
                                                  _heads(name) else _heads(name)[0]))
        sample_list = spec.train_batch(args.size, batch, mode)
        samples = spec.count_samples(sample_list) if hasattr(spec, "count_samples") else int(sample_list.input_ids.size(0))
        sample_list = _to(sample_list, args.device)

        def loss_fn():
            return sum(model(sample_list)["losses"].values())
    model.to(args.device).train()
    if hasattr(model, "on_update_start"):
        from mmf_multilevel.methods.progress import TrainingProgress

        model.on_update_start(TrainingProgress(update=0, epoch=1))
    if hasattr(spec, "optimizer"):
        optimizer = spec.optimizer(model)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    times = []
    for step in range(args.steps + 2):
        def one():
            with _autocast(args):
                loss = loss_fn()
            loss.backward()
            if hasattr(model, "synchronize"):
                model.synchronize(1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _, seconds = _timed(args, one)
        if step >= 2:
            times.append(seconds)
    return {"params": params, "step_times": times, "samples": samples, "peak_mem_mib": _peak_mib(args),
            "batch": spec.describe_batch(args.size, batch) if args.size == "base" else f"{samples} (the tiny test batch)"}


def _heads(name):
    from mmf.common.registry import registry

    return registry.get_model_class(name).head_types


def _pixels(image, size):
    """Resize + ImageNet normalisation of an ``(H, W, 3)`` uint8 picture to ``size``: ``(1, 3, h, w)``."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def measure_inference(kind, name, mode, args, jpeg):
    import torch

    from mmf_multilevel.methods import benchmarking as bm

    spec = describe(kind, name)
    g = torch.Generator().manual_seed(0)
    vocab = 40 if args.size == "tiny" else 30522
    question = torch.randint(5, vocab, (1, QUESTION), generator=g)
    question[0, 0], question[0, -1] = (2, 3) if args.size == "tiny" else (101, 102)
    question = question.to(args.device)
    if kind == "reference":
        model, answer = spec.inference_model(args.size)
        model.to(args.device)
    else:
        model = bm.build(name, spec.model_config(args.size, mode, spec.INFERENCE_HEAD)).to(args.device).eval()

        def answer(q, visual):
            return model.forward(_to(spec.inference_batch(args.size, q, visual), args.device))["scores"]
    height, width = IMAGE[args.size]
    regions = REGIONS if args.size == "base" else TINY_REGIONS
    runs = []
    for repeat in range(args.repeats + 1):
        times = {}
        image, times["decode"] = _timed(args, lambda: decode(jpeg))

        def preprocess():
            if spec.INPUT == "pixels":
                return _pixels(image, spec.inference_image(args.size)).to(args.device)
            corner = torch.rand(regions, 2, generator=g) * torch.tensor([width / 2, height / 2])
            boxes = torch.cat([corner, corner + 8 + torch.rand(regions, 2, generator=g) * 100], -1)
            found = bm.detections(torch.rand(regions, 2048, generator=g), boxes, height, width,
                                  torch.randint(0, 1600, (regions,), generator=g))
            return _to(found, args.device)
        visual, times["preprocess"] = _timed(args, preprocess)
        with torch.no_grad(), _autocast(args):
            scores, times["model"] = _timed(args, lambda: answer(question, visual))
        if repeat:
            runs.append(times)
    assert scores.dim() == 2 and scores.size(0) == 1, (name, tuple(scores.shape))
    return {"stage_times": {s: [r[s] for r in runs] for s in runs[0]}}


def measure_extraction(args, jpeg):
    """The BUTD R101-C4 extraction stage on the decoded picture: detector, proposals, box head, selection."""
    import torch

    from mmf_multilevel.extraction import detectors
    from mmf_multilevel.extraction.extractor import select_regions

    height, width = IMAGE[args.size]
    opts = ["INPUT.MIN_SIZE_TEST", str(height), "INPUT.MAX_SIZE_TEST", str(width)]
    detector = detectors.build_random_detector(detectors.load_config("butd_r101", opts), seed=0,
                                               device=args.device).eval()
    keep = REGIONS if args.size == "base" else TINY_REGIONS
    image = decode(jpeg)
    bgr = torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1).float()
    times, counts = [], None
    for repeat in range(args.repeats + 1):
        def detect():
            with torch.no_grad(), _autocast(args):
                batch = detector.preprocess_image([{"image": bgr.to(args.device)}])
                features = detector.backbone(batch.tensor)
                proposals, _ = detector.proposal_generator(batch, features, None)
                boxes = [p.proposal_boxes for p in proposals]
                pooled, cls_prob = detector.roi_heads.region_outputs(features, boxes)
                chosen, _ = select_regions(boxes[0].tensor.float(), cls_prob, keep, keep, 0.2, 0.3)
                return len(proposals[0]), int(chosen.numel())
        counts, seconds = _timed(args, detect)
        if repeat:
            times.append(seconds)
    return {"extraction_times": times, "proposals": counts[0], "regions": counts[1]}


def child(conn, job, args, jpeg):
    try:
        row, kind, name, mode = job
        if kind == "extraction":
            out = measure_extraction(args, jpeg)
        else:
            out = measure_training(kind, name, mode, args)
            out.update(measure_inference(kind, name, mode, args, jpeg))
        conn.send({"ok": True, **out})
    except BaseException:  # noqa: BLE001 - reported to the parent with the configuration's name
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


def run_isolated(job, args, jpeg):
    context = multiprocessing.get_context("fork")
    parent, child_end = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(child_end, job, args, jpeg))
    process.start()
    child_end.close()
    result = parent.recv()
    process.join()
    if not result["ok"]:
        raise RuntimeError(f"configuration {job[0]} failed:\n{result['error']}")
    return result


# --------------------------------------------------------------------------- the run (parent side)
def picture(size):
    """A JPEG of a smooth random picture (the detector finds proposals on it, unlike on noise)."""
    import numpy as np
    from PIL import Image

    height, width = IMAGE[size]
    rng = np.random.default_rng(0)
    coarse = Image.fromarray((rng.random((max(2, height // 20), max(2, width // 20), 3)) * 255).astype("uint8"))
    out = io.BytesIO()
    coarse.resize((width, height), Image.BILINEAR).save(out, format="JPEG", quality=90)
    return out.getvalue()


def peak_tflops(args):
    """The peak TFLOP/s the utilisation columns divide by: ``--peak-tflops`` on any device, else the table's
    figure for the visible GPU (None on CPU: a processor's peak is not in the table)."""
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    import torch

    device = torch.cuda.get_device_name(0)
    for key, table in PEAK_TFLOPS.items():
        if key in device and table.get(args.precision):
            return table[args.precision]
    raise SystemExit(f"--peak-tflops: the peak of {device!r} in {args.precision} is not in the table; give it")


def utilisation(flops, samples_per_s, model_s, peak):
    """Model FLOP utilisation of training (FLOPs per sample x samples/s) and of one inference forward (its
    FLOPs / the model stage's seconds), as fractions of ``peak`` TFLOP/s."""
    return flops["train"] * samples_per_s / (peak * 1e12), flops["inference"] / (model_s * peak * 1e12)


def measure(args, peak=None):
    """Every configuration in alternating rounds; ``peak``: the TFLOP/s the utilisation columns divide by."""
    from mmf_multilevel.methods import benchmarking as bm

    methods = args.methods
    jobs = entries(methods)
    if any(describe(kind, name).INPUT == "regions" for _, kind, name, _ in jobs):
        jobs.append(("extraction", "extraction", "butd_r101", ""))
    jpeg = picture(args.size)
    pooled = {}
    for _ in range(args.rounds):
        for job in jobs:
            result = run_isolated(job, args, jpeg)
            previous = pooled.get(job[0])
            if previous:
                for key in ("step_times", "extraction_times"):
                    if key in result:
                        result[key] = previous[key] + result[key]
                if "stage_times" in result:
                    result["stage_times"] = {s: previous["stage_times"][s] + t for s, t in result["stage_times"].items()}
                result["peak_mem_mib"] = max(result.get("peak_mem_mib", 0), previous.get("peak_mem_mib", 0))
            pooled[job[0]] = result
    extraction = pooled.pop("extraction", None)
    rows = {}
    for row, kind, name, mode in jobs:
        if kind == "extraction":
            continue
        r, spec = pooled[row], describe(kind, name)
        flops = spec.flops(args.size, mode)
        stages = {s: statistics.median(t) for s, t in r["stage_times"].items()}
        stages["extraction"] = statistics.median(extraction["extraction_times"]) if spec.INPUT == "regions" else 0.0
        step = statistics.median(r["step_times"])
        out = {"row": row, "method": name if kind == "method" else f"{name} (reference)", "mode": mode,
               "reference": "" if kind == "reference" else spec.REFERENCE, "input": spec.INPUT,
               "params_m": r["params"] / 1e6, "train_gflop": flops["train"] / 1e9,
               "inference_gflop": flops["inference"] / 1e9, "batch": r["batch"],
               "samples_per_s": r["samples"] / step, "peak_mem_mib": r["peak_mem_mib"],
               **{f"{s}_ms": stages[s] * 1e3 for s in STAGES}, "total_ms": sum(stages.values()) * 1e3,
               "train_mfu": "", "inference_mfu": ""}
        if peak:
            out["train_mfu"], out["inference_mfu"] = utilisation(flops, out["samples_per_s"], stages["model"], peak)
        rows[row] = out
    for row, kind, name, mode in jobs:
        if kind == "method":
            ref = rows[f"ref:{bm.adapter(name).REFERENCE}"]
            rows[row]["train_vs_ref"] = rows[row]["samples_per_s"] / ref["samples_per_s"]
            rows[row]["latency_vs_ref"] = rows[row]["total_ms"] / ref["total_ms"]
        elif row in rows:
            rows[row]["train_vs_ref"] = rows[row]["latency_vs_ref"] = 1.0
    return list(rows.values()), extraction


# --------------------------------------------------------------------------- output
def _cell(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown(rows, args, extraction, peak=None):
    import torch

    head = (f"### compare.py --size {args.size} --device {args.device} --precision {args.precision} "
            f"({time.strftime('%Y-%m-%d')})\n\n"
            f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}; "
            f"{args.steps} timed steps x {args.rounds} rounds, {args.repeats} inference repeats per round; medians. "
            f"Inference: a {IMAGE[args.size][0]}x{IMAGE[args.size][1]} JPEG + a {QUESTION}-token question; "
            f"extraction = BUTD R101-C4 ({extraction['proposals'] if extraction else '-'} proposals -> "
            f"{extraction['regions'] if extraction else '-'} boxes), the same for every region row. "
            "vs ref: samples/s / the reference's (higher is faster), latency / the reference's (lower is faster)."
            + (f" mfu: achieved FLOP/s / {peak:g} TFLOP/s peak." if peak else "") + "\n\n")
    shown = [c for c in COLUMNS if c not in ("method",) and (peak or not c.endswith("mfu"))]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in shown) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


def plot(rows, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["row"] for r in rows]
    x = np.arange(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(names)), 8))
    width = 0.8 / len(STAGES)
    for i, stage in enumerate(STAGES):
        # a stage a row does not have (extraction of a pixel method) is left out, not drawn at the axis floor
        values = [r[f"{stage}_ms"] if r[f"{stage}_ms"] > 0 else np.nan for r in rows]
        top.bar(x + (i - (len(STAGES) - 1) / 2) * width, values, width, label=stage)
    top.scatter(x, [r["total_ms"] for r in rows], marker="_", s=900, color="black", zorder=3, label="total")
    top.set_yscale("log")
    top.set_ylabel("inference latency per stage (ms, log)")
    top.set_xticks(x, names, rotation=30, ha="right")
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    bottom.bar(x, [r["samples_per_s"] for r in rows], 0.6, color="tab:gray")
    bottom.set_yscale("log")
    bottom.set_ylabel("training samples/s (log)")
    bottom.set_xticks(x, names, rotation=30, ha="right")
    fig.suptitle(f"compare.py --size {args.size}, {args.device} {args.precision}, {time.strftime('%Y-%m-%d')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (autocast)")
    p.add_argument("--methods", default=None, help="comma-separated registered methods (default: all)")
    p.add_argument("--size", default="base", help="base (the papers' sizes) or tiny (the test configurations)")
    p.add_argument("--quick", action="store_true", help="1 round, 1 timed step, 1 inference repeat")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: each adapter's, 8 for most)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per run (after 2 untimed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed inference repeats per run (after 1 untimed)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for --precision")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the CSV and PNG")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    from mmf_multilevel.methods import method_names
    from mmf_multilevel.methods.benchmarking import SIZES

    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.precision not in ("fp32", "bf16", "fp16"):
        p.error(f"--precision must be fp32, bf16 or fp16, got {args.precision!r}")
    if args.size not in SIZES:
        p.error(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    if args.device == "cpu" and args.precision == "fp16":
        p.error("--precision fp16 needs --device cuda (CPU autocast: fp32 or bf16)")
    known = method_names()
    args.methods = known if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in known]
    if unknown or not args.methods:
        p.error(f"--methods: {', '.join(unknown) or 'none given'} not registered; the methods: {', '.join(known)}")
    for name, value in (("--batch", args.batch), ("--steps", args.steps), ("--rounds", args.rounds),
                        ("--repeats", args.repeats), ("--peak-tflops", args.peak_tflops)):
        if value is not None and value <= 0:
            p.error(f"{name} must be positive, got {value}")
    if args.quick:
        args.rounds, args.steps, args.repeats = 1, 1, 1
    return args


def main(argv=None):
    args = parse(argv)
    import mmf  # noqa: F401  (registers this plugin's methods)
    import torch
    from mmf.common.registry import registry
    from omegaconf import OmegaConf

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    peak = peak_tflops(args)  # an unknown GPU without --peak-tflops stops here, before the measurement
    # what mmf_run registers and MMF's losses read
    registry.register("config", OmegaConf.create({"evaluation": {"predict": False}, "training": {"update_frequency": 1}}))
    rows, extraction = measure(args, peak)
    table = markdown(rows, args, extraction, peak)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"compare_{time.strftime('%Y-%m-%d')}_{args.size}_{args.device}_{args.precision}")
    with open(stem + ".csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, stem + ".png", args)
    print(json.dumps({"csv": stem + ".csv", "png": stem + ".png"}))
    if args.record:
        with open(os.path.join(HERE, "RESULTS.md"), "a", encoding="utf-8") as handle:
            handle.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
