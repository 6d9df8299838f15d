"""Integrity check and summary of a feature cache."""
import dataclasses
import os

import numpy as np

from mmf_multilevel.features import format as fmt
from mmf_multilevel.features.reader import FeatureCacheReader


@dataclasses.dataclass
class CheckReport:
    """Result of :func:`check_cache`; ``problems`` is a list of ``(key, message)``."""

    path: str
    deep: bool
    layout: str = None
    header: dict = None
    entries: int = 0
    num_records: int = 0
    checked: int = 0
    min_boxes: int = None
    max_boxes: int = None
    total_boxes: int = 0
    problems: list = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        return not self.problems

    def summary(self):
        lines = []
        header = self.header or {}
        desc = f"layout {self.layout}" if self.layout else "layout unknown"
        if header:
            desc += f", detector {header['detector']}, {header['dtype']}, feature dim {header['feature_dim']}"
            desc += f", header num_keys {header['num_keys']}"
        elif self.layout == fmt.LAYOUT_MMF:
            desc += " (written by MMF's tools: no header)"
        lines.append(f"{self.path}: {desc}")
        if self.layout:
            lines.append(f"records: {self.num_records} ({self.entries} LMDB entries)")
        if self.checked:
            mean = self.total_boxes / self.checked
            lines.append(f"boxes per image: min {self.min_boxes}, mean {mean:.1f}, max {self.max_boxes}")
        if self.layout:
            mode = "deep: every array decoded, values checked" if self.deep else "shapes and metadata"
            lines.append(f"checked {self.checked} records ({mode})")
        if self.ok:
            lines.append("OK")
        else:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            for key, message in self.problems:
                lines.append(f"  {key}: {message}")
        return "\n".join(lines)


def _add(report, key, message):
    report.problems.append((fmt._key_text(key), message))


def check_cache(path, deep=False, progress=False):
    """Verify header vs data, that every record decodes, shapes agree and (``deep``) values are finite."""
    path = os.fspath(path)
    report = CheckReport(path=path, deep=deep)
    if not os.path.exists(path):
        _add(report, "<cache>", f"path does not exist: {path}")
        return report
    reader = FeatureCacheReader(path)
    try:
        report.layout = reader.layout
        report.header = reader.header
    except fmt.FeatureCacheError as exc:
        _add(report, getattr(exc, "key", "<cache>"), str(exc))
        return report
    try:
        _check(reader, report, progress)
    finally:
        reader.close()
    return report


def _check(reader, report, progress):
    env = reader._open()
    header = report.header
    with env.begin(buffers=True) as txn:
        report.entries = txn.stat()["entries"]
        data_keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False) if bytes(k) not in fmt.RESERVED_KEYS]
    report.num_records = len(data_keys)
    if header is not None and header["num_keys"] != len(data_keys):
        _add(report, fmt.HEADER_KEY, f"header num_keys is {header['num_keys']} but the database holds {len(data_keys)} records")
    if report.layout == fmt.LAYOUT_MMF:
        listed = reader.raw_keys()
        listed_set = set(listed)
        if len(listed_set) != len(listed):
            _add(report, fmt.MMF_KEYS_KEY, f"lists {len(listed) - len(listed_set)} key(s) more than once")
        present = set(data_keys)
        for key in listed:
            if key not in present:
                _add(report, key, "listed in the MMF 'keys' entry but missing from the database")
        for key in data_keys:
            if key not in listed_set:
                _add(report, key, "in the database but not listed in the MMF 'keys' entry (stock MMF readers will not find it)")
        if header is not None and header["num_keys"] != len(listed):
            _add(report, fmt.HEADER_KEY, f"header num_keys is {header['num_keys']} but the MMF 'keys' entry lists {len(listed)}")

    dtype = header["dtype"] if header else None
    feature_dim = header["feature_dim"] if header else None
    iterator = data_keys
    if progress:
        from tqdm import tqdm

        iterator = tqdm(data_keys, desc=f"check {os.path.basename(report.path.rstrip('/'))}", unit="rec")
    with env.begin(buffers=True) as txn:
        for key in iterator:
            raw = txn.get(key)
            try:
                record = _decode(reader, report, raw, key)
                feature_dim = _validate(report, key, record, dtype, feature_dim)
            except fmt.FeatureCacheError as exc:
                _add(report, key, str(exc))
                continue
            if report.deep and report.layout == fmt.LAYOUT_SAFETENSORS:
                _cross_check(report, key, raw, record)
            n = record["num_boxes"]
            report.checked += 1
            report.total_boxes += n
            report.min_boxes = n if report.min_boxes is None else min(report.min_boxes, n)
            report.max_boxes = n if report.max_boxes is None else max(report.max_boxes, n)


def _decode(reader, report, raw, key):
    if report.layout == fmt.LAYOUT_MMF:
        return fmt.mmf_to_record(fmt.restricted_loads(raw, reader.path, key), reader.path, key)
    record = fmt.decode_record(raw, reader.path, key, copy=False)
    if record["image_id"] != key.decode("utf-8", "replace"):
        raise fmt.CorruptRecordError(reader.path, key, f"metadata image_id is {record['image_id']!r}", field="image_id")
    return record


def _validate(report, key, record, dtype, feature_dim):
    """Shape (and with ``deep`` value) checks; returns the feature dim seen so far."""
    text = key.decode("utf-8", "replace")
    features = record.get("features")
    if report.layout == fmt.LAYOUT_MMF:
        # MMF's tools do not record a dtype; take what the record has, and records
        # without box info (``features`` only) are legal there.
        if isinstance(features, np.ndarray) and features.dtype.name in fmt.DTYPES:
            dtype = features.dtype.name
        else:
            raise fmt.RecordValidationError(text, "features", f"expected a float16/float32 array, got {getattr(features, 'dtype', type(features))}")
        if "boxes" not in record:
            record = dict(record, boxes=np.zeros((features.shape[0] if features.ndim else 0, 4), np.float32))
            record.setdefault("image_w", 1)
            record.setdefault("image_h", 1)
    extra = set(record) - set(fmt.RECORD_FIELDS)
    if extra:
        record = {k: v for k, v in record.items() if k not in extra}
    fmt.validate_record(text, record, dtype, feature_dim, check_values=report.deep, cast=False, path=report.path)
    return feature_dim if feature_dim is not None else int(features.shape[1])


def _cross_check(report, key, raw, record):
    """Decode with the safetensors library too and compare (guards our fast parser)."""
    from safetensors.numpy import load

    try:
        reference = load(bytes(raw))
    except Exception as exc:
        _add(report, key, f"the safetensors library cannot decode the record ({exc})")
        return
    for name, arr in reference.items():
        ours = record.get(name)
        if ours is None or ours.dtype != arr.dtype or ours.shape != arr.shape or not np.array_equal(ours, arr):
            _add(report, key, f"field {name!r}: our decoder and the safetensors library disagree")


def cache_info(path):
    """Header, layout and sizes of a cache (dict)."""
    reader = FeatureCacheReader(path)
    try:
        env = reader._open()
        with env.begin() as txn:
            entries = txn.stat()["entries"]
        data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
        return {
            "path": reader.path,
            "layout": reader.layout,
            "header": reader.header,
            "num_records": len(reader),
            "lmdb_entries": entries,
            "file_bytes": os.path.getsize(data_file),
        }
    finally:
        reader.close()
