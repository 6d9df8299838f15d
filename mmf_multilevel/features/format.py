"""Record and header format of the region feature cache, and MMF's pickled layout.

Two layouts share one LMDB convention (key = image id, UTF-8):

* ``safetensors`` (ours): each value is a safetensors blob holding the arrays
  ``features`` (N x D, float16/float32), ``boxes`` (N x 4, x1 y1 x2 y2 in pixels of the
  original image), optionally ``cls_prob`` (N x C), ``objects`` (N), ``attr_prob`` (N x A),
  ``attrs`` (N or N x K), and the string metadata ``image_id, image_w, image_h, num_boxes``.
* ``mmf``: MMF's own layout (``tools/scripts/features/lmdb_conversion.py``): each value is a
  pickled dict ``feature_path, features, image_height, image_width, num_boxes, objects,
  cls_prob, bbox`` and the special key ``b"keys"`` holds the pickled list of all keys.

Caches written by :class:`~mmf_multilevel.features.writer.FeatureCacheWriter` (either layout)
also hold a JSON header under ``b"__meta__"``. MMF pickles are only ever decoded through
:class:`RestrictedUnpickler`, which admits numpy arrays and plain builtins only.
"""
import json
import math
import numbers
import pickle

import numpy as np

FORMAT_NAME = "mmf_multilevel.region_features"
FORMAT_VERSION = 1
HEADER_KEY = b"__meta__"
MMF_KEYS_KEY = b"keys"
RESERVED_KEYS = frozenset({HEADER_KEY, MMF_KEYS_KEY})
MAX_KEY_BYTES = 511  # LMDB's default maximum key size

LAYOUT_SAFETENSORS = "safetensors"
LAYOUT_MMF = "mmf"
LAYOUTS = (LAYOUT_SAFETENSORS, LAYOUT_MMF)

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}

ARRAY_FIELDS = ("features", "boxes", "cls_prob", "objects", "attr_prob", "attrs")
META_FIELDS = ("image_id", "image_w", "image_h", "num_boxes")
RECORD_FIELDS = ARRAY_FIELDS + META_FIELDS
# Names a record may also use on input (MMF's spelling) -> our field name.
FIELD_ALIASES = {"bbox": "boxes", "image_width": "image_w", "image_height": "image_h"}

# MMF record field -> our field name (``feature_path`` becomes ``image_id``).
MMF_TO_FIELDS = {
    "features": "features",
    "bbox": "boxes",
    "image_height": "image_h",
    "image_width": "image_w",
    "num_boxes": "num_boxes",
    "objects": "objects",
    "cls_prob": "cls_prob",
}
MMF_FIELDS = ("feature_path", "features", "image_height", "image_width", "num_boxes", "objects", "cls_prob", "bbox")
PICKLE_PROTOCOL = 4  # readable by every Python MMF supports

_HEADER_REQUIRED = ("format", "version", "layout", "detector", "weights_sha256", "dtype", "feature_dim", "num_keys")


# --------------------------------------------------------------------------- errors
class FeatureCacheError(Exception):
    """Base class of every error raised by the feature cache."""


class CacheNotFoundError(FeatureCacheError, FileNotFoundError):
    """The cache path does not exist."""

    def __init__(self, path, what="feature cache"):
        self.path = str(path)
        super().__init__(2, f"{what} not found: {self.path}", self.path)

    def __str__(self):
        return self.strerror


class MissingKeyError(FeatureCacheError, KeyError):
    """An image id is not in the cache."""

    def __init__(self, path, key, hint=""):
        self.path = str(path)
        self.key = _key_text(key)
        msg = f"image id {self.key!r} is not in feature cache {self.path}"
        super().__init__(msg + (f" ({hint})" if hint else ""))

    def __str__(self):
        return self.args[0]


class CorruptRecordError(FeatureCacheError, ValueError):
    """A stored value (record, header or MMF ``keys`` entry) cannot be decoded or is inconsistent."""

    def __init__(self, path, key, reason, field=None):
        self.path = str(path)
        self.key = _key_text(key)
        self.field = field
        where = f"field {field!r} of " if field else ""
        super().__init__(f"{path}: {where}key {self.key!r}: {reason}")


