"""Shared machinery of the region-feature datasets: annotations + region LMDB + processors.

``RegionTextDataset`` is an MMF ``BaseDataset`` that reads a jsonl annotation file,
looks up each record's image in a region feature cache (``mmf_multilevel.features``)
and fills the fields MMF's region models read:

* ``image_feature_0`` - ``max_features x D`` float32, zero-padded;
* ``image_info_0`` - ``max_features`` (number of real regions, which VisualBERT-style
  models turn into a mask), ``bbox`` (padded ``max_features x 4``, pixels),
  ``image_width``, ``image_height``, ``num_boxes`` and, where the detector gave
  them, ``cls_prob`` (padded) and ``objects``;
* ``id`` - the record's index in the annotation file (prediction files map it back to the
  record's own ids; MMF's test reporter gathers it across ranks).

The cache is opened lazily, once per process (safe in DataLoader workers).
"""
import os
import warnings

import numpy as np
import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample
from mmf.datasets.base_dataset import BaseDataset
from mmf.datasets.base_dataset_builder import BaseDatasetBuilder

from mmf_multilevel.datasets.annotations import read_jsonl
from mmf_multilevel.paths import DATASET_CONFIG_DIR

CONFIG_DIR = DATASET_CONFIG_DIR


class FeatureDimensionError(ValueError):
    """The cache's feature size D differs from what the model reads (``feature_dim``)."""


class MissingFeaturesError(KeyError):
    """Annotation records name images that the region feature cache does not hold."""

    def __str__(self):
        return self.args[0]


def data_path(path, data_dir):
    """``path`` under ``data_dir`` unless it is absolute (``~`` expanded); None stays None."""
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    if os.path.isabs(path) or data_dir is None:
        return path
    return os.path.join(str(data_dir), path)


#: the region keys of a region-feature dataset with a default: their one home. Every region dataset's yaml
#: under configs/datasets lists them with these values (a test keeps them equal); a dataset built on
#: RegionTextDataset without a yaml gets these. ``data_dir``, ``annotations``, ``features`` and
#: ``feature_dim`` have no default.
REGION_DEFAULTS = {"max_features": 100, "skip_missing_features": False}


def setting(config, key, dataset_name):
    """``config[key]`` (None is a value), or an error naming ``dataset_config.<dataset_name>.<key>``: the
    dataset's defaults yaml under ``configs/datasets`` is the one home of every default."""
    if key not in config:
        raise KeyError(f"dataset_config.{dataset_name}.{key} is not set (the dataset's defaults yaml under "
                       "configs/datasets gives it; a config that replaces the dataset's config must keep it)")
    return config[key]


def setting_or_default(config, key, defaults):
    """``config[key]``, else ``defaults[key]`` (a base class's defaults for datasets built without a yaml)."""
    return config[key] if key in config else defaults[key]


def split_entry(config, key, dataset_type, dataset_name):
    """``config[key][dataset_type]``, falling back to the ``train`` entry (one cache for every split)."""
    entries = setting(config, key, dataset_name)
    if dataset_type in entries:
        return entries[dataset_type]
    if "train" in entries:
        return entries["train"]
    raise KeyError(f"dataset_config.{dataset_name}.{key} has no '{dataset_type}' (or 'train') entry")


def pad_rows(array, rows):
    array = np.asarray(array)
    out = np.zeros((rows,) + array.shape[1:], dtype=np.float32)
    n = min(rows, array.shape[0])
    out[:n] = array[:n]
    return torch.from_numpy(out)


def region_record_fields(record, image_id, max_features, expected_dim=None, source="the region cache"):
    """``(image_feature_0, image_info_0)`` of one region record (a cache's ``reader.get`` dict, or the
    extractor's output for one image: ``features``, ``boxes``, ``image_w``, ``image_h`` and optionally
    ``num_boxes``, ``cls_prob``, ``objects``), padded to ``max_features`` rows: what every region dataset
    puts in a sample, and what :mod:`mmf_multilevel.predict` builds from a query image's regions."""
    features = np.asarray(record["features"])
    if expected_dim is not None and features.shape[1] != int(expected_dim):
        raise FeatureDimensionError(
            f"{source}: image '{image_id}' has {features.shape[1]}-d features, expected {expected_dim}"
        )
    count = min(int(record.get("num_boxes", features.shape[0])), max_features)
    info = Sample()
    info.max_features = torch.tensor(count, dtype=torch.long)
    info.num_boxes = torch.tensor(count, dtype=torch.long)
    info.image_width = torch.tensor(int(record["image_w"]), dtype=torch.long)
    info.image_height = torch.tensor(int(record["image_h"]), dtype=torch.long)
    info.bbox = pad_rows(record["boxes"], max_features)
    if record.get("cls_prob") is not None:
        info.cls_prob = pad_rows(record["cls_prob"], max_features)
    if record.get("objects") is not None:
        objects = np.full(max_features, -1, dtype=np.int64)
        given = np.asarray(record["objects"], dtype=np.int64)[:max_features]
        objects[: len(given)] = given
        info.objects = torch.from_numpy(objects)
    return pad_rows(features, max_features), info


