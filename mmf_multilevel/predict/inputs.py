"""A query's image as the datasets read theirs: a path, encoded bytes or a ``PIL.Image`` -> an RGB ``PIL.Image``
decoded with the dataset's own options (EXIF orientation, alpha background, minimum side), and the SHA-256 that
keys the region cache of in-process extraction."""
import hashlib
import io
import os
from typing import NamedTuple, Optional

from mmf_multilevel.images.sources import ImageDecodeError, decode_image

__all__ = ["PredictInputError", "QueryImage", "read_image", "MAX_TEXT_CHARS", "positive_int"]


class PredictInputError(ValueError):
    """A bad query input; the message names the argument (or the batch line) and what was expected."""


class QueryImage(NamedTuple):
    picture: object  # RGB PIL.Image
    sha256: str  # of the encoded bytes (a PIL input: of its RGB pixels and size)
    where: str  # how errors name it


def read_image(image, where: str = "image", exif_transpose: bool = True, alpha_background=None,
               min_side: int = 1) -> QueryImage:
    """``image`` (a path, ``bytes`` of an encoded image or a ``PIL.Image``) decoded as
    :func:`mmf_multilevel.images.sources.decode_image` decodes a dataset's images."""
    from PIL import Image

    if isinstance(image, QueryImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise PredictInputError(f"{where} {path!r}: no such file (expected an image file, encoded bytes or a "
                                    "PIL image)")
        with open(path, "rb") as handle:
            data = handle.read()
        where = f"{where} {path}"
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the pixels (and the mode) survive; EXIF orientation too
        data = buffer.getvalue()
    else:
        raise PredictInputError(f"{where}: expected an image path, encoded image bytes or a PIL.Image, got "
                                f"{type(image).__name__}")
    try:
        picture = decode_image(data, where, exif_transpose=exif_transpose, alpha_background=alpha_background,
                               min_side=min_side)
    except ImageDecodeError as error:
        raise PredictInputError(str(error)) from None
    return QueryImage(picture, hashlib.sha256(data).hexdigest(), where)


#: the longest query text taken, in characters: the text processors cut a text to ``max_seq_length`` word pieces
#: (16 to 40 in the projects), so a longer text is a mistake (a pasted file), not a question
MAX_TEXT_CHARS = 1000


def checked_text(text, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        shown = text if not isinstance(text, str) or len(text) < 40 else text[:40] + "..."
        raise PredictInputError(f"{where}: expected a non-empty string, got {shown!r}")
    if len(text) > MAX_TEXT_CHARS:
        raise PredictInputError(f"{where}: {len(text):,} characters; at most {MAX_TEXT_CHARS:,} are taken (the model "
                                "reads the first max_seq_length word pieces of a text)")
    return text


def optional_id(image_id: Optional[object]) -> Optional[str]:
    return None if image_id is None else str(image_id)


def positive_int(value, name: str) -> int:
    """``value`` when it is an int of at least 1 (not a bool); otherwise a :class:`PredictInputError` naming
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PredictInputError(f"{name}: expected a positive integer, got {value!r}")
    return value
