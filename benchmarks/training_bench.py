"""What the training-step benchmarks share (bench_muvla.py, bench_semvlp.py): timing one
forward + backward + AdamW step, peak memory, and running each configuration in its own process."""
import json
import resource
import subprocess
import sys
import time


def median_step_seconds(model, loss_fn, steps, precision):
    """Median time of ``steps`` training steps after one untimed warm-up step; bf16 = CPU autocast."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step (allocation, warm-up) is not timed
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script, options, kind, precision):
    """``script --one KIND PRECISION`` in a fresh process (its peak RSS is its own); its JSON result."""
    out = subprocess.run([sys.executable, script, *options, "--one", kind, precision], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