def init_fresh_processors(dataset):
    """``dataset.init_processors()`` with processors built from ``dataset.config``, never reused.

    MMF's ``build_processors`` returns the processor already registered under ``<dataset>_<key>`` when there is
    one, so in a process that built the same dataset before (another config, another image size) the new config's
    processors would be silently ignored. Tools that build a dataset for one config in-process call this instead."""
    for key in getattr(dataset.config, "processors", None) or {}:
        registry.unregister(f"{dataset.dataset_name}_{key}")
    dataset.init_processors()
    return dataset


class RegionTextDataset(BaseDataset):
    """Base class: subclasses implement ``build_sample(record, sample)``."""

    required_fields = ("image_id",)

    def __init__(self, dataset_name, config, dataset_type, index=0):
        super().__init__(dataset_name, config, dataset_type)
        data_dir = setting(config, "data_dir", dataset_name)
        annotations = config.annotations[dataset_type]
        if isinstance(annotations, str):
            annotations = [annotations]
        self.annotation_path = data_path(annotations[index], data_dir)
        self.records = read_jsonl(self.annotation_path, self.required_fields, self.validate_record)
        self.num_dropped = 0
        self._flipped = False
        self.open_visual(config, dataset_type, index)

    # ------------------------------------------------------------------ visual input
    def open_visual(self, config, dataset_type, index):
        """Open the visual input (here: the region feature cache) and check every record's images are in it.

        Raw-image variants (``mmf_multilevel.datasets.image_tasks``) override this, ``attach_visual``
        and ``view_text``.
        """
        dataset_name, data_dir = self.dataset_name, setting(config, "data_dir", self.dataset_name)
        features = split_entry(config, "features", dataset_type, dataset_name)
        if isinstance(features, str):
            features = [features]
        self.features_path = data_path(features[index], data_dir)
        if not os.path.exists(self.features_path):
            raise FileNotFoundError(f"region feature cache not found: {self.features_path} (dataset_config.{dataset_name}.features.{dataset_type})")
        self.max_features = int(setting_or_default(config, "max_features", REGION_DEFAULTS))
        self.expected_dim = setting(config, "feature_dim", dataset_name)
        self._reader = None
        self._reader_pid = None
        self._check_coverage(bool(setting_or_default(config, "skip_missing_features", REGION_DEFAULTS)))

    def attach_visual(self, sample, image_id):
        """Put one image's visual input into ``sample`` (regions: ``image_feature_0`` / ``image_info_0``)."""
        sample.image_feature_0, sample.image_info_0 = self.region_fields(image_id)
        return False

    def view_text(self, text):
        """The text as the sample's image shows it (a raw-image variant swaps left/right after a flip)."""
        return text

    # ------------------------------------------------------------------ features
    @property
    def reader(self):
        if self._reader is None or self._reader_pid != os.getpid():
            from mmf_multilevel.features import FeatureCacheReader

            self._reader = FeatureCacheReader(self.features_path)
            self._reader_pid = os.getpid()
            self._check_dimension()
        return self._reader

    def _check_dimension(self):
        if self.expected_dim is None:
            return
        dim = self._reader.feature_dim
        if dim is not None and int(dim) != int(self.expected_dim):
            raise FeatureDimensionError(
                f"{self.features_path} holds {dim}-d region features but dataset_config."
                f"{self.dataset_name}.feature_dim (the model's input) is {self.expected_dim}"
            )

    def _check_coverage(self, skip):
        """Every record's image must be in the cache: an error naming them, or (``skip``) a counted drop."""
        ids = sorted({str(i) for record in self.records for i in self.image_ids_of(record)})
        missing = {image_id for image_id in ids if image_id not in self.reader}
        if not missing:
            return
        shown = ", ".join(repr(i) for i in sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        where = (
            f"{len(missing)} of the {len(ids)} images named in {self.annotation_path} have no region features "
            f"in {self.features_path}: {shown}"
        )
        if not skip:
            raise MissingFeaturesError(
                f"{where} (set dataset_config.{self.dataset_name}.skip_missing_features=True to drop their records)"
            )
        before = len(self.records)
        self.records = [r for r in self.records if not any(str(i) in missing for i in self.image_ids_of(r))]
        self.num_dropped = before - len(self.records)
        if not self.records:
            raise MissingFeaturesError(f"{where}; no record is left")
        warnings.warn(f"{where}; dropped their {self.num_dropped} of {before} records (skip_missing_features)")

    def region_fields(self, image_id):
        return self.record_fields(self.reader.get(str(image_id)), image_id)

    def record_fields(self, record, image_id):
        """``(image_feature_0, image_info_0)`` of one cache record (``reader.get``'s dict)."""
        return region_record_fields(record, image_id, self.max_features, self.expected_dim, self.features_path)

    # ------------------------------------------------------------------ samples
    def image_ids_of(self, record):
        """The images a record needs features of (NLVR2: two)."""
        return (record["image_id"],)

    def validate_record(self, record):
        return None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, idx):
        record = self.records[idx]
        sample = Sample()
        # the record's position (MMF's test reporter gathers ``id`` over ranks; ids as strings it cannot)
        sample.id = torch.tensor(idx, dtype=torch.long)
        self.attach_visual(sample, record["image_id"])
        self.build_sample(record, sample)
        return sample

    def build_sample(self, record, sample):
        raise NotImplementedError


