"""Random-access reader of region feature caches (ours and MMF's LMDB layout)."""
import os
import threading

import lmdb

from mmf_multilevel.features import format as fmt


class _SharedEnv:
    """One read-only environment per (process, cache path), shared by every reader of it."""

    def __init__(self, path, real):
        self.real = real
        self.pid = os.getpid()
        self.refs = 0
        if not os.path.exists(path):
            raise fmt.CacheNotFoundError(path)
        try:
            self.env = lmdb.open(
                path,
                subdir=os.path.isdir(path),
                readonly=True,
                lock=False,
                readahead=False,
                meminit=False,
                max_readers=2048,
            )
        except lmdb.Error as exc:
            hint = ""
            if "already open" in str(exc):
                hint = "; a FeatureCacheWriter (or another LMDB handle) on this path is still open in this process, close it first"
            raise fmt.CorruptCacheError(f"{path}: cannot open as an LMDB environment ({exc}){hint}") from None
        try:
            self._load_layout(path)
        except BaseException:
            self.env.close()
            raise

    def _load_layout(self, path):
        with self.env.begin(buffers=True) as txn:
            raw_header = txn.get(fmt.HEADER_KEY)
            header = None if raw_header is None else fmt.decode_header(raw_header, path)
            raw_keys = txn.get(fmt.MMF_KEYS_KEY)
            keys = None if raw_keys is None else fmt.decode_mmf_keys(raw_keys, path)
            entries = txn.stat()["entries"]
        if header is not None:
            layout = header["layout"]
        elif keys is not None:
            layout = fmt.LAYOUT_MMF
        else:
            raise fmt.CorruptCacheError(
                f"{path} is not a feature cache: it has no {fmt.HEADER_KEY.decode()!r} header and no MMF 'keys' entry "
                f"({entries} entries)"
            )
        self.mmf_keys = self.mmf_index = None
        if layout == fmt.LAYOUT_MMF:
            if keys is None:
                raise fmt.CorruptCacheError(f"{path}: the header says layout 'mmf' but there is no 'keys' entry")
            self.mmf_keys = keys
            self.mmf_index = {k: i for i, k in enumerate(keys)}
        self.header = header
        self.layout = layout


_SHARED = {}
_SHARED_LOCK = threading.Lock()


def _acquire(path):
    real = os.path.realpath(path)
    with _SHARED_LOCK:
        shared = _SHARED.get(real)
        if shared is not None and shared.pid != os.getpid():
            # Inherited through fork: close this process's copy (the parent's stays open)
            # so that LMDB lets this process open the environment again.
            try:
                shared.env.close()
            except lmdb.Error:
                pass
            del _SHARED[real]
            shared = None
        if shared is None:
            shared = _SharedEnv(path, real)
            _SHARED[real] = shared
        shared.refs += 1
        return shared


def _release(shared):
    with _SHARED_LOCK:
        if shared.pid != os.getpid():
            return
        shared.refs -= 1
        if shared.refs <= 0:
            if _SHARED.get(shared.real) is shared:
                del _SHARED[shared.real]
            shared.env.close()


