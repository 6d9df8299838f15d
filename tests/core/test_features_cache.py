"""Region feature cache: format, writer (atomic batches, resume), reader (both layouts), check."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import lmdb
import numpy as np
import pytest

from mmf_multilevel.features import (
    CacheNotFoundError,
    CorruptRecordError,
    FeatureCacheReader,
    FeatureCacheWriter,
    HeaderMismatchError,
    MissingKeyError,
    RecordValidationError,
    UnsafePickleError,
    check_cache,
)
from mmf_multilevel.features import format as fmt
from mmf_multilevel.features.__main__ import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIM = 16
SHA = "ab" * 32


def make_record(seed, n=None, dim=DIM, extras=True):
    """A deterministic record for ``seed`` (so a rerun produces the same content)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 7)) if n is None else n
    xy = rng.uniform(0, 300, size=(n, 2))
    wh = rng.uniform(1, 200, size=(n, 2))
    record = {
        "features": rng.standard_normal((n, dim)).astype(np.float32),
        "boxes": np.concatenate([xy, xy + wh], axis=1),
        "image_w": 640,
        "image_h": 480,
    }
    if extras:
        record["cls_prob"] = rng.random((n, 5)).astype(np.float32)
        record["objects"] = rng.integers(0, 5, size=n)
        record["attr_prob"] = rng.random((n, 3)).astype(np.float32)
        record["attrs"] = rng.integers(0, 3, size=(n, 2))
    return record


def write_cache(path, ids, dtype="float32", batch_size=3, mmf_compat=False, extras=True):
    with FeatureCacheWriter(path, detector="test_det", weights_sha256=SHA, dtype=dtype, batch_size=batch_size, mmf_compat=mmf_compat) as writer:
        for i, image_id in enumerate(ids):
            assert writer.write(image_id, make_record(i, extras=extras))
    return writer


def assert_record_equal(got, want, dtype, image_id, mmf=False):
    store = fmt.DTYPES[dtype]
    if mmf:  # MMF's layout has no attribute fields
        assert "attr_prob" not in got and "attrs" not in got
        want = {k: v for k, v in want.items() if k not in ("attr_prob", "attrs")}
    n = want["features"].shape[0]
    assert got["image_id"] == str(image_id)
    assert got["num_boxes"] == n
    assert (got["image_w"], got["image_h"]) == (want["image_w"], want["image_h"])
    assert got["features"].dtype == store and got["features"].shape == (n, DIM)
    np.testing.assert_array_equal(got["features"], want["features"].astype(store))
    np.testing.assert_array_equal(got["boxes"], want["boxes"].astype(np.float32))
    for name in ("cls_prob", "attr_prob"):
        if name in want:
            np.testing.assert_array_equal(got[name], want[name].astype(store))
    for name in ("objects", "attrs"):
        if name in want:
            np.testing.assert_array_equal(got[name], want[name])


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, dtype):
    path = str(tmp_path / "feats.lmdb")
    ids = [f"img{i}" for i in range(7)] + [42]
    write_cache(path, ids, dtype=dtype)
    with FeatureCacheReader(path) as reader:
        assert len(reader) == len(ids)
        assert sorted(reader.keys()) == sorted(str(i) for i in ids)
        assert reader.layout == "safetensors"
        header = reader.header
        assert header["detector"] == "test_det" and header["weights_sha256"] == SHA
        assert header["dtype"] == dtype and header["feature_dim"] == DIM and header["num_keys"] == len(ids)
        assert header["version"] == fmt.FORMAT_VERSION
        assert reader.feature_dim == DIM and reader.dtype == dtype
        for i, image_id in enumerate(ids):
            assert image_id in reader
            got = reader.get(image_id)
            assert_record_equal(got, make_record(i), dtype, image_id)
            assert got["features"].flags.writeable  # a private copy, safe after the txn
        assert reader.get("42")["image_id"] == "42"
        assert "nope" not in reader and "__meta__" not in reader and "keys" not in reader
        only = reader.get("img3", fields=("features",))
        assert set(only) == {"features", "image_id", "image_w", "image_h", "num_boxes"}
        np.testing.assert_array_equal(only["features"], reader.get("img3")["features"])
    assert check_cache(path, deep=True).ok