class UnsafePickleError(CorruptRecordError, pickle.UnpicklingError):
    """An MMF pickle refers to something other than numpy arrays and plain builtins."""


class CorruptCacheError(FeatureCacheError, ValueError):
    """The cache as a whole is inconsistent (header vs data, unknown layout, ...)."""


class HeaderMismatchError(FeatureCacheError, ValueError):
    """A writer was opened on an existing cache with different settings."""


class RecordValidationError(FeatureCacheError, ValueError):
    """A record given to the writer breaks the format."""

    def __init__(self, image_id, field, reason, path=None):
        self.image_id = image_id
        self.field = field
        self.reason = reason
        self.path = None if path is None else str(path)
        where = f" (cache {self.path})" if self.path else ""
        super().__init__(f"image id {image_id!r}, field {field!r}: {reason}{where}")


def _key_text(key):
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return repr(raw)
    return str(key)


# --------------------------------------------------------------------------- keys
def encode_key(image_id):
    """Image id (str or int) -> (LMDB key bytes, id as str); rejects reserved and oversized ids."""
    if isinstance(image_id, bool) or not isinstance(image_id, (str, numbers.Integral)):
        raise RecordValidationError(
            image_id, "image_id", f"expected a str or int image id, got {type(image_id).__name__}"
        )
    text = str(int(image_id)) if isinstance(image_id, numbers.Integral) else image_id
    if not text:
        raise RecordValidationError(image_id, "image_id", "the image id is empty")
    key = text.encode("utf-8")
    if key in RESERVED_KEYS:
        raise RecordValidationError(
            image_id, "image_id", f"{text!r} is a reserved key of the cache format ({sorted(k.decode() for k in RESERVED_KEYS)})"
        )
    if len(key) > MAX_KEY_BYTES:
        raise RecordValidationError(
            image_id, "image_id", f"the id is {len(key)} bytes in UTF-8; LMDB keys are limited to {MAX_KEY_BYTES}"
        )
    return key, text


def lookup_key(image_id):
    """Key bytes for a read (no reserved-key check: reading ``keys`` is simply a miss)."""
    if isinstance(image_id, (bytes, bytearray)):
        return bytes(image_id)
    if isinstance(image_id, numbers.Integral) and not isinstance(image_id, bool):
        return str(int(image_id)).encode("utf-8")
    if isinstance(image_id, str):
        return image_id.encode("utf-8")
    raise TypeError(f"image id must be str, int or bytes, got {type(image_id).__name__}")


# --------------------------------------------------------------------------- header
def make_header(layout, detector, weights_sha256, dtype, feature_dim=None, num_keys=0, info=None):
    """The JSON header stored under ``__meta__`` (``info``: optional JSON object of producer metadata)."""
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "layout": layout,
        "detector": detector,
        "weights_sha256": weights_sha256,
        "dtype": dtype,
        "feature_dim": feature_dim,
        "num_keys": int(num_keys),
    }
    if info is not None:
        header["info"] = info
    return header


