"""Raw images for the pixel-based methods (SOHO, SIMLA): image sources, an LMDB builder, and
the dataset machinery that puts a transformed image into ``sample.image``.

Image sources
-------------
``open_image_source(path)`` opens any of three storage kinds behind one interface
(``get(image_id) -> PIL.Image`` in RGB, ``get_bytes(image_id)``, ``image_id in source``,
``keys()``, ``len(source)``):

* a **folder**: ``image_id`` is a path relative to the folder, with or without its extension
  (``demo_000001`` finds ``demo_000001.jpg``; the ``extensions`` are tried in order);
* a **zip file**: the same, for members (read without extracting; when every member sits
  under one top-level folder, ids are relative to it);
* an **LMDB of encoded bytes**: key = image id (utf-8), value = the file's JPEG/PNG/... bytes,
  plus a reserved header key; built by :func:`build_image_lmdb` /
  ``python -m mmf_multilevel.datasets.images build-lmdb SRC OUT`` from a folder or a zip
  (batched, one transaction per batch, a rerun resumes where the last one stopped).

Handles (zip files, LMDB environments) are opened lazily, once per process, and dropped when
pickled, so a source is safe to share with DataLoader workers (fork or spawn). Decoding
converts every mode to RGB (CMYK, greyscale, 16-bit, palette; alpha is dropped as the region
extractor does, or composited on ``alpha_background``) and applies the EXIF orientation
(as the region extractor does, so region boxes and pixels agree). Errors name the source and the
image id: :class:`MissingImageError` (a ``KeyError``) for an id the source lacks,
:class:`ImageDecodeError` (a ``ValueError``) for bytes that are not a usable image (corrupt,
truncated, too small, too large).

Datasets on raw images
----------------------
:class:`RawImageMixin` is the reusable part; any MMF ``BaseDataset`` gets raw images from it:

* dataset config keys (all optional except ``images``)::

      images: {train: images/, val: images.zip, test: images.lmdb}   # per split; relative to data_dir
      image_field: image_id          # the record field naming the image
      image_extensions: [.jpg, .jpeg, .png]
      exif_transpose: true
      alpha_background: null         # null: drop alpha; [r, g, b]: composite on that colour
      min_image_side: 1              # smaller images raise ImageDecodeError
      check_images: true             # look every record's image up in the source when the dataset is built
      skip_missing_images: false     # records whose image is missing: error, or dropped and counted
      bad_images: error              # an undecodable (or, unchecked, missing) image at load time:
                                     # error | replace (the next sample; counted, warned)
      augment_splits: [train]        # splits that get the train pipeline (random crop, flip, RandAugment)
      swap_left_right: true          # after a flip, swap left/right in the paired text
      processors: {image_processor: {type: image_transform, params: {...}}}

* ``self.init_images(config, dataset_type, index)`` in ``__init__`` (after ``BaseDataset.__init__``);
* ``self.records = self.check_images(self.records)`` - every record's image must be in the source
  (an error naming the missing ids, or with ``skip_missing_images`` a counted drop, ``num_dropped``);
  a record naming several images overrides ``image_ids_of(record) -> [ids]``;
* the dataset's ``processors`` include ``image_processor`` (``image_transform``), which MMF's
  ``init_processors()`` builds; training splits (``augment_splits``) get its train pipeline;
* ``flipped = self.image_fields(image_id, sample, field="image")`` sets ``sample[field]``
  (float 3 x H x W), ``sample[field + "_size"]`` (content h, w) and ``sample[field + "_flipped"]``;
  a second image goes to ``field="image_1"`` (NLVR2), with its own random augmentation;
* ``text = self.text_for_image(text, flipped)`` swaps left/right when the image was flipped and
  ``swap_left_right`` is on;
* ``self.get_with_replacement(index, build)`` wraps ``__getitem__`` for ``bad_images: replace``;
* :func:`collate_images` batches images of different sizes (padding to the batch maximum); the
  ``mmf_multilevel`` trainer uses it for these datasets (``collate_fn``), so ``pad_to: null`` works
  there; rc10's own trainer and tools collate with MMF's ``BatchCollator``, which needs ``pad_to`` (a
  fixed canvas) when sizes differ.

:class:`ImageTextDataset` = mixin + jsonl annotations (``read_jsonl``) + ``build_sample(record,
sample, flipped)``, the raw-image twin of ``RegionTextDataset`` (samples carry ``id``, the record's
index, and ``image_id``); :class:`ImageCaptionDataset`
is the caption corpus (``coco_captions_images``, ``vg_captions_images``,
``conceptual_captions_images``, ``sbu_captions_images``, ``captions_images``) with the same text
fields as ``CaptionDataset``; ``itm_targets: true`` also sets ``targets = is_correct``, so MMF's own
losses and metrics (``cross_entropy``, ``accuracy``) can train and score image-text matching.
"""
import argparse
import io
import json
import os
import sys
import warnings
import zipfile
import zlib