def masks_text(text_processor) -> bool:
    """Whether ``text_processor`` masks words for MLM (MMF's ``masked_token`` with a non-zero
    ``mask_probability``; ``bert_tokenizer`` never does)."""
    return float(getattr(text_processor, "_probability", 0.0) or 0.0) > 0.0


def text_fields(text_processor, text):
    """One text through an MMF BERT processor: ``input_ids``, ``input_mask``, ``segment_ids`` and, when
    the processor masks words, ``lm_label_ids``; the raw tokens and text do not travel. (MMF's
    ``masked_token`` processor requires an ``is_correct`` key and only copies it to its output, which
    is dropped here: the dataset sets the sample's ``is_correct`` itself.)"""
    processed = text_processor({"text": text, "text_a": text, "is_correct": 1})
    drop = ("tokens", "text", "is_correct") + (() if masks_text(text_processor) else ("lm_label_ids",))
    for key in drop:
        processed.pop(key, None)
    return processed


def tokenize(text_processor, text):
    """A task dataset's text (:func:`text_fields`), never with MLM targets."""
    processed = text_fields(text_processor, text)
    processed.pop("lm_label_ids", None)
    return processed


class RegionTaskBuilder(BaseDatasetBuilder):
    """Builder of one region-feature dataset class: ``name``, ``dataset_class``, ``config_file``.

    ``config_file`` is relative to ``configs/datasets``. ``num_outputs(dataset)``
    (optional) is registered as ``<name>_num_final_outputs`` for classification heads.
    """

    name = None
    dataset_class = None
    config_file = None

    def __init__(self):
        super().__init__(self.name)
        self.dataset = None

    @classmethod
    def config_path(cls):
        return os.path.join(CONFIG_DIR, cls.config_file)

    def build(self, config, dataset_type="train", *args, **kwargs):
        return None

    def load(self, config, dataset_type="train", *args, **kwargs):
        if dataset_type not in config.annotations:
            raise KeyError(
                f"dataset_config.{self.dataset_name}.annotations has no '{dataset_type}' split "
                f"(it has {sorted(config.annotations)})"
            )
        self.dataset = self.dataset_class(self.dataset_name, config, dataset_type)
        return self.dataset

    def num_outputs(self, dataset):
        return None

    def update_registry_for_model(self, config):
        if self.dataset is not None:
            count = self.num_outputs(self.dataset)
            if count is not None:
                registry.register(f"{self.dataset_name}_num_final_outputs", count)