def encode_header(header):
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_header(raw, path):
    """Parse and check the ``__meta__`` header; errors name the cache path."""
    key = HEADER_KEY.decode()
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecordError(path, key, f"the header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptRecordError(path, key, f"the header must be a JSON object, got {type(header).__name__}")
    missing = [name for name in _HEADER_REQUIRED if name not in header]
    if missing:
        raise CorruptRecordError(path, key, f"the header lacks {missing}")
    if header["format"] != FORMAT_NAME:
        raise CorruptRecordError(path, key, f"format is {header['format']!r}, expected {FORMAT_NAME!r}")
    if not isinstance(header["version"], int) or header["version"] > FORMAT_VERSION:
        raise CorruptRecordError(
            path, key, f"format version {header['version']!r} is newer than this reader (version {FORMAT_VERSION}); upgrade mmf_multilevel"
        )
    if header["layout"] not in LAYOUTS:
        raise CorruptRecordError(path, key, f"layout is {header['layout']!r}, expected one of {list(LAYOUTS)}")
    if header["dtype"] not in DTYPES:
        raise CorruptRecordError(path, key, f"dtype is {header['dtype']!r}, expected one of {list(DTYPES)}")
    if not isinstance(header["num_keys"], int) or header["num_keys"] < 0:
        raise CorruptRecordError(path, key, f"num_keys is {header['num_keys']!r}, expected a non-negative int")
    dim = header["feature_dim"]
    if dim is not None and (not isinstance(dim, int) or dim <= 0):
        raise CorruptRecordError(path, key, f"feature_dim is {dim!r}, expected a positive int or null")
    if header.get("info") is not None and not isinstance(header["info"], dict):
        raise CorruptRecordError(path, key, f"info is a {type(header['info']).__name__}, expected a JSON object or absent")
    return header


# --------------------------------------------------------------------------- validation
def _as_array(image_id, field, value):
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise RecordValidationError(image_id, field, f"cannot be turned into an array ({exc})") from None
    if arr.dtype.kind not in "iuf":
        raise RecordValidationError(image_id, field, f"expected a numeric array, got dtype {arr.dtype}")
    return arr


def _first_non_finite(arr):
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    return int(bad.sum()), idx


def _check_finite(image_id, field, arr, original=None, dtype_name=None):
    found = _first_non_finite(arr)
    if found is None:
        return
    count, idx = found
    if original is not None and _first_non_finite(original) is None:
        peak = float(np.abs(original).max())
        raise RecordValidationError(
            image_id, field, f"values exceed the {dtype_name} range (max |x| = {peak:g}, first overflow at index {idx}); store float32 instead"
        )
    raise RecordValidationError(image_id, field, f"{count} non-finite value(s) (nan/inf), first at index {idx}")


def _to_int(image_id, field, value, minimum):
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and getattr(value, "size", 1) == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise RecordValidationError(image_id, field, f"expected an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise RecordValidationError(image_id, field, f"expected an integer >= {minimum}, got {value}")
    return value


def validate_record(image_id, record, dtype, feature_dim=None, check_values=True, cast=True, path=None):
    """Check a record against the format and return ``(arrays, meta)`` ready to encode.

    ``record`` maps field names (ours, or MMF's ``bbox``/``image_width``/``image_height``) to
    arrays/numbers. With ``cast`` the float arrays are converted to the cache ``dtype``
    (``"float32"``/``"float16"``); without it their stored dtype must already match.
    ``check_values`` adds the finiteness and box-ordering checks. Every error is a
    :class:`RecordValidationError` naming the image id and the field.
    """
    if not isinstance(record, dict):
        raise RecordValidationError(image_id, "<record>", f"expected a dict of fields, got {type(record).__name__}", path)
    fields = {}
    for name, value in record.items():
        canonical = FIELD_ALIASES.get(name, name)
        if canonical not in RECORD_FIELDS:
            raise RecordValidationError(
                image_id, name, f"unknown field; allowed fields are {list(RECORD_FIELDS)} (or MMF's {sorted(FIELD_ALIASES)})", path
            )
        if canonical in fields:
            raise RecordValidationError(image_id, name, f"given twice (as {canonical!r} and as an alias)", path)
        if value is not None:
            fields[canonical] = value
    store = DTYPES[dtype]
    try:
        return _validate(image_id, fields, store, dtype, feature_dim, check_values, cast)
    except RecordValidationError as exc:
        if path is not None and exc.path is None:
            raise RecordValidationError(exc.image_id, exc.field, exc.reason, path) from None
        raise


def _validate(image_id, fields, store, dtype_name, feature_dim, check_values, cast):
    for required in ("features", "boxes", "image_w", "image_h"):
        if required not in fields:
            raise RecordValidationError(image_id, required, "missing (required field)")
    if "image_id" in fields and str(fields["image_id"]) != str(image_id):
        raise RecordValidationError(image_id, "image_id", f"the record says {fields['image_id']!r}, but it is written under {image_id!r}")

    def float_array(field, ndim, target):
        arr = _as_array(image_id, field, fields[field])
        if arr.ndim != ndim:
            raise RecordValidationError(image_id, field, f"expected a {ndim}-d array, got shape {arr.shape}")
        if cast:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by field
                out = np.ascontiguousarray(arr, dtype=target)
        else:
            if arr.dtype != target:
                raise RecordValidationError(image_id, field, f"stored as {arr.dtype}, expected {target}")
            out = arr
        if check_values:
            _check_finite(image_id, field, out, arr if out.dtype != arr.dtype else None, target.name)
        return out

    def int_array(field, ndims):
        arr = _as_array(image_id, field, fields[field])
        if arr.ndim not in ndims:
            raise RecordValidationError(image_id, field, f"expected a {' or '.join(map(str, ndims))}-d array, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise RecordValidationError(image_id, field, f"expected integer ids, got dtype {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=np.int64) if cast else arr

    features = float_array("features", 2, store)
    n, dim = features.shape
    if dim == 0:
        raise RecordValidationError(image_id, "features", f"shape {features.shape}: the feature dimension D is 0")
    if feature_dim is not None and dim != feature_dim:
        raise RecordValidationError(image_id, "features", f"shape {features.shape}: D = {dim}, but this cache holds D = {feature_dim}")

    boxes = float_array("boxes", 2, np.dtype(np.float32))
    if boxes.shape != (n, 4):
        raise RecordValidationError(image_id, "boxes", f"expected shape ({n}, 4) (N from features), got {boxes.shape}")
    if check_values and n:
        inverted = np.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0]
        if inverted.size:
            row = int(inverted[0])
            raise RecordValidationError(
                image_id, "boxes", f"{inverted.size} box(es) with x2 < x1 or y2 < y1 (expected x1 y1 x2 y2), first at row {row}: {boxes[row].tolist()}"
            )
    arrays = {"features": features, "boxes": boxes}
    for field in ("cls_prob", "attr_prob"):
        if field in fields:
            arr = float_array(field, 2, store)
            if arr.shape[0] != n:
                raise RecordValidationError(image_id, field, f"expected {n} rows (N from features), got shape {arr.shape}")
            arrays[field] = arr
    if "objects" in fields:
        arr = int_array("objects", (1,))
        if arr.shape[0] != n:
            raise RecordValidationError(image_id, "objects", f"expected shape ({n},) (N from features), got {arr.shape}")
        arrays["objects"] = arr
    if "attrs" in fields:
        arr = int_array("attrs", (1, 2))
        if arr.shape[0] != n:
            raise RecordValidationError(image_id, "attrs", f"expected {n} rows (N from features), got shape {arr.shape}")
        arrays["attrs"] = arr

    meta = {
        "image_id": str(image_id),
        "image_w": _to_int(image_id, "image_w", fields["image_w"], 1),
        "image_h": _to_int(image_id, "image_h", fields["image_h"], 1),
        "num_boxes": n,
    }
    if "num_boxes" in fields:
        given = _to_int(image_id, "num_boxes", fields["num_boxes"], 0)
        if given != n:
            raise RecordValidationError(image_id, "num_boxes", f"is {given}, but features has {n} rows")
    return arrays, meta


# --------------------------------------------------------------------------- safetensors layout
_ST_DTYPES = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def encode_record(arrays, meta):
    """safetensors bytes of one record (metadata values as decimal strings)."""
    from safetensors.numpy import save

    return save(arrays, metadata={name: str(meta[name]) for name in META_FIELDS})


_JSON = json.JSONDecoder()
_META_PREFIX = '{"__metadata__":'
_SPEC_CACHE = {}  # tensor part of a safetensors header -> compiled specs
_SPEC_CACHE_MAX = 4096


def _compile_specs(tensors, path, key):
    """Check the tensor entries of a safetensors header; -> ((name, dtype, count, begin, end, shape), ...)."""
    if not isinstance(tensors, dict):
        raise CorruptRecordError(path, key, "safetensors header is not a JSON object")
    specs = []
    for name, spec in tensors.items():
        try:
            dtype = _ST_DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
            count = math.prod(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecordError(path, key, f"malformed tensor entry {spec!r} ({exc!r})", field=name) from None
        if end - begin != count * dtype.itemsize or begin < 0 or min(shape, default=0) < 0:
            raise CorruptRecordError(
                path, key, f"tensor of shape {list(shape)} {spec['dtype']} does not fit data offsets [{begin}, {end})", field=name
            )
        specs.append((name, dtype, count, begin, end, shape))
    return tuple(specs), max((s[4] for s in specs), default=0)


def _parse_header(raw, path, key):
    """(metadata dict, compiled specs, data length needed) of a safetensors header.

    The tensor part of the header repeats across records of the same shape, so it is
    parsed once and cached; only the small ``__metadata__`` object is parsed per record.
    """
    try:
        text = raw.decode("utf-8")
        if text.startswith(_META_PREFIX):
            meta, end = _JSON.raw_decode(text, len(_META_PREFIX))
            rest = text[end:]
            cached = _SPEC_CACHE.get(rest)
            if cached is not None:
                return meta, cached
            stripped = rest.rstrip(" ")
            if stripped == "}":
                tensors = {}
            elif stripped.startswith(","):
                tensors = json.loads("{" + stripped[1:])
            else:
                raise ValueError(f"unexpected text after the metadata: {rest[:40]!r}")
            compiled = _compile_specs(tensors, path, key)
            if len(_SPEC_CACHE) >= _SPEC_CACHE_MAX:
                _SPEC_CACHE.clear()
            _SPEC_CACHE[rest] = compiled
            return meta, compiled
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecordError(path, key, f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptRecordError(path, key, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    return meta, _compile_specs(header, path, key)


def decode_record(buf, path, key, fields=None, copy=True):
    """Decode safetensors bytes into ``{field: ndarray, image_id, image_w, image_h, num_boxes}``.

    With ``copy`` the arrays share one private, writable copy of the value (safe after the
    LMDB transaction ends); without it they are read-only views of ``buf``. ``fields``
    restricts which arrays are returned (the metadata always is).
    """
    view = memoryview(buf)
    total = view.nbytes
    if total < 8:
        raise CorruptRecordError(path, key, f"value is {total} bytes, too short for a safetensors record")
    header_len = int.from_bytes(view[:8], "little")
    start = 8 + header_len
    if start > total:
        raise CorruptRecordError(path, key, f"safetensors header length {header_len} exceeds the value size {total}")
    meta, (specs, needed) = _parse_header(view[8:start].tobytes(), path, key)
    if start + needed > total:
        raise CorruptRecordError(path, key, f"tensor data ends at byte {needed} but the data buffer has {total - start} bytes")
    if fields is None:
        base = bytearray(view) if copy else view
    else:
        base = view
        unknown = set(fields) - set(ARRAY_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; arrays are {list(ARRAY_FIELDS)}")
    out = {}
    for name, dtype, count, begin, _, shape in specs:
        if fields is not None and name not in fields:
            continue
        arr = np.ndarray(shape, dtype, base, start + begin)
        if fields is not None and copy:
            arr = arr.copy()
        out[name] = arr
    try:
        out["image_id"] = meta["image_id"]
        out["image_w"] = int(meta["image_w"])
        out["image_h"] = int(meta["image_h"])
        out["num_boxes"] = int(meta["num_boxes"])
    except KeyError as exc:
        raise CorruptRecordError(path, key, "missing from the record metadata", field=exc.args[0]) from None
    except (TypeError, ValueError) as exc:
        raise CorruptRecordError(path, key, f"record metadata is not a map of integers ({exc})", field="__metadata__") from None
    return out


# --------------------------------------------------------------------------- MMF layout
def _allowed_globals():
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    import _codecs
    import builtins

    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    frombuffer = getattr(numeric, "_frombuffer", None)
    if frombuffer is not None:  # protocol-5 array pickles
        for module in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(module, "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
    allowed[("_codecs", "encode")] = _codecs.encode
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes", "bytearray", "slice"):
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = getattr(builtins, name)
    return allowed


_ALLOWED = None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/dtype/scalar reconstruction and plain builtins."""

    def __init__(self, file, path, key):
        super().__init__(file)
        self.path = path
        self.key = key

    def find_class(self, module, name):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                self.path,
                self.key,
                f"the pickle refers to {module}.{name}, which is refused; feature records may only contain "
                "numpy arrays and plain builtins (dict, list, tuple, str, bytes, numbers)",
            )
        return obj

    def persistent_load(self, pid):
        raise UnsafePickleError(self.path, self.key, "the pickle uses persistent ids, which are refused")


class _BufferReader:
    """Read-only file over a buffer, so unpickling copies no more than ``pickle.loads`` does."""

    __slots__ = ("_view", "_pos", "_size")

    def __init__(self, buf):
        view = memoryview(buf)
        self._view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        self._pos = 0
        self._size = self._view.nbytes

    def read(self, size=-1):
        start = self._pos
        end = self._size if size is None or size < 0 else min(start + size, self._size)
        self._pos = end
        return self._view[start:end].tobytes()

    def readinto(self, buffer):
        out = memoryview(buffer).cast("B")
        start = self._pos
        end = min(start + out.nbytes, self._size)
        out[: end - start] = self._view[start:end]
        self._pos = end
        return end - start

    def readline(self, size=-1):
        start = end = self._pos
        limit = self._size if size is None or size < 0 else min(start + size, self._size)
        while end < limit:
            chunk = self._view[end : min(end + 256, limit)].tobytes()
            found = chunk.find(b"\n")
            if found >= 0:
                end += found + 1
                break
            end += len(chunk)
        self._pos = end
        return self._view[start:end].tobytes()


def restricted_loads(buf, path, key):
    """Unpickle MMF bytes with :class:`RestrictedUnpickler`; any failure names the path and key."""
    try:
        return RestrictedUnpickler(_BufferReader(buf), path, key).load()
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise CorruptRecordError(path, key, f"cannot unpickle the value ({type(exc).__name__}: {exc})") from None


def encode_mmf_record(arrays, meta):
    """MMF's pickled record (exactly ``lmdb_conversion.py``'s fields)."""
    item = {
        "feature_path": meta["image_id"],
        "features": arrays["features"],
        "image_height": meta["image_h"],
        "image_width": meta["image_w"],
        "num_boxes": meta["num_boxes"],
        "objects": arrays.get("objects"),
        "cls_prob": arrays.get("cls_prob"),
        "bbox": arrays["boxes"],
    }
    return pickle.dumps(item, protocol=PICKLE_PROTOCOL)


def encode_mmf_keys(keys):
    return pickle.dumps(list(keys), protocol=PICKLE_PROTOCOL)


def decode_mmf_keys(buf, path):
    keys = restricted_loads(buf, path, MMF_KEYS_KEY)
    if not isinstance(keys, list) or not all(isinstance(k, bytes) for k in keys):
        raise CorruptRecordError(path, MMF_KEYS_KEY, "expected a pickled list of bytes keys")
    return keys


def _mmf_int(path, key, field, value):
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorruptRecordError(path, key, f"expected an integer, got {value!r}", field=field)
    return value


def mmf_to_record(item, path, key):
    """Map an unpickled MMF dict to our field names (``bbox`` -> ``boxes`` ...)."""
    if not isinstance(item, dict):
        raise CorruptRecordError(path, key, f"expected a pickled dict, got {type(item).__name__}")
    if not isinstance(item.get("features"), np.ndarray):
        raise CorruptRecordError(path, key, "missing or not a numpy array", field="features")
    out = {"image_id": _key_text(key)}
    for name, value in item.items():
        if name == "feature_path" or value is None:
            continue
        target = MMF_TO_FIELDS.get(name, name)
        if target in ("image_h", "image_w", "num_boxes"):
            value = _mmf_int(path, key, name, value)
        elif isinstance(value, (list, tuple)) and target in ARRAY_FIELDS:
            value = np.asarray(value)
        out[target] = value
    out.setdefault("num_boxes", int(item["features"].shape[0]) if item["features"].ndim >= 1 else 0)
    return out
