"""Raw images: sources (folder, zip, LMDB) and the LMDB packer; framework-free.

    python -m mmf_multilevel.images build-lmdb SRC OUT | check SRC | info SRC
"""
from mmf_multilevel.images.pack import build_image_lmdb, check_source  # noqa: F401
from mmf_multilevel.images.sources import (  # noqa: F401
    BAD_IMAGES_FILE,
    IMAGE_EXTENSIONS,
    FolderImageSource,
    ImageDecodeError,
    ImageSource,
    ImageSourceError,
    LmdbImageSource,
    MissingImageError,
    ZipImageSource,
    decode_image,
    is_lmdb,
    open_image_source,
)
