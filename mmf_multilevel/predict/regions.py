"""The ``image -> regions`` stage of the region methods (SemVLP, μ-VLA, MVPTR): a region record (``features``,
``boxes``, ``image_w``, ``image_h`` and the detector's ``cls_prob`` / ``objects``) for a query image, which
:func:`mmf_multilevel.datasets.base.region_record_fields` turns into the sample fields every region dataset
gives its model.

:class:`RegionCache` reads the record from a region feature cache (``mmf_multilevel.features``: what
``mmf_ml_extract`` writes and the datasets read), by the image's id in that cache, or by the SHA-256 of its
encoded bytes for a cache keyed that way. Running the BUTD / VinVL detector in-process on an image the cache
does not hold is :class:`~mmf_multilevel.predict.detect.DetectorRegions`, a stage with the same ``__call__``.
"""
import os
from typing import Optional

from mmf_multilevel.predict.inputs import PredictInputError, QueryImage

__all__ = ["RegionSource", "RegionCache", "MissingRegionsError"]


class MissingRegionsError(PredictInputError, KeyError):
    """The region source has no regions for the query image."""

    def __str__(self):
        return self.args[0]


class RegionSource:
    """``source(image, image_id) -> record``: the regions of one query image."""

    def __call__(self, image: Optional[QueryImage], image_id: Optional[str]) -> dict:
        raise NotImplementedError

    def object_names(self) -> Optional[list]:
        """The class names of the records' ``objects`` (``objects`` id k = name k), or None when unknown."""
        return None


class RegionCache(RegionSource):
    """Regions read from a region feature cache (an LMDB written by ``mmf_ml_extract`` or the demo generator),
    keyed by ``image_id`` or, without one, by the image's SHA-256."""

    def __init__(self, path: str):
        from mmf_multilevel.features import FeatureCacheReader

        if not os.path.exists(path):
            raise FileNotFoundError(f"region cache {path}: no such file or folder (a region feature cache, "
                                    "as mmf_ml_extract writes)")
        self.path = path
        self.reader = FeatureCacheReader(path)
        self.feature_dim = self.reader.feature_dim

    def __call__(self, image: Optional[QueryImage], image_id: Optional[str]) -> dict:
        keys = [k for k in (image_id, image.sha256 if image is not None else None) if k]
        if not keys:
            raise PredictInputError(f"the region cache {self.path} is read by image id: give image_id (the image's "
                                    "key in the cache) or an image whose SHA-256 keys it")
        for key in keys:
            if key in self.reader:
                record = self.reader.get(key)
                if image is not None and key == image_id:
                    check_size(record, image, key, self.path)
                return record
        raise MissingRegionsError(f"the region cache {self.path} has no regions for "
                                  + (f"image_id {image_id!r}" if image_id else f"{image.where} (SHA-256 {image.sha256})")
                                  + "; extract them first (mmf_ml_extract) or give the id the cache keys it by")

    def object_names(self) -> Optional[list]:
        """The cache header's ``info.object_names`` (what the extractor and the demo generator write), or None."""
        return self.reader.object_names

    def close(self):
        self.reader.close()


def check_size(record: dict, image: QueryImage, key: str, path: str) -> None:
    width, height = int(record["image_w"]), int(record["image_h"])
    if (width, height) != tuple(image.picture.size):
        raise PredictInputError(f"{image.where} is {image.picture.size[0]}x{image.picture.size[1]} px but image "
                                f"{key!r} of the region cache {path} is {width}x{height}: not the same image")