def test_records_without_optional_fields_and_mmf_aliases(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    feats = np.ones((2, DIM), np.float32)
    with FeatureCacheWriter(path, detector="d") as writer:
        writer.write("a", {"features": feats, "bbox": [[0, 0, 1, 1], [2, 2, 3, 3]], "image_width": 5, "image_height": 6, "num_boxes": 2})
        writer.write("empty", {"features": np.zeros((0, DIM)), "boxes": np.zeros((0, 4)), "image_w": 5, "image_h": 6})
        assert writer.write("a", {"anything": 1}) is False  # already queued: skipped, not validated
        assert writer.skipped == 1
    with FeatureCacheReader(path) as reader:
        rec = reader.get("a")
        assert set(rec) == {"features", "boxes", "image_id", "image_w", "image_h", "num_boxes"}
        assert (rec["image_w"], rec["image_h"]) == (5, 6)
        assert reader.get("empty")["features"].shape == (0, DIM)


# --------------------------------------------------------------------------- crash and resume
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_features_cache import make_record
    from mmf_multilevel.features import FeatureCacheWriter

    path, mmf_compat, kill_at, total = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
    with FeatureCacheWriter(path, detector="test_det", batch_size=5, mmf_compat=mmf_compat) as writer:
        batches = 0
        for i in range(total):
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            writer.write(f"img{{i:05d}}", make_record(i))
            if writer.batches != batches:
                batches = writer.batches
                print("committed", batches, flush=True)
    """
).format(tests=os.path.join(ROOT, "tests", "core"))


def run_child(path, mmf_compat, kill_at, total):
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", CHILD, path, "1" if mmf_compat else "0", str(kill_at), str(total)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def resume_and_verify(path, mmf_compat, total):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MMF's layout drops the attribute fields, with a warning
        with FeatureCacheWriter(path, detector="test_det", batch_size=5, mmf_compat=mmf_compat) as writer:
            before = len(writer)
            for i in range(total):
                writer.write(f"img{i:05d}", make_record(i))
    assert writer.skipped == before and writer.written == total - before
    report = check_cache(path, deep=True)
    assert report.ok, report.summary()
    with FeatureCacheReader(path) as reader:
        assert len(reader) == total and reader.header["num_keys"] == total
        assert sorted(reader.keys()) == [f"img{i:05d}" for i in range(total)]
        if mmf_compat:
            assert len(set(reader.raw_keys())) == total  # the MMF ``keys`` list has no duplicates
        for i in range(total):
            assert_record_equal(reader.get(f"img{i:05d}"), make_record(i), "float32", f"img{i:05d}", mmf=mmf_compat)


@pytest.mark.parametrize("mmf_compat", [False, True], ids=["safetensors", "mmf"])
def test_kill9_mid_batch_then_resume(tmp_path, mmf_compat):
    path = str(tmp_path / "feats.lmdb")
    child = run_child(path, mmf_compat, kill_at=23, total=40)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    with FeatureCacheReader(path) as reader:  # 4 whole batches of 5 committed; the 5th lost
        assert len(reader) == 20 and reader.header["num_keys"] == 20
        assert sorted(reader.keys()) == [f"img{i:05d}" for i in range(20)]
    resume_and_verify(path, mmf_compat, total=32)


def test_kill9_at_an_arbitrary_moment_leaves_whole_batches(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    child = run_child(path, False, kill_at=-1, total=100000)
    seen = 0
    while seen < 3:
        line = child.stdout.readline()
        assert line, "writer child exited early"
        seen += line.startswith("committed")
    time.sleep(np.random.default_rng().uniform(0, 0.02))
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    report = check_cache(path)
    assert report.ok, report.summary()
    count = report.header["num_keys"]
    assert count >= 15 and count % 5 == 0 and count == report.num_records
    resume_and_verify(path, False, total=count + 7)


def test_exception_inside_a_batch_then_rerun(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    with pytest.raises(RuntimeError, match="detector crashed"):
        with FeatureCacheWriter(path, detector="test_det", batch_size=4) as writer:
            for i in range(10):
                if i == 9:
                    raise RuntimeError("detector crashed")
                writer.write(f"img{i:05d}", make_record(i))
    with FeatureCacheReader(path) as reader:
        assert len(reader) == 8 and len(reader.keys()) == 8  # the partial third batch was dropped
    resume_and_verify(path, False, total=12)


def test_resume_refuses_other_settings(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    write_cache(path, ["a", "b"])
    with pytest.raises(HeaderMismatchError, match="detector='test_det'.*detector='other'"):
        FeatureCacheWriter(path, detector="other", weights_sha256=SHA)
    with pytest.raises(HeaderMismatchError, match="dtype"):
        FeatureCacheWriter(path, detector="test_det", weights_sha256=SHA, dtype="float16")
    with pytest.raises(HeaderMismatchError, match="layout"):
        FeatureCacheWriter(path, detector="test_det", weights_sha256=SHA, mmf_compat=True)
    with FeatureCacheWriter(path, detector="test_det", weights_sha256=SHA) as writer:
        assert writer.existing_keys() == {"a", "b"} and writer.has("a") and not writer.has("c")
        with pytest.raises(RecordValidationError, match=r"image id 'c', field 'features'.*D = 8, but this cache holds D = 16"):
            writer.write("c", make_record(0, dim=8))


def test_map_size_grows(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    with FeatureCacheWriter(path, detector="d", batch_size=10, map_size=256 * 1024) as writer:
        for i in range(40):
            writer.write(i, make_record(i, n=100, extras=False))  # ~7 KB each, 280 KB in all
    with FeatureCacheReader(path) as reader:
        assert len(reader) == 40 and reader.get(39)["features"].shape == (100, DIM)


# --------------------------------------------------------------------------- validation
def _bad(field, value):
    def make():
        record = make_record(0, n=3)
        record[field] = value
        return record

    return make


VALIDATION_CASES = [
    ("boxes", _bad("boxes", np.zeros((3, 5))), "expected shape (3, 4)"),
    ("boxes", _bad("boxes", np.array([[5, 0, 1, 1]] * 3, float)), "x2 < x1"),
    ("boxes", _bad("boxes", np.array([[0, 0, np.inf, 1]] * 3)), "non-finite"),
    ("features", _bad("features", np.full((3, DIM), np.nan)), "non-finite"),
    ("features", _bad("features", np.ones(DIM)), "2-d array"),
    ("features", _bad("features", np.array([["a"] * DIM] * 3)), "numeric"),
    ("num_boxes", _bad("num_boxes", 4), "is 4, but features has 3 rows"),
    ("cls_prob", _bad("cls_prob", np.ones((2, 5))), "expected 3 rows"),
    ("objects", _bad("objects", np.ones(3, np.float32)), "integer ids"),
    ("attrs", _bad("attrs", np.ones((4, 2), int)), "expected 3 rows"),
    ("image_w", _bad("image_w", 0), ">= 1"),
    ("image_id", _bad("image_id", "other"), "written under"),
    ("scores", _bad("scores", np.ones(3)), "unknown field"),
    ("image_h", lambda: {k: v for k, v in make_record(0, n=3).items() if k != "image_h"}, "missing"),
]


@pytest.mark.parametrize("field,make,message", VALIDATION_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(VALIDATION_CASES)])
def test_validation_errors_name_image_and_field(tmp_path, field, make, message):
    path = str(tmp_path / "feats.lmdb")
    with FeatureCacheWriter(path, detector="d") as writer:
        with pytest.raises(RecordValidationError) as info:
            writer.write("COCO_42", make())
    err = info.value
    assert err.image_id == "COCO_42" and err.field == field
    text = str(err)
    assert "'COCO_42'" in text and f"'{field}'" in text and message in text and path in text


def test_float16_overflow_and_reserved_ids(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    with FeatureCacheWriter(path, detector="d", dtype="float16") as writer:
        record = make_record(0, n=2)
        record["features"][1, 3] = 1e6
        with pytest.raises(RecordValidationError, match=r"'img', field 'features': values exceed the float16 range"):
            writer.write("img", record)
        for reserved in ("keys", "__meta__", ""):
            with pytest.raises(RecordValidationError, match="image_id"):
                writer.write(reserved, make_record(0))
        with pytest.raises(RecordValidationError, match="511"):
            writer.write("x" * 600, make_record(0))
    assert len(FeatureCacheReader(path)) == 0


# --------------------------------------------------------------------------- reader errors
def test_missing_path_key_and_corrupt_record(tmp_path):
    missing = str(tmp_path / "absent.lmdb")
    with pytest.raises(CacheNotFoundError, match="absent.lmdb") as info:
        FeatureCacheReader(missing)
    assert isinstance(info.value, FileNotFoundError)

    path = str(tmp_path / "feats.lmdb")
    write_cache(path, ["good"])
    env = lmdb.open(path)
    with env.begin(write=True) as txn:
        txn.put(b"truncated", fmt.encode_record(*fmt.validate_record("truncated", make_record(1, n=4), "float32"))[:-10])
        txn.put(b"garbage", b"\xff" * 20)
        header = b'{"features":{"dtype":"F32","shape":[3,16],"data_offsets":[0,10]}}'
        txn.put(b"badshape", len(header).to_bytes(8, "little") + header + bytes(10))
    env.close()
    with FeatureCacheReader(path) as reader:
        with pytest.raises(KeyError) as info:
            reader.get("nope")
        assert isinstance(info.value, MissingKeyError)
        assert str(info.value) == f"image id 'nope' is not in feature cache {path}"
        with pytest.raises(CorruptRecordError, match=r"feats.lmdb: key 'truncated': tensor data ends at byte \d+ but the data buffer has \d+ bytes"):
            reader.get("truncated")
        with pytest.raises(CorruptRecordError, match=r"feats.lmdb: field 'features' of key 'badshape': .*does not fit data offsets \[0, 10\)"):
            reader.get("badshape")
        with pytest.raises(ValueError, match=r"key 'garbage': safetensors header length"):
            reader.get("garbage")
    report = check_cache(path)
    assert not report.ok
    bad = dict(report.problems)
    assert set(bad) == {"__meta__", "truncated", "garbage", "badshape"}
    assert "header num_keys is 1 but the database holds 4 records" in bad["__meta__"]


# --------------------------------------------------------------------------- MMF layout, restricted unpickling
def mmf_item(name, n=3, dim=DIM, protocol_scalars=True):
    rng = np.random.default_rng(0)
    return {
        "feature_path": name,
        "features": rng.random((n, dim)).astype(np.float32),
        "image_height": np.int64(480) if protocol_scalars else 480,
        "image_width": 640,
        "num_boxes": n,
        "objects": np.arange(n),
        "cls_prob": rng.random((n, 4)).astype(np.float32),
        "bbox": np.tile(np.array([1, 2, 30, 40], np.float32), (n, 1)),
    }


def write_mmf_lmdb(path, items, keys=None, protocol=pickle.DEFAULT_PROTOCOL):
    """MMF's own layout, as tools/scripts/features/lmdb_conversion.py writes it."""
    env = lmdb.open(path, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value if isinstance(value, bytes) else pickle.dumps(value, protocol=protocol))
        txn.put(b"keys", keys if keys is not None else pickle.dumps(list(items)))
    env.close()


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w')",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_reads_legit_mmf_records(tmp_path, protocol):
    path = str(tmp_path / "mmf.lmdb")
    write_mmf_lmdb(path, {b"COCO_1": mmf_item("COCO_1"), b"sub/dir/2": mmf_item("sub/dir/2", n=2)}, protocol=protocol)
    with FeatureCacheReader(path) as reader:
        assert reader.layout == "mmf" and reader.header is None
        assert reader.feature_dim == DIM and reader.dtype == "float32"
        assert reader.keys() == ["COCO_1", "sub/dir/2"] and len(reader) == 2
        rec = reader.get("COCO_1")
        want = mmf_item("COCO_1")
        assert set(rec) == {"image_id", "features", "boxes", "image_h", "image_w", "num_boxes", "objects", "cls_prob"}
        assert (rec["image_id"], rec["image_h"], rec["image_w"], rec["num_boxes"]) == ("COCO_1", 480, 640, 3)
        assert type(rec["image_h"]) is int
        np.testing.assert_array_equal(rec["features"], want["features"])
        np.testing.assert_array_equal(rec["boxes"], want["bbox"])
        np.testing.assert_array_equal(rec["cls_prob"], want["cls_prob"])
        assert reader.get("sub/dir/2")["features"].shape == (2, DIM)
    assert check_cache(path, deep=True).ok


@pytest.mark.parametrize("payload,refused", [(_SystemCall, "system"), (_EvalCall, "builtins.eval")])
def test_restricted_unpickler_refuses_code(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "mmf.lmdb")
    evil = mmf_item("evil")
    evil["objects"] = payload(str(marker))
    write_mmf_lmdb(path, {b"good": mmf_item("good"), b"evil": evil})
    with FeatureCacheReader(path) as reader:
        assert reader.get("good")["num_boxes"] == 3
        with pytest.raises(UnsafePickleError) as info:
            reader.get("evil")
    assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, ValueError)
    text = str(info.value)
    assert path in text and "'evil'" in text and refused in text and "refused" in text
    assert not marker.exists()
    report = check_cache(path)
    assert [key for key, _ in report.problems] == ["evil"]


