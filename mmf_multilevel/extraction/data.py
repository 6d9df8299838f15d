"""Image lists, decoding and resizing for the extractor (run in DataLoader workers).

Decoding never raises: an image that cannot be used comes back as ``{"error": reason}``
so the run lists it and goes on. Greyscale, palette, CMYK and alpha images are converted
to RGB (alpha composited on white would change colours the detector saw in training, so the
alpha channel is simply dropped, as OpenCV's ``imread`` does). EXIF orientation is applied,
so boxes refer to the image as displayed.
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MIN_IMAGE_SIDE = 2  # px; a 1x1 image has no content a detector can use
MAX_IMAGE_PIXELS = 178_956_970  # Pillow's decompression-bomb error limit (2 x Image.MAX_IMAGE_PIXELS)


class ImageListError(ValueError):
    pass


def image_id_for(path, root):
    """Image id of ``path``: its path relative to ``root`` without the extension (``a/b`` for ``root/a/b.jpg``)."""
    rel = os.path.relpath(path, root)
    stem = os.path.splitext(rel)[0]
    return stem.replace(os.sep, "/")


def list_images(images_dir=None, image_list=None):
    """[(image_id, path)] from a directory (recursive, image extensions) or a list file.

    A list file has one image per line: ``path`` or ``image_id<TAB>path`` (relative paths are
    relative to the list file's folder); blank lines and lines starting with ``#`` are skipped.
    Ids must be unique.
    """
    items = []
    if images_dir is not None:
        if not os.path.isdir(images_dir):
            raise ImageListError(f"--images {images_dir}: not a directory")
        for folder, dirs, files in os.walk(images_dir):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(folder, name)
                    items.append((image_id_for(path, images_dir), path))
    elif image_list is not None:
        if not os.path.isfile(image_list):
            raise ImageListError(f"--image-list {image_list}: file not found")
        base = os.path.dirname(os.path.abspath(image_list))
        with open(image_list, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                parts = line.split("\t")
                if len(parts) == 1:
                    path = parts[0].strip()
                    image_id = os.path.splitext(os.path.basename(path))[0]
                elif len(parts) == 2:
                    image_id, path = parts[0].strip(), parts[1].strip()
                else:
                    raise ImageListError(f"{image_list}:{lineno}: expected 'path' or 'image_id<TAB>path', got {len(parts)} tab-separated fields")
                if not image_id:
                    raise ImageListError(f"{image_list}:{lineno}: empty image id")
                items.append((image_id, path if os.path.isabs(path) else os.path.join(base, path)))
    else:
        raise ImageListError("give --images DIR or --image-list FILE")
    seen = {}
    for image_id, path in items:
        if image_id in seen:
            raise ImageListError(f"image id {image_id!r} is given twice: {seen[image_id]} and {path} (ids must be unique)")
        seen[image_id] = path
    return items


def shard_items(items, index, count):
    """Every ``count``-th item starting at ``index`` (deterministic, balanced)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
    return items[index::count]


def resized_size(width, height, min_size, max_size):
    """Size after scaling the short side to ``min_size`` with the long side capped at ``max_size``."""
    scale = min_size / min(width, height)
    if max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def load_image(path):
    """Decode ``path`` into an RGB uint8 array (H x W x 3); -> (array, None) or (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    return None, f"image is {width}x{height} px ({width * height} pixels), above the {MAX_IMAGE_PIXELS}-pixel limit"
                img.load()
                img = ImageOps.exif_transpose(img)
                if img.mode != "RGB":
                    img = img.convert("RGB")  # L, LA, P, RGBA, CMYK, I;16 ...
                array = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        return None, "file not found"
    except IsADirectoryError:
        return None, "is a directory"
    except Image.UnidentifiedImageError:
        return None, "not an image file Pillow can identify (corrupt or another format)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"image too large: {exc}"
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text:
            return None, f"truncated image file ({text})"
        return None, f"cannot decode the image ({type(exc).__name__}: {text})"
    except Exception as exc:  # any other decoder failure must not stop the run
        return None, f"cannot decode the image ({type(exc).__name__}: {exc})"
    if array.ndim != 3 or array.shape[2] != 3:
        return None, f"decoded to an array of shape {array.shape}, expected H x W x 3"
    h, w = array.shape[:2]
    if min(w, h) < MIN_IMAGE_SIDE:
        return None, f"image is {w}x{h} px; both sides must be at least {MIN_IMAGE_SIDE} px"
    return array, None


def prepare_image(array, min_size, max_size):
    """RGB uint8 H x W x 3 -> resized BGR float32 tensor 3 x h x w (0-255), bilinear like cv2.resize."""
    h, w = array.shape[:2]
    new_w, new_h = resized_size(w, h, min_size, max_size)
    tensor = torch.from_numpy(np.ascontiguousarray(array[:, :, ::-1].transpose(2, 0, 1))).float()
    if (new_w, new_h) != (w, h):
        tensor = F.interpolate(tensor[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    return tensor


class ImageDataset(torch.utils.data.Dataset):
    """(image_id, path) items -> dicts with ``image`` (3 x h x w BGR), ``width``/``height`` or ``error``."""

    def __init__(self, items, min_size, max_size, min_resized_side=16):
        self.items = list(items)
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.min_resized_side = int(min_resized_side)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        image_id, path = self.items[idx]
        out = {"image_id": image_id, "path": path}
        array, error = load_image(path)
        if error is None:
            h, w = array.shape[:2]
            new_w, new_h = resized_size(w, h, self.min_size, self.max_size)
            if min(new_w, new_h) < self.min_resized_side:
                error = (
                    f"image is {w}x{h} px: resized to {new_w}x{new_h} its short side is below {self.min_resized_side} px "
                    "(one cell of the stride-16 feature map); aspect ratio too extreme"
                )
            else:
                try:
                    out["image"] = prepare_image(array, self.min_size, self.max_size)
                    out["width"], out["height"] = w, h
                except Exception as exc:  # e.g. out of memory on a huge image
                    error = f"cannot resize the image ({type(exc).__name__}: {exc})"
        if error is not None:
            out["error"] = error
        return out


def collate_list(batch):
    return batch
