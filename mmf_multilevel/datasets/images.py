"""Datasets on raw images for the pixel-based methods (SOHO, SIMLA): the machinery that puts a
transformed image into ``sample.image``, over the image sources of :mod:`mmf_multilevel.images`.

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
import os
import warnings
from collections.abc import Mapping

import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample, SampleList
from mmf.datasets.base_dataset import BaseDataset

from mmf_multilevel.datasets.captions import CaptionSamples
from mmf_multilevel.images.sources import ImageDecodeError, MissingImageError, open_image_source
from mmf_multilevel.registration import register_variants


def _split_value(config, key, dataset_type, index, dataset_name):
    from mmf_multilevel.datasets.base import setting, split_entry

    value = setting(config, key, dataset_name)
    if value is None:
        raise KeyError(f"dataset_config.{dataset_name}.{key} is not set (a path per split: train/val/test)")
    chosen = value if isinstance(value, str) else split_entry(config, key, dataset_type, dataset_name)
    if not isinstance(chosen, str):
        chosen = list(chosen)[index]
    return chosen


#: the image keys of a raw-image dataset and their defaults: the one home of these values. Every raw-image
#: dataset's yaml under configs/datasets lists them (a test keeps the yamls equal to this, but for the
#: deliberate per-dataset choices it names); a dataset built on the mixin without a yaml gets these.
IMAGE_DEFAULTS = {
    "image_field": "image_id",
    "image_extensions": [".jpg", ".jpeg", ".png", ".webp", ".bmp"],
    "exif_transpose": True,
    "alpha_background": None,
    "min_image_side": 1,
    "augment_splits": ["train"],
    "swap_left_right": True,
    "bad_images": "error",
    "skip_missing_images": False,
    "check_images": True,
}


def processed_image_fields(image_processor, image, sample, field="image", train=False, image_id=None):
    """One decoded image through ``image_processor`` into ``sample[field]``, ``<field>_size`` and
    ``<field>_flipped`` (every raw-image dataset's sample, and :mod:`mmf_multilevel.predict`'s query
    image); returns whether it was flipped."""
    out = image_processor({"image": image, "train": bool(train), "image_id": str(image_id)})
    sample[field] = out["image"]
    sample[f"{field}_size"] = out["image_size"]
    sample[f"{field}_flipped"] = torch.tensor(bool(out.get("flipped", False)))
    return bool(out.get("flipped", False))


class RawImageMixin:
    """Raw images for an MMF dataset (see the module docstring for the interface)."""

    image_field = "image_id"

    def init_images(self, config, dataset_type, index=0):
        from mmf_multilevel.datasets.base import data_path, setting, setting_or_default

        name = getattr(self, "dataset_name", None) or getattr(self, "_dataset_name", "?")

        def get(key):
            return setting_or_default(config, key, IMAGE_DEFAULTS)

        self.images_path = data_path(_split_value(config, "images", dataset_type, index, name), setting(config, "data_dir", name))
        if not os.path.exists(self.images_path):
            raise FileNotFoundError(f"image source not found: {self.images_path} (dataset_config.{name}.images.{dataset_type})")
        self.image_field = str(get("image_field"))
        extensions, background = get("image_extensions"), get("alpha_background")
        self.image_source_options = {
            "extensions": tuple(extensions) if extensions else None,
            "exif_transpose": bool(get("exif_transpose")),
            "alpha_background": None if background is None else tuple(background),
            "min_side": int(get("min_image_side")),
        }
        splits = get("augment_splits")
        self.augment = dataset_type in (list(splits) if splits is not None else [])
        self.swap_left_right = bool(get("swap_left_right"))
        self.bad_images = str(get("bad_images"))
        if self.bad_images not in ("error", "replace"):
            raise ValueError(f"dataset_config.{name}.bad_images must be 'error' or 'replace', got {self.bad_images!r}")
        self.skip_missing_images = bool(get("skip_missing_images"))
        self.check_images_enabled = bool(get("check_images"))
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
        return processed_image_fields(self.image_processor, self.load_image(image_id), sample, field, self.augment,
                                      image_id)

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
        from mmf_multilevel.datasets.base import data_path, setting

        super().__init__(dataset_name, config, dataset_type)
        annotations = config.annotations[dataset_type]
        if isinstance(annotations, str):
            annotations = [annotations]
        self.annotation_path = data_path(annotations[index], setting(config, "data_dir", dataset_name))
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


def _pad_image_fields(samples, fields, divisor):
    """Pads ``fields`` (default: each 3-D tensor with a ``<field>_size`` beside it, and so on in nested
    samples such as NLVR2's ``img0`` / ``img1``) of ``samples`` in place to the largest height/width."""
    first = samples[0]
    if fields is None:
        fields = [k for k, v in first.items() if isinstance(v, torch.Tensor) and v.ndim == 3 and f"{k}_size" in first]
        for key, value in first.items():
            if isinstance(value, Mapping):
                _pad_image_fields([s[key] for s in samples], None, divisor)
    for field in fields:
        heights = [int(s[field].shape[-2]) for s in samples]
        widths = [int(s[field].shape[-1]) for s in samples]
        height = -(-max(heights) // divisor) * divisor
        width = -(-max(widths) // divisor) * divisor
        for sample, h, w in zip(samples, heights, widths):
            if (h, w) != (height, width):
                sample[field] = torch.nn.functional.pad(sample[field], (0, width - w, 0, height - h), value=0.0)


def collate_images(samples, dataset_name=None, dataset_type=None, fields=None, size_divisor=1):
    """MMF's collation for images of different sizes: pads each image field (also in nested samples:
    NLVR2's ``img0`` / ``img1``; bottom/right, zeros
    after normalisation) to the batch's largest height/width (rounded up to ``size_divisor``),
    then builds the ``SampleList`` as MMF's ``BatchCollator`` does; ``<field>_size`` keeps each
    content size. Lets SOHO-style inputs (``pad_to: null``) batch without a fixed canvas, for
    loaders that take a ``collate_fn``.
    """
    if not samples:
        raise ValueError("collate_images: empty batch")
    divisor = max(1, int(size_divisor))
    _pad_image_fields(samples, fields, divisor)
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

    names = ("captions_images", "coco_captions_images", "vg_captions_images", "conceptual_captions_images",
             "sbu_captions_images")
    return register_variants(registry.register_builder, ImageCaptionBuilder, {name: {"name": name} for name in names},
                             suffix="Builder")


# registered once, by the imported module (not again when the CLI runs this file as __main__)
_register_builders()
