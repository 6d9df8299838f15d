"""Image sources for the pixel-based methods (SOHO, SIMLA): a folder, a zip or an LMDB of encoded
images behind one interface (framework-free).

``open_image_source(path)`` opens any of three storage kinds behind one interface
(``get(image_id) -> PIL.Image`` in RGB, ``get_bytes(image_id)``, ``image_id in source``,
``keys()``, ``len(source)``):

* a **folder**: ``image_id`` is a path relative to the folder, with or without its extension
  (``demo_000001`` finds ``demo_000001.jpg``; the ``extensions`` are tried in order);
* a **zip file**: the same, for members (read without extracting; when every member sits
  under one top-level folder, ids are relative to it);
* an **LMDB of encoded bytes**: key = image id (utf-8), value = the file's JPEG/PNG/... bytes,
  plus a reserved header key; built by :func:`~mmf_multilevel.images.pack.build_image_lmdb` /
  ``python -m mmf_multilevel.images build-lmdb SRC OUT`` from a folder or a zip
  (batched, one transaction per batch, a rerun resumes where the last one stopped).

Handles (zip files, LMDB environments) are opened lazily, once per process, and dropped when
pickled, so a source is safe to share with DataLoader workers (fork or spawn). Decoding
converts every mode to RGB (CMYK, greyscale, 16-bit, palette; alpha is dropped as the region
extractor does, or composited on ``alpha_background``) and applies the EXIF orientation
(as the region extractor does, so region boxes and pixels agree). Errors name the source and the
image id: :class:`MissingImageError` (a ``KeyError``) for an id the source lacks,
:class:`ImageDecodeError` (a ``ValueError``) for bytes that are not a usable image (corrupt,
truncated, too small, too large).
"""
import io
import json
import os
import warnings
import zipfile
import zlib

import numpy as np

