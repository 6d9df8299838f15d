"""What the training-step benchmarks share (bench_muvla.py, bench_semvlp.py): timing forward +
backward + AdamW steps, peak memory, and running each configuration in its own process, in
alternating rounds so that a change in the machine's load falls on every configuration alike."""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

WARMUP_STEPS = 2  # untimed: allocation, thread pools, the optimizer's state
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def step_seconds(model, loss_fn, steps, precision, profile=False, optimizer=None, after_backward=None,
                 warmup=WARMUP_STEPS):
    """Times of ``steps`` training steps after ``warmup`` untimed ones; bf16 = CPU autocast.

    The optimizer is torch's fused AdamW for every model unless ``optimizer`` is given (a method's own,
    e.g. SOHO's SGD + AdamW): what HF's Trainer uses by default with torch >= 2.8 and what the
    ``mmf_multilevel`` trainer builds from MMF's ``adam_w``. ``after_backward()`` runs between the
    backward pass and the optimizer step (where the trainer calls a method's ``synchronize``).
    With ``profile``, one more step runs under ``torch.profiler`` and the result is
    ``(times, {"gemm_s": time in matrix products, "ops_s": time in all operators})``.
    """
    import torch

    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def one_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for step in range(steps + warmup):
        start = time.perf_counter()
        one_step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if not profile:
        return times
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step()
    events = prof.key_averages()
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
    return times, {"gemm_s": gemm, "ops_s": sum(e.self_cpu_time_total for e in events) / 1e6}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script, options, kind, precision):
    """``script --one KIND PRECISION`` in a fresh process (its peak RSS is its own); its JSON result."""
    out = subprocess.run([sys.executable, script, *options, "--one", kind, precision], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_run_options(parser):
    """The options every training-step benchmark takes: timed steps, rounds, precisions, and the
    hidden ``--one KIND PRECISION`` a child process runs."""
    parser.add_argument("--steps", type=int, default=4, help=f"timed steps per run (after {WARMUP_STEPS} untimed ones)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration, alternating; their steps are pooled")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "PRECISION"), help=argparse.SUPPRESS)


def child_options(args, names, flags=()):
    """The command line passing ``--steps``, ``--batch`` and each of ``names`` (values) and ``flags``
    (booleans that are set) on to a child process."""
    options = []
    for name in ("steps", "batch", *names):
        options += [f"--{name}", str(getattr(args, name))]
    return options + [f"--{flag}" for flag in flags if getattr(args, flag)]


def run_rounds(script, options, kinds, precision, rounds, batch):
    """Each of ``kinds`` run ``rounds`` times in turn (k1 k2 k1 k2 ...), one process per run. Per kind:
    the last run's fields, ``step_times`` of every round pooled, ``step_s`` their median,
    ``samples_per_s`` (``batch`` / ``step_s``) and ``peak_rss_mib`` the largest of the runs."""
    pooled = {}
    for _ in range(rounds):
        for kind in kinds:
            r = run_isolated(script, options, kind, precision)
            if kind in pooled:
                r["step_times"] = pooled[kind]["step_times"] + r["step_times"]
                r["peak_rss_mib"] = max(r["peak_rss_mib"], pooled[kind]["peak_rss_mib"])
            pooled[kind] = r
    for r in pooled.values():
        r["step_s"] = statistics.median(r["step_times"])
        r["samples_per_s"] = batch / r["step_s"]
    return pooled


def items_per_second(fn, count, repeats=3):
    """``count`` / the median time of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def two_stage_pair_count(images, captions, k_texts, k_images, generator=None):
    """The distinct (image, caption) pairs two-stage ranking fuses on an ``images`` x ``captions`` gallery: the
    union of every image's top ``k_texts`` captions and every caption's top ``k_images`` images, counted on a
    random similarity matrix (each pair fused once)."""
    import torch

    sim = torch.randn(images, captions, generator=generator)
    top_t = sim.topk(min(k_texts, captions), dim=1).indices
    top_i = sim.t().topk(min(k_images, images), dim=1).indices
    flat = torch.cat([(torch.arange(images)[:, None] * captions + top_t).reshape(-1),
                      (top_i * captions + torch.arange(captions)[:, None]).reshape(-1)])
    return int(torch.unique(flat).numel())