class FeatureCacheReader:
    """Read records by image id from a feature cache.

    ``get(image_id)`` returns ``{"features", "boxes", [cls_prob, objects, attr_prob, attrs],
    "image_id", "image_w", "image_h", "num_boxes"}`` with numpy arrays. Records of MMF's
    pickled layout are decoded with a restricted unpickler and mapped to the same names
    (``bbox`` -> ``boxes``, ``image_height`` -> ``image_h``, ``image_width`` -> ``image_w``).

    The LMDB environment is opened lazily, read-only and without locking (like MMF's own
    reader), once per process and path: readers of the same cache share it, and a reader
    built in the main process re-opens it in forked DataLoader workers. The cache must not
    be written while it is read; close a writer on the same path before reading it.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise fmt.CacheNotFoundError(self.path)
        self._shared = None
        self._lock = threading.Lock()

    def _state(self):
        shared = self._shared
        if shared is not None and shared.pid == os.getpid():
            return shared
        with self._lock:
            if self._shared is None or self._shared.pid != os.getpid():
                self._shared = _acquire(self.path)
            return self._shared

    def _open(self):
        return self._state().env

    def close(self):
        """Release this process's environment (it re-opens on the next read)."""
        with self._lock:
            if self._shared is not None:
                _release(self._shared)
            self._shared = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._shared = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ metadata
    @property
    def header(self):
        """The JSON header (dict), or None for an MMF cache written by MMF's own tools."""
        header = self._state().header
        return None if header is None else dict(header)

    @property
    def object_names(self):
        """The header's ``info.object_names`` (the detector's class names, ``objects`` id k = name k, as the
        extractor and the demo generator write them) as a list, or None when the header has none."""
        header = self.header or {}
        info = header.get("info") if isinstance(header.get("info"), dict) else {}
        names = info.get("object_names")
        return list(names) if names else None

    @property
    def layout(self):
        """``"safetensors"`` or ``"mmf"``."""
        return self._state().layout

    @property
    def feature_dim(self):
        """D of the ``features`` arrays (from the header, else the first record); None if empty."""
        return self._describe()[0]

    @property
    def dtype(self):
        """``"float32"``/``"float16"`` (from the header, else the first record); None if empty."""
        return self._describe()[1]

    def _describe(self):
        state = self._state()
        if state.header is not None:
            return state.header["feature_dim"], state.header["dtype"]
        if not state.mmf_keys:
            return None, None
        features = self.get(state.mmf_keys[0], fields=("features",))["features"]
        return (int(features.shape[1]) if features.ndim == 2 else None), features.dtype.name

    def __len__(self):
        state = self._state()
        if state.layout == fmt.LAYOUT_MMF:
            return len(state.mmf_keys)
        return state.header["num_keys"]

    def keys(self):
        """All image ids (str): insertion order for MMF caches, byte order otherwise."""
        return [k.decode("utf-8") for k in self.raw_keys()]

    def raw_keys(self):
        """All keys as bytes (reserved entries excluded)."""
        state = self._state()
        if state.layout == fmt.LAYOUT_MMF:
            return list(state.mmf_keys)
        with state.env.begin() as txn:
            return [k for k in txn.cursor().iternext(keys=True, values=False) if k not in fmt.RESERVED_KEYS]

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, image_id):
        try:
            key = fmt.lookup_key(image_id)
        except TypeError:
            return False
        state = self._state()
        if state.layout == fmt.LAYOUT_MMF:
            return key in state.mmf_index
        if key in fmt.RESERVED_KEYS:
            return False
        with state.env.begin(buffers=True) as txn:
            return txn.get(key) is not None

    # ------------------------------------------------------------------ records
    def get(self, image_id, fields=None):
        """The record of ``image_id``; ``fields`` (e.g. ``("features", "boxes")``) limits the arrays."""
        key = image_id.encode("utf-8") if type(image_id) is str else fmt.lookup_key(image_id)
        state = self._shared
        if state is None or state.pid != os.getpid():
            state = self._state()
        if key in fmt.RESERVED_KEYS:
            raise fmt.MissingKeyError(self.path, key, "reserved key of the cache format")
        if state.layout == fmt.LAYOUT_MMF:
            if key not in state.mmf_index:
                raise fmt.MissingKeyError(self.path, key)
            with state.env.begin(buffers=True) as txn:
                raw = txn.get(key)
                if raw is None:
                    raise fmt.CorruptRecordError(self.path, key, "listed in the MMF 'keys' entry but missing from the database")
                item = fmt.restricted_loads(raw, self.path, key)
            record = fmt.mmf_to_record(item, self.path, key)
            if fields is not None:
                record = {k: v for k, v in record.items() if k in fields or k in fmt.META_FIELDS}
            return record
        with state.env.begin(buffers=True) as txn:
            raw = txn.get(key)
            if raw is None:
                raise fmt.MissingKeyError(self.path, key)
            return fmt.decode_record(raw, self.path, key, fields=fields, copy=True)

    __getitem__ = get

    def items(self):
        """(image id, record) for every record."""
        for key in self.raw_keys():
            yield key.decode("utf-8"), self.get(key)