__all__ = ["ImageSourceError", "ImageDecodeError", "MissingImageError", "decode_image", "ImageSource", "FolderImageSource",
           "ZipImageSource", "LmdbImageSource", "is_lmdb", "open_image_source", "IMAGE_EXTENSIONS", "BAD_IMAGES_FILE"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
HEADER_KEY = b"__mmf_multilevel_images__"
LMDB_FORMAT = "mmf_multilevel.images"
LMDB_FORMAT_VERSION = 1
BAD_IMAGES_FILE = "bad_images.jsonl"


class ImageSourceError(ValueError):
    """A problem with an image source or one of its images (the message names source and id)."""


class ImageDecodeError(ImageSourceError):
    """The stored bytes of an image are not a usable image."""


class MissingImageError(KeyError):
    """An image id that the source does not hold."""

    def __str__(self):
        return self.args[0]


# --------------------------------------------------------------------------- decoding
def _to_rgb(image, alpha_background=None):
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(float(array.max(initial=0)), 1.0) if array.max(initial=0) > 1.0 else 1.0
        grey = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
        from PIL import Image

        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha and alpha_background is not None:
        from PIL import Image

        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, tuple(int(v) for v in alpha_background) + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "P" and has_alpha:
        image = image.convert("RGBA")  # palette transparency -> alpha, then dropped
    return image.convert("RGB")


def decode_image(data, where, exif_transpose=True, alpha_background=None, min_side=1):
    """Encoded image bytes -> RGB ``PIL.Image`` (fully decoded); ``where`` names it in errors."""
    from PIL import Image, ImageOps

    if not data:
        raise ImageDecodeError(f"{where}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            image = _to_rgb(image, alpha_background)
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"{where}: not an image file Pillow can identify (corrupt or another format; {len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{where}: image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text or isinstance(exc, EOFError):
            raise ImageDecodeError(f"{where}: truncated image file ({text})") from None
        raise ImageDecodeError(f"{where}: cannot decode the image ({type(exc).__name__}: {text})") from None
    width, height = image.size
    if min(width, height) < int(min_side):
        raise ImageDecodeError(f"{where}: image is {width}x{height} px; both sides must be at least {min_side} px")
    return image


# --------------------------------------------------------------------------- sources
class ImageSource:
    """Base class: ``get_bytes`` / ``__contains__`` / ``keys`` are the storage-specific part."""

    kind = "?"

    def __init__(self, path, exif_transpose=True, alpha_background=None, min_side=1):
        self.path = os.fspath(path)
        self.exif_transpose = bool(exif_transpose)
        self.alpha_background = None if alpha_background is None else tuple(int(v) for v in alpha_background)
        self.min_side = int(min_side)
        self._handle = None
        self._pid = None

    # per-process handle -------------------------------------------------------
    def _open(self):
        return None

    @property
    def handle(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle = self._open()
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_pid"] = None
        return state

    def close(self):
        if self._handle is not None and self._pid == os.getpid() and hasattr(self._handle, "close"):
            self._handle.close()
        self._handle = None

    # interface ------------------------------------------------------------------
    def _missing(self, image_id):
        return MissingImageError(f"{self.path}: no image {image_id!r} in this {self.kind} image source")

    def get_bytes(self, image_id):
        raise NotImplementedError

    def get(self, image_id):
        """The image as an RGB ``PIL.Image`` (MissingImageError / ImageDecodeError otherwise)."""
        data = self.get_bytes(image_id)
        return decode_image(data, self.describe(image_id), self.exif_transpose, self.alpha_background, self.min_side)

    def describe(self, image_id):
        return f"{self.path}: image {image_id!r}"

    def keys(self):
        raise NotImplementedError

    def __contains__(self, image_id):
        raise NotImplementedError

    def __len__(self):
        return len(self.keys())

    def missing(self, image_ids):
        """The ids of ``image_ids`` that the source does not hold."""
        return [image_id for image_id in image_ids if image_id not in self]

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r})"


def _strip_extension(name, extensions):
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in extensions else None


class FolderImageSource(ImageSource):
    """Images as files under a folder; ids are relative paths, extensions optional."""

    kind = "folder"

    def __init__(self, path, extensions=IMAGE_EXTENSIONS, **kwargs):
        super().__init__(path, **kwargs)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"image folder not found: {self.path}")
        self.extensions = tuple(e if e.startswith(".") else "." + e for e in (extensions or IMAGE_EXTENSIONS))
        self._lower = tuple(e.lower() for e in self.extensions)
        self._index = None

    def _build_index(self):
        index = {}
        for folder, dirs, files in os.walk(self.path):
            dirs.sort()
            rel_folder = os.path.relpath(folder, self.path)
            for name in sorted(files):
                rel = name if rel_folder == "." else os.path.join(rel_folder, name).replace(os.sep, "/")
                stem = _strip_extension(rel, self._lower)
                if stem is None:
                    continue
                index[rel] = rel
                # the first extension in the configured order wins for an id without extension
                current = index.get(stem)
                if current is None or self._rank(rel) < self._rank(current):
                    index[stem] = rel
        self._index = index
        return index

    def _rank(self, rel):
        return self._lower.index(os.path.splitext(rel)[1].lower())

    def resolve(self, image_id):
        """The file of ``image_id`` or None."""
        image_id = str(image_id)
        if self._index is not None:
            rel = self._index.get(image_id)
            return None if rel is None else os.path.join(self.path, rel)
        if os.path.isabs(image_id) or ".." in image_id.replace("\\", "/").split("/"):
            return None
        direct = os.path.join(self.path, image_id)
        if os.path.splitext(image_id)[1].lower() in self._lower and os.path.isfile(direct):
            return direct
        for ext in self.extensions:
            for variant in dict.fromkeys((ext, ext.lower(), ext.upper())):  # a.jpg, a.JPG
                candidate = direct + variant
                if os.path.isfile(candidate):
                    return candidate
        return None

    def get_bytes(self, image_id):
        path = self.resolve(image_id)
        if path is None:
            raise self._missing(image_id)
        with open(path, "rb") as f:
            return f.read()

    def describe(self, image_id):
        path = self.resolve(image_id)
        return f"{path or self.path}: image {image_id!r}"

    def _missing(self, image_id):
        return MissingImageError(
            f"{self.path}: no image {image_id!r} (looked for {image_id!r} and {image_id!r} + one of {list(self.extensions)})"
        )

    def keys(self):
        index = self._index if self._index is not None else self._build_index()
        return sorted({_strip_extension(rel, self._lower) for rel in index.values()})

    def get(self, image_id):
        path = self.resolve(image_id)
        if path is None:
            raise self._missing(image_id)
        with open(path, "rb") as f:
            data = f.read()
        return decode_image(data, f"{path}: image {image_id!r}", self.exif_transpose, self.alpha_background, self.min_side)

    def __contains__(self, image_id):
        return self.resolve(image_id) is not None

    def __len__(self):
        index = self._index if self._index is not None else self._build_index()
        return len(set(index.values()))

    def missing(self, image_ids):
        image_ids = list(image_ids)
        if len(image_ids) <= 256 or self._index is not None:
            return super().missing(image_ids)
        # one walk is cheaper than several stat calls per id; the index is not kept (its memory
        # would be copied into every DataLoader worker), later lookups stat the few candidates
        self._build_index()
        try:
            return super().missing(image_ids)
        finally:
            self._index = None