def test_malicious_keys_entry_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "mmf.lmdb")
    write_mmf_lmdb(path, {b"a": mmf_item("a")}, keys=pickle.dumps([b"a", _SystemCall(str(marker))]))
    reader = FeatureCacheReader(path)
    with pytest.raises(UnsafePickleError, match=r"mmf.lmdb: key 'keys': the pickle refers to .*system"):
        reader.get("a")
    assert not marker.exists()
    assert cli_main(["check", path]) == 1


def test_mmf_compat_writer_layout(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    ids = ["COCO_val2014_000000000042", "7", "sub/dir/img", "x"]
    with pytest.warns(UserWarning, match=r"no field for \['attr_prob', 'attrs'\]"):
        write_cache(path, ids, batch_size=3, mmf_compat=True)
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        assert pickle.loads(txn.get(b"keys")) == [i.encode() for i in ids]
        item = pickle.loads(txn.get(b"7"))  # our own trusted output: what stock MMF sees
    env.close()
    assert list(item) == list(fmt.MMF_FIELDS)
    want = make_record(1)
    assert item["feature_path"] == "7" and item["image_height"] == 480 and item["image_width"] == 640
    assert item["num_boxes"] == want["features"].shape[0] and item["features"].dtype == np.float32
    np.testing.assert_array_equal(item["bbox"], want["boxes"].astype(np.float32))
    with FeatureCacheReader(path) as reader:
        assert reader.layout == "mmf" and reader.header["layout"] == "mmf" and reader.header["num_keys"] == 4
        assert reader.keys() == ids
        for i, image_id in enumerate(ids):
            assert_record_equal(reader.get(image_id), make_record(i), "float32", image_id, mmf=True)
    assert check_cache(path, deep=True).ok


def test_stock_mmf_feature_reader_reads_mmf_compat_output(tmp_path):
    from mmf.datasets.databases.readers.feature_readers import FeatureReader

    path = str(tmp_path / "feats.lmdb")
    ids = ["COCO_val2014_000000000042", "9", "sub/dir/img"]
    write_cache(path, ids, mmf_compat=True, extras=False)
    reader = FeatureReader(base_path=path, depth_first=False, max_features=10)
    requests = ["COCO_val2014_000000000042.npy", "COCO_train2014_000000000009.npy", "sub/dir/img.npy"]
    for i, request in enumerate(requests):
        features, info = reader.read(request)
        want = make_record(i, extras=False)
        n = want["features"].shape[0]
        assert tuple(features.shape) == (10, DIM)
        np.testing.assert_allclose(features[:n].numpy(), want["features"])
        assert not features[n:].any()
        assert int(info["max_features"]) == n and info["num_boxes"] == n
        assert info["feature_path"] == ids[i]
        assert (info["image_height"], info["image_width"]) == (480, 640)
        np.testing.assert_array_equal(info["bbox"], want["boxes"].astype(np.float32))


def test_convert_between_layouts(tmp_path):
    src = str(tmp_path / "mmf.lmdb")
    write_mmf_lmdb(src, {b"a": mmf_item("a"), b"b": mmf_item("b", n=1)})
    dst = str(tmp_path / "ours.lmdb")
    assert cli_main(["convert", src, dst, "--detector", "butd", "--dtype", "float16"]) == 0
    with FeatureCacheReader(dst) as reader, FeatureCacheReader(src) as original:
        assert reader.header["dtype"] == "float16" and reader.header["detector"] == "butd"
        for key in ("a", "b"):
            np.testing.assert_array_equal(reader.get(key)["features"], original.get(key)["features"].astype(np.float16))
            np.testing.assert_array_equal(reader.get(key)["boxes"], original.get(key)["boxes"])
    assert cli_main(["convert", src, dst, "--detector", "butd", "--dtype", "float16"]) == 0  # resumes: nothing to do


# --------------------------------------------------------------------------- processes
class _Dataset:
    def __init__(self, reader, keys):
        self.reader, self.keys = reader, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, idx):
        record = self.reader.get(self.keys[idx])
        return self.keys[idx], float(record["features"].astype(np.float64).sum()), os.getpid()


