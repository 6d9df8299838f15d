"""``benchmarks/compare.py``: every registered method has a benchmark adapter and a row, the table's columns,
the CSV and PNG, clear errors for bad options, and one analytic FLOP count against torch's counter."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from mmf_multilevel.methods import benchmarking as bm
from mmf_multilevel.methods import method_names

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "compare.py")
ADAPTER_API = ("REFERENCE", "INPUT", "MODES", "INFERENCE_HEAD", "model_config", "describe_batch", "train_batch",
               "inference_batch", "flops")


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_has_a_benchmark_adapter(name):
    adapter = bm.adapter(name)  # LookupError naming the method when benchmark.py is missing
    missing = [attr for attr in ADAPTER_API if not hasattr(adapter, attr)]
    assert not missing, f"{name}/benchmark.py lacks {missing}"
    assert adapter.INPUT in ("regions", "pixels") and adapter.MODES
    if adapter.INPUT == "pixels":
        assert hasattr(adapter, "inference_image"), name


def test_a_method_without_an_adapter_is_named():
    with pytest.raises(LookupError, match="'no_such_method'.*benchmark adapter"):
        bm.adapter("no_such_method")


def _run(tmp_path, *options):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *options, "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_tiny_quick_run_lists_every_method_with_the_columns(tmp_path):
    """Run with a given peak, so the utilisation columns are filled (on CPU only when a peak is given)."""
    peak = 0.25
    out = _run(tmp_path, "--size", "tiny", "--quick", "--peak-tflops", str(peak))
    assert out.returncode == 0, out.stderr[-3000:]
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from compare import COLUMNS

    (csv_path,) = tmp_path.glob("compare_*_tiny_cpu_fp32.csv")
    assert list(tmp_path.glob("compare_*_tiny_cpu_fp32.png"))
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    methods = {r["method"] for r in rows}
    assert set(method_names()) <= methods
    assert {"visual_bert (reference)", "lxmert (reference)", "albef (reference)"} <= methods
    for r in rows:
        assert float(r["samples_per_s"]) > 0 and float(r["total_ms"]) > 0 and float(r["params_m"]) > 0, r
        assert float(r["train_gflop"]) > 0 and float(r["inference_gflop"]) > 0, r
        assert (float(r["extraction_ms"]) > 0) == (r["input"] == "regions"), r
        assert float(r["train_vs_ref"]) > 0 and float(r["latency_vs_ref"]) > 0, r
        # utilisation: achieved FLOP/s over the peak, from the row's own figures
        achieved_train = float(r["train_gflop"]) * 1e9 * float(r["samples_per_s"])
        achieved_inference = float(r["inference_gflop"]) * 1e9 / (float(r["model_ms"]) / 1e3)
        assert float(r["train_mfu"]) == pytest.approx(achieved_train / (peak * 1e12), rel=1e-6), r
        assert float(r["inference_mfu"]) == pytest.approx(achieved_inference / (peak * 1e12), rel=1e-6), r
    assert "| row |" in out.stdout and "| train_mfu | inference_mfu |" in out.stdout
    assert f"{peak:g} TFLOP/s peak" in out.stdout


def _args(device, precision="bf16", peak=None):
    import argparse

    return argparse.Namespace(device=device, precision=precision, peak_tflops=peak)


def test_the_peak_is_read_from_the_table_for_a_known_gpu(monkeypatch):
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import compare

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    assert compare.peak_tflops(_args("cuda")) == 989.0
    assert compare.peak_tflops(_args("cuda", "fp32")) == 67.0
    assert compare.peak_tflops(_args("cuda", peak=123.0)) == 123.0  # given wins over the table
    assert compare.peak_tflops(_args("cpu")) is None  # no table for processors
    assert compare.peak_tflops(_args("cpu", peak=0.5)) == 0.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla V100-SXM2-16GB")
    with pytest.raises(SystemExit, match="V100.*bf16.*--peak-tflops|--peak-tflops.*V100.*bf16"):
        compare.peak_tflops(_args("cuda"))  # the V100 has no bf16 peak: the message asks for one
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Some Future GPU")
    with pytest.raises(SystemExit, match="Some Future GPU"):
        compare.peak_tflops(_args("cuda"))


@pytest.mark.parametrize("option,value", [("--device", "tpu"), ("--precision", "int8"), ("--size", "large"),
                                          ("--methods", "nosuch"), ("--steps", "0")])
def test_bad_options_are_named(tmp_path, option, value):
    out = _run(tmp_path, option, value)
    assert out.returncode != 0 and option in out.stderr, out.stderr


@pytest.mark.usefixtures("mmf_global_config")
def test_semvlp_inference_flops_match_torchs_counter():
    """The analytic count of SemVLP's tiny inference forward (single-stream) against FlopCounterMode: the
    matrix products agree (within 2 %)."""
    import mmf  # noqa: F401
    from torch.utils.flop_counter import FlopCounterMode

    from mmf_multilevel.methods.semvlp import benchmark

    d = benchmark.DIMS["tiny"]
    model = bm.build("semvlp", benchmark.model_config("tiny", "single", "classification")).eval()
    g = torch.Generator().manual_seed(0)
    question = torch.randint(5, 40, (1, d["question"]), generator=g)
    corner = torch.rand(d["regions"], 2) * 30
    found = bm.detections(torch.rand(d["regions"], d["features"]), torch.cat([corner, corner + 20], 1), 64, 96)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math kernel: its attention products are matrix products the counter sees (CPU's fused kernel it misses)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward(benchmark.inference_batch("tiny", question, found))
    analytic = benchmark.flops("tiny", "single")["inference"]
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.02)