class ZipImageSource(ImageSource):
    """Images as members of a zip file, read without extracting (one handle per process)."""

    kind = "zip"

    def __init__(self, path, extensions=IMAGE_EXTENSIONS, prefix=None, **kwargs):
        super().__init__(path, **kwargs)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"image zip not found: {self.path}")
        self.extensions = tuple(e if e.startswith(".") else "." + e for e in (extensions or IMAGE_EXTENSIONS))
        self._lower = tuple(e.lower() for e in self.extensions)
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = [info.filename for info in archive.infolist() if not info.is_dir()]
        except zipfile.BadZipFile as exc:
            raise ImageSourceError(f"{self.path}: not a readable zip file ({exc})") from None
        images = [n for n in names if _strip_extension(n, self._lower) is not None]
        if prefix is None:
            tops = {n.split("/", 1)[0] for n in images}
            prefix = (next(iter(tops)) + "/") if len(tops) == 1 and all("/" in n for n in images) else ""
        self.prefix = prefix
        self._members = {}
        ids = set()
        ranks = {}
        for name in sorted(images):
            rank = self._lower.index(os.path.splitext(name)[1].lower())
            relative = name[len(prefix):] if name.startswith(prefix) else None
            if relative is not None:
                ids.add(_strip_extension(relative, self._lower))
            # ids relative to the prefix, and the full member names as aliases (with or without extension)
            for rel in {relative, name} - {None}:
                stem = _strip_extension(rel, self._lower)
                self._members[rel] = name
                if stem not in ranks or rank < ranks[stem]:
                    ranks[stem] = rank
                    self._members[stem] = name
        self._ids = sorted(ids)

    def _open(self):
        return zipfile.ZipFile(self.path)

    def member(self, image_id):
        return self._members.get(str(image_id))

    def get_bytes(self, image_id):
        name = self.member(image_id)
        if name is None:
            raise self._missing(image_id)
        try:
            return self.handle.read(name)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise ImageDecodeError(f"{self.path}: member {name!r} (image {image_id!r}) cannot be read from the zip ({exc})") from None

    def describe(self, image_id):
        name = self.member(image_id)
        return f"{self.path}:{name}: image {image_id!r}" if name else super().describe(image_id)

    def keys(self):
        return list(self._ids)

    def __len__(self):
        return len(self._ids)

    def __contains__(self, image_id):
        return str(image_id) in self._members


_LMDB_ENVS = {}


def _close_lmdb(path):
    real = os.path.realpath(os.fspath(path))
    entry = _LMDB_ENVS.get(real)
    if entry is not None and entry[0] == os.getpid():
        del _LMDB_ENVS[real]
        entry[1].close()