@pytest.mark.parametrize("mmf_compat", [False, True], ids=["safetensors", "mmf"])
def test_reader_in_forked_dataloader_workers(tmp_path, mmf_compat):
    import torch

    path = str(tmp_path / "feats.lmdb")
    ids = [f"img{i}" for i in range(24)]
    write_cache(path, ids, mmf_compat=mmf_compat, batch_size=8, extras=not mmf_compat)
    reader = FeatureCacheReader(path)
    expected = {k: float(reader.get(k)["features"].astype(np.float64).sum()) for k in ids}  # opened in the parent
    loader = torch.utils.data.DataLoader(
        _Dataset(reader, ids), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    got, pids = {}, set()
    for key, total, pid in loader:
        got[key] = total
        pids.add(pid)
    assert got == expected
    assert os.getpid() not in pids and len(pids) == 2
    assert reader.get("img0")["image_id"] == "img0"  # the parent's environment still works
    reader.close()


def test_readers_share_one_environment_and_pickle(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    write_cache(path, ["a", "b"])
    first, second = FeatureCacheReader(path), FeatureCacheReader(path)
    assert first.get("a")["image_id"] == "a" and second.get("b")["image_id"] == "b"
    assert first._state() is second._state()  # LMDB refuses a second environment per process
    first.close()
    assert second.get("b")["image_id"] == "b"
    clone = pickle.loads(pickle.dumps(second))
    assert clone.get("a")["image_id"] == "a"
    second.close()
    clone.close()


# --------------------------------------------------------------------------- CLI
def test_cli_check_and_info(tmp_path):
    path = str(tmp_path / "feats.lmdb")
    write_cache(path, [f"img{i}" for i in range(5)])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([sys.executable, "-m", "mmf_multilevel.features", "check", path, "--deep"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "checked 5 records" in ok.stdout and ok.stdout.rstrip().endswith("OK")

    db = lmdb.open(path)
    with db.begin(write=True) as txn:
        arrays, meta = fmt.validate_record("img2", make_record(2, n=3), "float32")
        arrays["features"] = arrays["features"].copy()
        arrays["features"][0, 0] = np.nan
        txn.put(b"img2", fmt.encode_record(arrays, meta), overwrite=True)
        arrays, meta = fmt.validate_record("img9", make_record(9, n=3), "float32")
        txn.put(b"img9", fmt.encode_record(arrays, meta))
    db.close()
    shallow = subprocess.run([sys.executable, "-m", "mmf_multilevel.features", "check", path], capture_output=True, text=True, env=env)
    assert shallow.returncode == 1
    assert "__meta__: header num_keys is 5 but the database holds 6 records" in shallow.stdout
    assert "img2" not in shallow.stdout  # NaN is only looked for with --deep
    deep = subprocess.run([sys.executable, "-m", "mmf_multilevel.features", "check", path, "--deep"], capture_output=True, text=True, env=env)
    assert deep.returncode == 1
    assert "img2: image id 'img2', field 'features': 1 non-finite value(s)" in deep.stdout
    assert "FAILED: 2 problem(s)" in deep.stdout

    info = subprocess.run([sys.executable, "-m", "mmf_multilevel.features", "info", path], capture_output=True, text=True, env=env)
    assert info.returncode == 0 and '"num_keys": 5' in info.stdout and '"lmdb_entries": 7' in info.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "mmf_multilevel.features", "check", str(tmp_path / "nope.lmdb")], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 1 and "path does not exist" in missing.stdout


def test_check_reports_a_broken_header(tmp_path, capsys):
    path = str(tmp_path / "feats.lmdb")
    write_cache(path, ["a"])
    db = lmdb.open(path)
    with db.begin(write=True) as txn:
        txn.put(b"__meta__", b'{"format": "something else"}')
    db.close()
    assert cli_main(["check", path]) == 1
    out = capsys.readouterr().out
    assert "__meta__:" in out and "the header lacks" in out and "FAILED: 1 problem(s)" in out
    with pytest.raises(CorruptRecordError, match="key '__meta__'"):
        FeatureCacheReader(path).get("a")
    with pytest.raises(CorruptRecordError, match="key '__meta__'"):
        FeatureCacheWriter(path, detector="test_det")
