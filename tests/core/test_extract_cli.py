"""The extractor's command line in real subprocesses: kill -9 and resume, shards + merge, exit codes."""
import os
import signal
import subprocess
import time

import pytest

from helpers.extract import cli_args, cli_env, make_images, tiny_opts

pytest.importorskip("detectron2", reason="detectron2 is not installed (run scripts/install.sh)")

from mmf_multilevel.features import FeatureCacheReader, check_cache  # noqa: E402


def _extract(tmp_path, images, output, *extra, model="butd_r101"):
    return cli_args(
        "--model", model, "--random-init", "0", "--images", str(images), "--output", str(output),
        "--min-boxes", "2", "--max-boxes", "6", "--threads", "1", "--no-progress", *extra, "--opts", *tiny_opts(model),
    )


def _num_keys(path):
    """Committed records, read from the header without opening a second environment in this process."""
    import json

    import lmdb

    if not os.path.exists(os.path.join(path, "data.mdb")):
        return 0
    try:
        env = lmdb.open(path, readonly=True, lock=False)
    except lmdb.Error:
        return 0
    try:
        with env.begin() as txn:
            raw = txn.get(b"__meta__")
        return json.loads(raw)["num_keys"] if raw else 0
    finally:
        env.close()


@pytest.mark.slow
def test_kill_9_then_resume_writes_every_image_exactly_once(tmp_path):
    ids = make_images(str(tmp_path / "images"), 16, seed=2)
    out = tmp_path / "feats.lmdb"
    args = _extract(tmp_path, tmp_path / "images", out, "--batch-size", "2", "--workers", "1", "--commit-every", "2")
    proc = subprocess.Popen(args, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        n = _num_keys(str(out))
        if n >= 2:
            proc.send_signal(signal.SIGKILL)
            killed_at = n
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    partial = _num_keys(str(out))
    assert 2 <= partial < len(ids)
    report = check_cache(str(out))
    assert report.ok, report.problems

    done = subprocess.run(args, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming: {partial} of {len(ids)}" in done.stderr
    assert f"{len(ids) - partial} written" in done.stderr
    assert check_cache(str(out)).ok
    with FeatureCacheReader(str(out)) as reader:
        keys = reader.keys()
        assert sorted(keys) == sorted(ids) and len(keys) == len(set(keys))
        assert reader.header["num_keys"] == len(ids)
        for key in keys:
            assert 2 <= reader.get(key)["num_boxes"] <= 6

    again = subprocess.run(args, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 written" in again.stderr


@pytest.mark.slow
def test_shards_and_merge(tmp_path):
    ids = make_images(str(tmp_path / "images"), 5, seed=3)
    out = tmp_path / "feats.lmdb"
    for i in range(2):
        r = subprocess.run(_extract(tmp_path, tmp_path / "images", out, "--shard", f"{i}/2", "--workers", "0"),
                           env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    shards = [str(tmp_path / f"feats.shard{i}of2.lmdb") for i in range(2)]
    with FeatureCacheReader(shards[0]) as a, FeatureCacheReader(shards[1]) as b:
        assert len(a) + len(b) == 5 and not set(a.keys()) & set(b.keys())
    merged = tmp_path / "merged.lmdb"
    r = subprocess.run(cli_args("merge", "--output", str(merged), "--no-progress", *shards),
                       env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with FeatureCacheReader(str(merged)) as reader:
        assert sorted(reader.keys()) == sorted(ids)
        assert reader.header["info"]["model"] == "butd_r101"
    # a shard from other settings is refused, naming the setting
    other = tmp_path / "other.lmdb"
    r = subprocess.run(_extract(tmp_path, tmp_path / "images", other, "--workers", "0", "--conf-thresh", "0.5"),
                       env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(cli_args("merge", "--output", str(tmp_path / "bad.lmdb"), "--no-progress", shards[0], str(other)),
                       env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "info=" in r.stderr


def test_bad_images_give_exit_code_1_and_an_errors_file(tmp_path):
    make_images(str(tmp_path / "images"), 2)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    out = tmp_path / "feats.lmdb"
    r = subprocess.run(_extract(tmp_path, tmp_path / "images", out, "--workers", "2", "--batch-size", "2", "--fp16-store"),
                       env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "2 written" in r.stderr and "1 failed" in r.stderr
    errors = (tmp_path / "feats.lmdb.errors.tsv").read_text().splitlines()
    assert errors[1].startswith("broken\t")
    with FeatureCacheReader(str(out)) as reader:
        assert reader.dtype == "float16" and len(reader) == 2


def test_setup_errors_exit_2_with_a_message(tmp_path):
    make_images(str(tmp_path / "images"), 1)
    env = cli_env(tmp_path)
    base = ["--model", "butd_r101", "--images", str(tmp_path / "images"), "--output", str(tmp_path / "o.lmdb")]
    r = subprocess.run(cli_args(*base), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--weights" in r.stderr
    r = subprocess.run(cli_args(*base, "--weights", str(tmp_path / "nope.pth")), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "weights file not found" in r.stderr and "nope.pth" in r.stderr
    r = subprocess.run(cli_args(*base, "--random-init", "0", "--num-boxes", "36", "--min-boxes", "3"), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--num-boxes" in r.stderr
    r = subprocess.run(cli_args("--model", "butd_r101", "--random-init", "0", "--images", str(tmp_path / "absent"),
                                "--output", str(tmp_path / "o.lmdb")), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_shard_naming_and_torchrun_ranks(monkeypatch):
    from mmf_multilevel.extraction import cli

    assert cli.shard_output("feats.lmdb", 1, 4) == "feats.shard1of4.lmdb"
    assert cli.shard_output("out/feats/", 0, 2) == "out/feats.shard0of2"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli._torchrun_rank() == (3, 8, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli._torchrun_rank() is None