import numpy as np
import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample, SampleList
from mmf.datasets.base_dataset import BaseDataset

from mmf_multilevel.datasets.captions import CaptionSamples

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


# --------------------------------------------------------------------------- LMDB builder
def _write_bad_list(out, bad):
    path = os.path.join(out, BAD_IMAGES_FILE)
    if not bad:
        if os.path.exists(path):
            os.remove(path)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for image_id in sorted(bad):
            f.write(json.dumps({"image_id": image_id, "error": bad[image_id]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_image_lmdb(source, out, batch_size=256, verify=True, on_error="skip", image_ids=None,
                     progress=True, map_size=1 << 30, extensions=None):
    """Copy the encoded images of a folder or zip (or another LMDB) into an LMDB at ``out``.

    Values are the files' bytes, unchanged. One write transaction per batch (with the header), so
    an interrupted run loses at most the batch in flight; a rerun skips the ids already there.
    ``verify`` decodes each image first; an undecodable one is listed in ``out/bad_images.jsonl``
    and left out (``on_error="skip"``) or stops the run (``"raise"``). The map grows as needed.
    Returns ``{"written", "skipped_existing", "bad", "total"}``.
    """
    import lmdb
    from tqdm import tqdm

    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    src = source if isinstance(source, ImageSource) else open_image_source(source, extensions=extensions)
    out = os.fspath(out)
    if os.path.abspath(out) == os.path.abspath(src.path):
        raise ValueError(f"the output {out} is the source itself")
    if os.path.exists(out) and not is_lmdb(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an image LMDB; choose another output")
    ids = list(src.keys()) if image_ids is None else [str(i) for i in image_ids]
    _close_lmdb(out)  # a reader of the same path in this process would block the writer
    os.makedirs(out, exist_ok=True)
    env = lmdb.open(out, map_size=int(map_size), subdir=True, readahead=False, meminit=False, max_dbs=0)
    bad = {}
    bad_path = os.path.join(out, BAD_IMAGES_FILE)
    if os.path.isfile(bad_path):  # from an earlier run: retried below, listed again if still bad
        with open(bad_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    item = json.loads(line)
                    bad[item["image_id"]] = item["error"]
    try:
        with env.begin() as txn:
            raw = txn.get(HEADER_KEY)
            header = json.loads(raw.decode("utf-8")) if raw else {}
            todo = [i for i in ids if txn.get(i.encode("utf-8")) is None]
        if header and header.get("format") != LMDB_FORMAT:
            raise ImageSourceError(f"{out}: an LMDB of another format ({header.get('format')!r})")
        header.update({"format": LMDB_FORMAT, "version": LMDB_FORMAT_VERSION})
        header.setdefault("source", os.path.abspath(src.path))
        skipped = len(ids) - len(todo)
        written = 0
        bar = tqdm(total=len(ids), initial=skipped, desc="image LMDB", unit="img", disable=not progress)
        for start in range(0, len(todo), int(batch_size)):
            batch = []
            for image_id in todo[start:start + int(batch_size)]:
                try:
                    data = src.get_bytes(image_id)
                    if verify:
                        decode_image(data, src.describe(image_id), src.exif_transpose, src.alpha_background, src.min_side)
                except (ImageDecodeError, MissingImageError, OSError) as exc:
                    if on_error == "raise":
                        raise
                    bad[image_id] = str(exc)
                    continue
                bad.pop(image_id, None)
                batch.append((image_id.encode("utf-8"), data))
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, data in batch:
                            txn.put(key, data)
                        count = txn.stat()["entries"] - (1 if txn.get(HEADER_KEY) is not None else 0)
                        header["count"] = count
                        header["num_bad"] = len(bad)
                        txn.put(HEADER_KEY, json.dumps(header, sort_keys=True).encode("utf-8"))
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
            written += len(batch)
            _write_bad_list(out, bad)
            bar.update(len(todo[start:start + int(batch_size)]))
            bar.set_postfix(bad=len(bad))
        bar.close()
        if not todo:
            with env.begin(write=True) as txn:
                header["count"] = txn.stat()["entries"] - (1 if txn.get(HEADER_KEY) is not None else 0)
                header["num_bad"] = len(bad)
                txn.put(HEADER_KEY, json.dumps(header, sort_keys=True).encode("utf-8"))
            _write_bad_list(out, bad)
        env.sync()
    finally:
        env.close()
    return {"written": written, "skipped_existing": skipped, "bad": len(bad), "total": len(ids)}


def check_source(source, progress=True, extensions=None):
    """Decode every image of a source; -> {image_id: error} for the bad ones."""
    from tqdm import tqdm

    src = source if isinstance(source, ImageSource) else open_image_source(source, extensions=extensions)
    bad = {}
    for image_id in tqdm(src.keys(), desc="check images", unit="img", disable=not progress):
        try:
            src.get(image_id)
        except (ImageDecodeError, MissingImageError, OSError) as exc:
            bad[image_id] = str(exc)
    return bad


# --------------------------------------------------------------------------- datasets
def _split_value(config, key, dataset_type, index, dataset_name):
    value = config.get(key)
    if value is None:
        raise KeyError(f"dataset_config.{dataset_name}.{key} is not set (a path per split: train/val/test)")
    if isinstance(value, str):
        chosen = value
    else:
        chosen = value[dataset_type] if dataset_type in value else value.get("train")
        if chosen is None:
            raise KeyError(f"dataset_config.{dataset_name}.{key} has no '{dataset_type}' (or 'train') entry")
    if not isinstance(chosen, str):
        chosen = list(chosen)[index]
    return chosen


class RawImageMixin:
    """Raw images for an MMF dataset (see the module docstring for the interface)."""

    image_field = "image_id"

    def init_images(self, config, dataset_type, index=0):
        from mmf_multilevel.datasets.base import resolve

        name = getattr(self, "dataset_name", None) or getattr(self, "_dataset_name", "?")
        self.images_path = resolve(_split_value(config, "images", dataset_type, index, name), config.get("data_dir"))
        if not os.path.exists(self.images_path):
            raise FileNotFoundError(f"image source not found: {self.images_path} (dataset_config.{name}.images.{dataset_type})")
        self.image_field = str(config.get("image_field") or self.image_field)
        extensions = config.get("image_extensions")
        background = config.get("alpha_background")
        self.image_source_options = {
            "extensions": tuple(extensions) if extensions else None,
            "exif_transpose": bool(config.get("exif_transpose", True)),
            "alpha_background": None if background is None else tuple(background),
            "min_side": int(config.get("min_image_side") or 1),
        }
        splits = config.get("augment_splits")
        self.augment = dataset_type in (list(splits) if splits is not None else ["train"])
        self.swap_left_right = bool(config.get("swap_left_right", True))
        self.bad_images = str(config.get("bad_images") or "error")
        if self.bad_images not in ("error", "replace"):
            raise ValueError(f"dataset_config.{name}.bad_images must be 'error' or 'replace', got {self.bad_images!r}")
        self.skip_missing_images = bool(config.get("skip_missing_images", False))
        self.check_images_enabled = bool(config.get("check_images", True))
        self.num_bad_images = 0
        self.num_dropped = getattr(self, "num_dropped", 0)
        self._image_source = None
        self._image_source_pid = None

    @property
    def image_source(self):
        if self._image_source is None or self._image_source_pid != os.getpid():
            self._image_source = open_image_source(self.images_path, **self.image_source_options)
            self._image_source_pid = os.getpid()
        return self._image_source

    def image_ids_of(self, record):
        """The image ids a record names (override for records with several images)."""
        return [str(record[self.image_field])]

    def check_images(self, records, where=None):
        """``records`` whose images are all in the source: an error naming the missing ones, or a counted drop."""
        if not self.check_images_enabled:
            return records
        ids = sorted({i for record in records for i in self.image_ids_of(record)})
        missing = set(self.image_source.missing(ids))
        if not missing:
            return records
        name = getattr(self, "dataset_name", "?")
        shown = ", ".join(repr(i) for i in sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        message = f"{len(missing)} of the {len(ids)} images named in {where or 'the annotations'} are not in {self.images_path}: {shown}"
        if not self.skip_missing_images:
            raise MissingImageError(
                f"{message} (set dataset_config.{name}.skip_missing_images=True to drop their records)"
            )
        kept = [r for r in records if not any(i in missing for i in self.image_ids_of(r))]
        self.num_dropped += len(records) - len(kept)
        if not kept:
            raise MissingImageError(f"{message}; no record is left")
        warnings.warn(f"{message}; dropped their {len(records) - len(kept)} of {len(records)} records (skip_missing_images)")
        return kept

    def load_image(self, image_id):
        return self.image_source.get(str(image_id))

    def collate_fn(self, samples):
        """The batch collation the ``mmf_multilevel`` trainer uses for this dataset:
        :func:`collate_images`, so images of different sizes (``pad_to: null``) batch by padding to
        the batch's largest; equal sizes give MMF's ``BatchCollator`` batch."""
        return collate_images(samples, getattr(self, "dataset_name", None), getattr(self, "dataset_type", None))

    def image_fields(self, image_id, sample, field="image"):
        """Decode + transform one image into ``sample[field]``; returns whether it was flipped."""
        image = self.load_image(image_id)
        out = self.image_processor({"image": image, "train": self.augment, "image_id": str(image_id)})
        sample[field] = out["image"]
        sample[f"{field}_size"] = out["image_size"]
        sample[f"{field}_flipped"] = torch.tensor(bool(out.get("flipped", False)))
        return bool(out.get("flipped", False))

    def text_for_image(self, text, flipped):
        if flipped and self.swap_left_right:
            from mmf_multilevel.processors.images import swap_left_right

            return swap_left_right(text)
        return text

    def get_with_replacement(self, index, build):
        """``build(index)``; with ``bad_images: replace`` an undecodable image makes it try the next index."""
        if self.bad_images == "error":
            return build(index)
        length = len(self)
        for attempt in range(min(length, 100)):
            current = (index + attempt) % length
            try:
                return build(current)
            except (ImageDecodeError, MissingImageError) as exc:
                self.num_bad_images += 1
                if self.num_bad_images <= 10 or self.num_bad_images % 1000 == 0:
                    warnings.warn(f"{exc}; replaced by the next sample (bad_images=replace; {self.num_bad_images} so far in this process)")
        raise ImageDecodeError(f"{self.images_path}: {min(length, 100)} consecutive samples from index {index} have bad images")


class ImageTextDataset(RawImageMixin, BaseDataset):
    """jsonl annotations + an image source; subclasses implement ``build_sample(record, sample, flipped)``."""

    required_fields = ("image_id",)

    def __init__(self, dataset_name, config, dataset_type, index=0):
        from mmf_multilevel.datasets.annotations import read_jsonl
        from mmf_multilevel.datasets.base import resolve

        super().__init__(dataset_name, config, dataset_type)
        annotations = config.annotations[dataset_type]
        if isinstance(annotations, str):
            annotations = [annotations]
        self.annotation_path = resolve(annotations[index], config.get("data_dir"))
        self.init_images(config, dataset_type, index)
        fields = tuple(dict.fromkeys(tuple(self.required_fields) + (self.image_field,)))
        self.records = read_jsonl(self.annotation_path, fields, self.validate_record)
        self.records = self.check_images(self.records, self.annotation_path)

    def validate_record(self, record):
        return None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, idx):
        return self.get_with_replacement(idx, self._build)

    def _build(self, idx):
        record = self.records[idx]
        sample = Sample()
        # the record's position, as the region datasets give it (MMF's test reporter gathers ``id`` over ranks)
        sample.id = torch.tensor(idx, dtype=torch.long)
        image_id = str(record[self.image_field])
        sample.image_id = image_id
        flipped = self.image_fields(image_id, sample)
        self.build_sample(record, sample, flipped)
        return sample

    def build_sample(self, record, sample, flipped):
        raise NotImplementedError


class ImageCaptionDataset(CaptionSamples, ImageTextDataset):
    """Image-caption corpus on raw pixels: ``image`` + the MLM/ITM text fields of ``CaptionDataset``."""

    required_fields = ("image_id", "caption")

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type, index)
        self.init_captions(config)

    def build_sample(self, record, sample, flipped):
        return self.add_caption(record, sample, lambda caption: self.text_for_image(caption, flipped))


def collate_images(samples, dataset_name=None, dataset_type=None, fields=None, size_divisor=1):
    """MMF's collation for images of different sizes: pads each image field (bottom/right, zeros
    after normalisation) to the batch's largest height/width (rounded up to ``size_divisor``),
    then builds the ``SampleList`` as MMF's ``BatchCollator`` does; ``<field>_size`` keeps each
    content size. Lets SOHO-style inputs (``pad_to: null``) batch without a fixed canvas, for
    loaders that take a ``collate_fn``.
    """
    if not samples:
        raise ValueError("collate_images: empty batch")
    fields = fields or [k for k, v in samples[0].items() if isinstance(v, torch.Tensor) and v.ndim == 3
                        and f"{k}_size" in samples[0]]
    divisor = max(1, int(size_divisor))
    for field in fields:
        heights = [int(s[field].shape[-2]) for s in samples]
        widths = [int(s[field].shape[-1]) for s in samples]
        height = -(-max(heights) // divisor) * divisor
        width = -(-max(widths) // divisor) * divisor
        for sample, h, w in zip(samples, heights, widths):
            if (h, w) != (height, width):
                sample[field] = torch.nn.functional.pad(sample[field], (0, width - w, 0, height - h), value=0.0)
    batch = SampleList(samples)
    if dataset_name is not None:
        batch.dataset_name = dataset_name
    if dataset_type is not None:
        batch.dataset_type = dataset_type
    return batch


def _register_builders():
    from mmf_multilevel.datasets.captions import CONFIG_DIR, CaptionBuilder

    class ImageCaptionBuilder(CaptionBuilder):
        name = "captions_images"

        @classmethod
        def config_path(cls):
            return os.path.join(CONFIG_DIR, "captions_images", f"{cls.name}.yaml")

        def load(self, config, dataset_type="train", *args, **kwargs):
            if dataset_type not in config.annotations:
                raise KeyError(f"dataset_config.{self.dataset_name}.annotations has no '{dataset_type}' split")
            return ImageCaptionDataset(self.dataset_name, config, dataset_type)

    builders = {}
    for name in ("captions_images", "coco_captions_images", "vg_captions_images", "conceptual_captions_images",
                 "sbu_captions_images"):
        cls = type(f"{''.join(p.title() for p in name.split('_'))}Builder", (ImageCaptionBuilder,), {"name": name})
        registry.register_builder(name)(cls)
        builders[name] = cls
    return builders


# registered once, by the imported module (not again when the CLI runs this file as __main__)
BUILDERS = _register_builders() if __name__ != "__main__" else {}


# --------------------------------------------------------------------------- CLI
def build_parser():
    p = argparse.ArgumentParser(prog="python -m mmf_multilevel.datasets.images",
                                description="Image sources for raw-image datasets: build an LMDB, check, info.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-lmdb", help="copy a folder's or zip's encoded images into an LMDB (resumable)")
    b.add_argument("source", help="a folder of images, a .zip, or an LMDB")
    b.add_argument("out", help="the LMDB folder to write (a rerun resumes)")
    b.add_argument("--batch-size", type=int, default=256, help="images per write transaction (default 256)")
    b.add_argument("--no-verify", action="store_true", help="store bytes without decoding them first")
    b.add_argument("--stop-on-error", action="store_true", help="stop at the first bad image (default: list and skip)")
    b.add_argument("--extensions", nargs="+", default=None, help="image extensions to take (default: common ones)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("check", help="decode every image of a source and list the bad ones")
    c.add_argument("source")
    c.add_argument("--quiet", action="store_true")
    i = sub.add_parser("info", help="kind, image count and header of a source")
    i.add_argument("source")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build-lmdb":
            summary = build_image_lmdb(args.source, args.out, batch_size=args.batch_size, verify=not args.no_verify,
                                       on_error="raise" if args.stop_on_error else "skip", progress=not args.quiet,
                                       extensions=args.extensions)
            print(f"{args.out}: {summary['written']} written, {summary['skipped_existing']} already there, "
                  f"{summary['bad']} bad of {summary['total']}"
                  + (f" (listed in {os.path.join(args.out, BAD_IMAGES_FILE)})" if summary["bad"] else ""))
            return 1 if summary["bad"] else 0
        if args.command == "check":
            bad = check_source(args.source, progress=not args.quiet)
            for image_id, error in sorted(bad.items()):
                print(json.dumps({"image_id": image_id, "error": error}, ensure_ascii=False))
            print(f"{args.source}: {len(bad)} bad image(s)", file=sys.stderr)
            return 1 if bad else 0
        src = open_image_source(args.source)
        info = {"path": src.path, "kind": src.kind, "images": len(src)}
        if isinstance(src, LmdbImageSource):
            info["header"] = src.header
        print(json.dumps(info, indent=2))
        return 0
    except (FileNotFoundError, FileExistsError, ImageSourceError, MissingImageError, ValueError) as exc:
        print(f"images: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
