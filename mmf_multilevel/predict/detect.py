"""The ``image -> regions`` stage run in-process: this project's BUTD / VinVL extractor on the query image, its
record cached by the image's SHA-256.

:class:`DetectorRegions` builds the detector as ``extract.py`` does (:func:`~mmf_multilevel.extraction.detectors.
load_detector`: ``butd_r101`` or ``vinvl_x152c4``, weights from a path or URL, or random calibrated weights for tests
and demos), prepares the image as the extraction loader does (RGB, shorter side to ``INPUT.MIN_SIZE_TEST`` with the
longer side capped at ``INPUT.MAX_SIZE_TEST``, BGR 0-255) and keeps the regions with the same selection settings.
So the record equals the one ``extract.py`` writes for the same file with the same detector, and a region model
reads it through the same :func:`~mmf_multilevel.datasets.base.region_record_fields` as its dataset.

With ``cache`` (a folder) every record is also written to a region feature cache keyed by the image's SHA-256 (the
format ``mmf_ml_extract`` writes, header included, so the cache also serves ``RegionCache`` and the datasets); an
image already there is not run through the detector again. The last few records are kept in memory too.
"""
import collections
import os
from typing import Optional, Sequence

import numpy as np

from mmf_multilevel.predict.inputs import PredictInputError, QueryImage
from mmf_multilevel.predict.regions import RegionSource

__all__ = ["DetectorRegions"]


class DetectorRegions(RegionSource):
    """``source(image, image_id) -> record``: the detector run on ``image`` (a :class:`~.inputs.QueryImage`).

    ``model``: ``butd_r101`` or ``vinvl_x152c4``; ``weights``: a checkpoint path or URL (the releases' layouts,
    converted on load) or ``random_init``: a seed; ``opts``: detectron2 config overrides (``KEY VALUE ...``);
    ``min_boxes`` / ``max_boxes`` / ``conf_thresh`` / ``nms_thresh``: the region selection (default: the config's
    ``EXTRACT`` section, as ``extract.py``); ``object_vocab`` / ``attribute_vocab``: class-name files stored in the
    cache header (the tags of MVPTR and μ-VLA); ``cache``: a region cache folder keyed by SHA-256."""

    def __init__(self, model: str = "butd_r101", weights: Optional[str] = None, random_init: Optional[int] = None,
                 opts: Sequence[str] = (), cache: Optional[str] = None, device: str = "cpu",
                 min_boxes: Optional[int] = None, max_boxes: Optional[int] = None,
                 conf_thresh: Optional[float] = None, nms_thresh: Optional[float] = None, precision: str = "fp32",
                 object_vocab: Optional[str] = None, attribute_vocab: Optional[str] = None, memory: int = 16):
        from mmf_multilevel.compat.detectron2 import INSTALL_HINT, detectron2_available

        if not detectron2_available():
            raise PredictInputError(f"in-process region extraction needs detectron2: {INSTALL_HINT}")
        from mmf_multilevel.extraction import detectors, runner
        from mmf_multilevel.extraction.extractor import RegionFeatureExtractor

        try:
            cfg, detector, layout, self.weights_sha256 = detectors.load_detector(model, weights, random_init,
                                                                                 list(opts), device)
        except (detectors.DetectorSetupError, FileNotFoundError) as error:
            raise PredictInputError(f"detector {model}: {error}") from None
        settings = cfg.EXTRACT
        try:
            self.extractor = RegionFeatureExtractor(
                detector,
                min_boxes=settings.MIN_BOXES if min_boxes is None else min_boxes,
                max_boxes=settings.MAX_BOXES if max_boxes is None else max_boxes,
                conf_thresh=settings.CONF_THRESH if conf_thresh is None else conf_thresh,
                nms_thresh=settings.NMS_THRESH if nms_thresh is None else nms_thresh,
                precision=precision)
            self.info = runner.build_info(model, cfg, self.extractor, runner.read_vocab(object_vocab, "object"),
                                          runner.read_vocab(attribute_vocab, "attribute"), weights_layout=layout)
        except (ValueError, FileNotFoundError) as error:
            raise PredictInputError(f"detector {model}: {error}") from None
        self.model_name = model
        self.min_size, self.max_size = int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
        self.feature_dim = int(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS) * 8
        self.cache = os.fspath(cache) if cache is not None else None
        self.path = self.cache or f"the {model} detector"
        self.detector_runs = 0
        self._memory = collections.OrderedDict()
        self._memory_size = max(0, int(memory))

    def __call__(self, image: Optional[QueryImage], image_id: Optional[str]) -> dict:
        if image is None:
            raise PredictInputError(f"{self.model_name} runs on the image itself: give an image (a path, encoded "
                                    "bytes or a PIL.Image), not only an image_id")
        key = image.sha256
        record = self._memory.get(key)
        if record is None:
            record = self._cached(key)
        if record is None:
            record = self.extract(image)
            self._store(key, record)
        self._remember(key, record)
        return dict(record, image_id=image_id or key)

    def object_names(self) -> Optional[list]:
        """The class names of ``object_vocab`` (stored in the cache header as ``info.object_names``), or None."""
        names = self.info.get("object_names")
        return list(names) if names else None

    def extract(self, image: QueryImage) -> dict:
        """The detector's record of ``image`` (no cache), as ``extract.py`` writes it."""
        from mmf_multilevel.extraction.data import prepare_image
        from mmf_multilevel.extraction.runner import region_record

        picture = image.picture if image.picture.mode == "RGB" else image.picture.convert("RGB")
        width, height = picture.size
        tensor = prepare_image(np.asarray(picture, dtype=np.uint8), self.min_size, self.max_size)
        output = self.extractor([tensor], [(width, height)])[0]
        self.detector_runs += 1
        record = region_record(output, width, height)
        record["num_boxes"] = int(record["features"].shape[0])
        return record

    # ------------------------------------------------------------------ caches
    def _remember(self, key, record):
        if self._memory_size:
            self._memory[key] = record
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_size:
                self._memory.popitem(last=False)

    def _cached(self, key):
        if self.cache is None or not os.path.exists(os.path.join(self.cache, "data.mdb")):
            return None
        from mmf_multilevel.features import FeatureCacheReader

        reader = FeatureCacheReader(self.cache)
        try:
            return reader.get(key) if key in reader else None
        finally:
            reader.close()

    def _store(self, key, record):
        if self.cache is None:
            return
        from mmf_multilevel.features import FeatureCacheError, FeatureCacheWriter

        fields = {name: value for name, value in record.items() if name != "num_boxes"}
        try:
            with FeatureCacheWriter(self.cache, detector=self.model_name, weights_sha256=self.weights_sha256,
                                    batch_size=1, feature_dim=self.feature_dim, info=self.info) as writer:
                writer.write(key, fields)
        except FeatureCacheError as error:
            raise PredictInputError(f"region cache {self.cache}: {error} (a cache written by another detector or "
                                    "settings: give another cache folder)") from None
