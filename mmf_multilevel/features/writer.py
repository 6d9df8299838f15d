"""Resumable, batch-atomic writer of the region feature cache."""
import json
import os
import re
import warnings

import lmdb

from mmf_multilevel.features import format as fmt

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAP_SIZE = 1 << 30


class FeatureCacheWriter:
    """Write region features to an LMDB cache, one write transaction per batch.

    ::

        with FeatureCacheWriter("feats.lmdb", detector="vinvl_x152c4", weights_sha256=sha) as w:
            for image_id in ids:
                if not w.has(image_id):
                    w.write(image_id, {"features": f, "boxes": b, "image_w": w_, "image_h": h_})

    Every ``batch_size`` records are committed in one transaction together with the header
    (whose ``num_keys`` therefore always equals the number of records, even after kill -9).
    Re-opening an existing cache resumes it: ids already present are skipped by ``write``
    (which then returns False). The settings (layout, detector, weights, dtype, feature dim)
    must match the existing header. On an exception inside the ``with`` block the batch in
    progress is dropped; the committed batches stay. ``mmf_compat=True`` writes MMF's pickled
    layout (plus its ``keys`` entry, rewritten with each batch) for stock MMF readers; its
    path must end in ``.lmdb``. One writer per cache at a time.
    ``info`` (optional JSON-serialisable dict: model, thresholds, class names ...) is stored in the
    header under ``"info"``; on resume its keys must agree with the stored ones (new keys are added).
    """

    def __init__(
        self,
        path,
        detector,
        weights_sha256=None,
        dtype="float32",
        batch_size=256,
        mmf_compat=False,
        feature_dim=None,
        map_size=DEFAULT_MAP_SIZE,
        info=None,
    ):
        self.path = os.fspath(path)
        if not isinstance(detector, str) or not detector:
            raise ValueError(f"{self.path}: detector must be a non-empty name, got {detector!r}")
        if weights_sha256 is not None:
            weights_sha256 = str(weights_sha256).lower()
            if not _SHA256.match(weights_sha256):
                raise ValueError(f"{self.path}: weights_sha256 must be 64 hex digits, got {weights_sha256!r}")
        if dtype not in fmt.DTYPES:
            raise ValueError(f"{self.path}: dtype must be one of {list(fmt.DTYPES)}, got {dtype!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{self.path}: batch_size must be a positive int, got {batch_size!r}")
        if feature_dim is not None and (not isinstance(feature_dim, int) or feature_dim < 1):
            raise ValueError(f"{self.path}: feature_dim must be a positive int, got {feature_dim!r}")
        if mmf_compat and not self.path.rstrip("/").endswith(".lmdb"):
            raise ValueError(f"{self.path}: an MMF-compatible cache must end in '.lmdb' (MMF picks its LMDB reader by that suffix)")
        if info is not None:
            if not isinstance(info, dict):
                raise ValueError(f"{self.path}: info must be a JSON-serialisable dict, got {type(info).__name__}")
            try:  # normalise (tuples -> lists ...) so it compares equal to what a resumed run reads back
                info = json.loads(json.dumps(info, sort_keys=True))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{self.path}: info must be JSON-serialisable ({exc})") from None
        self.info = info
        self.layout = fmt.LAYOUT_MMF if mmf_compat else fmt.LAYOUT_SAFETENSORS
        self.detector = detector
        self.weights_sha256 = weights_sha256
        self.dtype = dtype
        self.batch_size = batch_size
        self.written = 0
        self.skipped = 0
        self.batches = 0
        self._pending = []
        self._pending_keys = set()
        self._existing = set()
        self._key_list = []  # MMF layout: the ``keys`` entry, in insertion order
        self._warned_dropped = False
        self._env = None
        self._open(map_size, feature_dim)

    # ------------------------------------------------------------------ opening
    def _open(self, map_size, feature_dim):
        if os.path.exists(self.path):
            subdir = os.path.isdir(self.path)
        else:
            os.makedirs(self.path)
            subdir = True
        try:
            self._env = lmdb.open(self.path, subdir=subdir, map_size=map_size, max_dbs=0)
        except lmdb.Error as exc:
            hint = ""
            if "already open" in str(exc):
                hint = "; a FeatureCacheReader or another writer on this path is open in this process, close it first"
            raise fmt.FeatureCacheError(f"{self.path}: cannot open the LMDB environment for writing ({exc}){hint}") from None
        try:
            self._load_state(feature_dim)
        except BaseException:
            self._env.close()
            self._env = None
            raise

    def _load_state(self, feature_dim):
        with self._env.begin() as txn:
            raw_header = txn.get(fmt.HEADER_KEY)
            raw_keys = txn.get(fmt.MMF_KEYS_KEY)
            entries = txn.stat()["entries"]
        reserved = (raw_header is not None) + (raw_keys is not None)
        if raw_header is not None:
            header = fmt.decode_header(raw_header, self.path)
            self._check_header(header, feature_dim)
            self._merge_info(header.get("info"))
            self._load_keys(header["layout"], raw_keys)
            data_entries = entries - reserved
            if header["num_keys"] != len(self._existing) or data_entries != len(self._existing):
                raise fmt.CorruptCacheError(
                    f"{self.path}: header says {header['num_keys']} keys, the database holds {data_entries} records"
                    f" and lists {len(self._existing)}; run `python -m mmf_multilevel.features check {self.path}`"
                )
            self._feature_dim = header["feature_dim"] or feature_dim
            return
        if raw_keys is not None:
            if self.layout != fmt.LAYOUT_MMF:
                raise fmt.HeaderMismatchError(
                    f"{self.path} is an MMF-layout cache (it has a 'keys' entry and no header); "
                    "open it with mmf_compat=True to append, or write to a new path"
                )
            self._load_keys(fmt.LAYOUT_MMF, raw_keys)
            if entries - 1 != len(self._existing):
                raise fmt.CorruptCacheError(
                    f"{self.path}: the MMF 'keys' entry lists {len(self._existing)} keys but the database holds {entries - 1} records"
                )
            self._feature_dim = feature_dim or self._dim_of_first_record()
        elif entries:
            raise fmt.CorruptCacheError(
                f"{self.path} holds {entries} entries but neither a {fmt.HEADER_KEY.decode()!r} header nor an MMF 'keys' entry; "
                "it is not a feature cache (refusing to write into it)"
            )
        else:
            self._feature_dim = feature_dim
        self._commit([])  # write the header (and ``keys``) so even an empty cache is readable

    def _check_header(self, header, feature_dim):
        wanted = {
            "layout": self.layout,
            "detector": self.detector,
            "weights_sha256": self.weights_sha256,
            "dtype": self.dtype,
        }
        for name, value in wanted.items():
            if header[name] != value:
                raise fmt.HeaderMismatchError(
                    f"{self.path}: existing cache has {name}={header[name]!r}, this writer was given {name}={value!r}; "
                    "features from different settings must not be mixed (use a new path)"
                )
        if feature_dim is not None and header["feature_dim"] not in (None, feature_dim):
            raise fmt.HeaderMismatchError(
                f"{self.path}: existing cache has feature_dim={header['feature_dim']}, this writer was given feature_dim={feature_dim}"
            )

    def _merge_info(self, existing):
        """Resume: keys in both the stored and the given ``info`` must agree; the others are kept/added."""
        if existing is None:
            return
        if self.info is None:
            self.info = existing
            return
        for name in sorted(set(existing) & set(self.info)):
            if existing[name] != self.info[name]:
                raise fmt.HeaderMismatchError(
                    f"{self.path}: existing cache has info[{name!r}]={_short(existing[name])}, this writer was given "
                    f"info[{name!r}]={_short(self.info[name])}; features from different settings must not be mixed (use a new path)"
                )
        self.info = {**existing, **self.info}

    def _load_keys(self, layout, raw_keys):
        if layout == fmt.LAYOUT_MMF:
            if raw_keys is None:
                raise fmt.CorruptCacheError(f"{self.path}: the header says layout 'mmf' but there is no 'keys' entry")
            self._key_list = fmt.decode_mmf_keys(raw_keys, self.path)
            self._existing = set(self._key_list)
            if len(self._existing) != len(self._key_list):
                raise fmt.CorruptCacheError(f"{self.path}: the MMF 'keys' entry lists some keys more than once")
            return
        with self._env.begin() as txn:
            self._existing = {
                bytes(k) for k in txn.cursor().iternext(keys=True, values=False) if bytes(k) not in fmt.RESERVED_KEYS
            }

    def _dim_of_first_record(self):
        if not self._key_list:
            return None
        with self._env.begin() as txn:
            raw = txn.get(self._key_list[0])
        if raw is None:
            raise fmt.CorruptCacheError(f"{self.path}: key {self._key_list[0]!r} is listed in 'keys' but missing")
        record = fmt.mmf_to_record(fmt.restricted_loads(raw, self.path, self._key_list[0]), self.path, self._key_list[0])
        features = record["features"]
        return int(features.shape[1]) if features.ndim == 2 else None

    # ------------------------------------------------------------------ public API
    @property
    def feature_dim(self):
        return self._feature_dim

    @property
    def header(self):
        return fmt.make_header(
            self.layout, self.detector, self.weights_sha256, self.dtype, self._feature_dim, len(self._existing), self.info
        )

    def has(self, image_id):
        """True if ``image_id`` is committed or queued in the current batch."""
        key = fmt.lookup_key(image_id)
        return key in self._existing or key in self._pending_keys

    __contains__ = has

    def existing_keys(self):
        """The committed image ids (str)."""
        return frozenset(k.decode("utf-8") for k in self._existing)

    def __len__(self):
        return len(self._existing)

    def write(self, image_id, record):
        """Validate and queue one record; returns False (and writes nothing) if the id is already present."""
        if self._env is None:
            raise fmt.FeatureCacheError(f"{self.path}: the writer is closed")
        key, text = fmt.encode_key(image_id)
        if key in self._existing or key in self._pending_keys:
            self.skipped += 1
            return False
        arrays, meta = fmt.validate_record(text, record, self.dtype, self._feature_dim, path=self.path)
        if self.layout == fmt.LAYOUT_MMF:
            dropped = sorted(set(arrays) - {"features", "boxes", "objects", "cls_prob"})
            if dropped and not self._warned_dropped:
                self._warned_dropped = True
                warnings.warn(
                    f"{self.path}: MMF's layout has no field for {dropped}; they are not stored (first seen at image id {text!r})",
                    stacklevel=2,
                )
            value = fmt.encode_mmf_record(arrays, meta)
        else:
            value = fmt.encode_record(arrays, meta)
        if self._feature_dim is None:
            self._feature_dim = int(arrays["features"].shape[1])
        self._pending.append((key, value))
        self._pending_keys.add(key)
        if len(self._pending) >= self.batch_size:
            self.flush()
        return True

    def flush(self):
        """Commit the queued records (one transaction, header included)."""
        if self._pending:
            self._commit(self._pending)
            self.batches += 1

    def close(self):
        """Commit what is queued and close the environment."""
        if self._env is None:
            return
        try:
            self.flush()
        finally:
            self._env.close()
            self._env = None

    def abort(self):
        """Drop the queued records and close; committed batches are kept."""
        self._pending.clear()
        self._pending_keys.clear()
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    # ------------------------------------------------------------------ commit
    def _commit(self, batch):
        keys = [key for key, _ in batch]
        key_list = self._key_list + keys if self.layout == fmt.LAYOUT_MMF else None
        header = fmt.make_header(
            self.layout, self.detector, self.weights_sha256, self.dtype, self._feature_dim, len(self._existing) + len(batch), self.info
        )
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in batch:
                        if not txn.put(key, value, overwrite=False):
                            raise fmt.CorruptCacheError(
                                f"{self.path}: key {key.decode('utf-8')!r} appeared while this writer was open; "
                                "only one writer may write a cache at a time"
                            )
                    if key_list is not None:
                        txn.put(fmt.MMF_KEYS_KEY, fmt.encode_mmf_keys(key_list))
                    txn.put(fmt.HEADER_KEY, fmt.encode_header(header))
                break
            except lmdb.MapFullError:
                self._grow(sum(len(v) for _, v in batch))
        self._existing.update(keys)
        if key_list is not None:
            self._key_list = key_list
        self.written += len(batch)
        self._pending = []
        self._pending_keys = set()

    def _grow(self, batch_bytes):
        current = self._env.info()["map_size"]
        new_size = max(current * 2, current + 4 * batch_bytes + (1 << 20))
        self._env.set_mapsize(new_size)


def _short(value, limit=80):
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
