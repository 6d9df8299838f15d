"""Region feature cache: LMDB keyed by image id, safetensors records.

``FeatureCacheWriter`` writes (batch-atomic, resumable; optionally MMF's pickled layout),
``FeatureCacheReader`` reads both layouts (MMF pickles through a restricted unpickler),
``check_cache`` verifies a cache; ``python -m mmf_multilevel.features check|info|convert``.
"""
from mmf_multilevel.features.check import cache_info, check_cache
from mmf_multilevel.features.format import (
    CacheNotFoundError,
    CorruptCacheError,
    CorruptRecordError,
    FeatureCacheError,
    HeaderMismatchError,
    MissingKeyError,
    RecordValidationError,
    UnsafePickleError,
)
from mmf_multilevel.features.reader import FeatureCacheReader
from mmf_multilevel.features.writer import FeatureCacheWriter

__all__ = [
    "FeatureCacheWriter",
    "FeatureCacheReader",
    "check_cache",
    "cache_info",
    "FeatureCacheError",
    "CacheNotFoundError",
    "MissingKeyError",
    "CorruptRecordError",
    "UnsafePickleError",
    "CorruptCacheError",
    "HeaderMismatchError",
    "RecordValidationError",
]

