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
    out = _run(tmp_path, "--size", "tiny", "--quick")
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
    assert "| row |" in out.stdout


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