class LmdbImageSource(ImageSource):
    """Encoded images in an LMDB (key = image id, value = the file's bytes; built by build_image_lmdb)."""

    kind = "LMDB"

    def __init__(self, path, **kwargs):
        kwargs.pop("extensions", None)
        super().__init__(path, **kwargs)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"image LMDB not found: {self.path}")
        self.header = self._read_header()

    def _open(self):
        import lmdb

        # LMDB allows one environment per file and process: sources of the same path share it; one
        # inherited through fork is closed here (the parent's stays open) so this process can open its own
        real = os.path.realpath(self.path)
        entry = _LMDB_ENVS.get(real)
        if entry is not None and entry[0] != os.getpid():
            try:
                entry[1].close()
            except lmdb.Error:
                pass
            del _LMDB_ENVS[real]
            entry = None
        if entry is None:
            try:
                env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False,
                                subdir=os.path.isdir(self.path), max_readers=512)
            except lmdb.Error as exc:
                hint = "; an LMDB writer on this path is still open in this process" if "already open" in str(exc) else ""
                raise ImageSourceError(f"{self.path}: cannot open as an LMDB ({exc}){hint}") from None
            entry = _LMDB_ENVS[real] = (os.getpid(), env)
        return entry[1]

    def close(self):
        """Close the (shared) environment of this path in this process."""
        _close_lmdb(self.path)
        self._handle = None

    def _read_header(self):
        with self.handle.begin() as txn:
            raw = txn.get(HEADER_KEY)
        if raw is None:
            return {}
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ImageSourceError(f"{self.path}: the header entry {HEADER_KEY.decode()!r} is not JSON") from None

    def get_bytes(self, image_id):
        key = str(image_id).encode("utf-8")
        if key == HEADER_KEY:
            raise self._missing(image_id)
        with self.handle.begin(buffers=False) as txn:
            data = txn.get(key)
            if data is None and _strip_extension(str(image_id), IMAGE_EXTENSIONS) is not None:
                data = txn.get(_strip_extension(str(image_id), IMAGE_EXTENSIONS).encode("utf-8"))
        if data is None:
            raise self._missing(image_id)
        return data

    def keys(self):
        with self.handle.begin() as txn:
            return [k.decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False) if k != HEADER_KEY]

    def __len__(self):
        with self.handle.begin() as txn:
            entries = txn.stat()["entries"]
            return entries - (1 if txn.get(HEADER_KEY) is not None else 0)

    def __contains__(self, image_id):
        key = str(image_id).encode("utf-8")
        if key == HEADER_KEY:
            return False
        with self.handle.begin() as txn:
            return self._has(txn, str(image_id))

    @staticmethod
    def _has(txn, image_id):
        key = image_id.encode("utf-8")
        if key == HEADER_KEY:
            return False
        if txn.get(key) is not None:
            return True
        stem = _strip_extension(image_id, IMAGE_EXTENSIONS)
        return stem is not None and txn.get(stem.encode("utf-8")) is not None

    def missing(self, image_ids):
        with self.handle.begin() as txn:
            return [i for i in image_ids if not self._has(txn, str(i))]


def is_lmdb(path):
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "data.mdb"))
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(32)
        # LMDB meta page: magic 0xBEEFC0DE at offset 16 (64-bit builds)
        return len(head) >= 20 and head[16:20] == b"\xde\xc0\xef\xbe"
    return False


def open_image_source(path, extensions=None, **kwargs):
    """A folder, zip or LMDB image source for ``path`` (see the module docstring).

    ``kwargs``: ``exif_transpose``, ``alpha_background``, ``min_side`` (decoding), ``prefix`` (zip).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image source not found: {path} (a folder of images, a .zip, or an LMDB)")
    if is_lmdb(path):
        kwargs.pop("prefix", None)
        return LmdbImageSource(path, **kwargs)
    if os.path.isdir(path):
        kwargs.pop("prefix", None)
        return FolderImageSource(path, extensions=extensions or IMAGE_EXTENSIONS, **kwargs)
    if zipfile.is_zipfile(path):
        return ZipImageSource(path, extensions=extensions or IMAGE_EXTENSIONS, **kwargs)
    raise ImageSourceError(f"{path}: not an image folder, a zip file or an LMDB")
