"""Region feature extraction (BUTD R101-C4, VinVL X152-C4) into the region feature cache.

``python feature_extraction/extract.py --model vinvl_x152c4 --weights vinvl_vg_x152c4.pth
--images DIR --output feats.lmdb`` (see :mod:`.cli`). The detectors are detectron2 models
(:mod:`.detectors`, imported lazily because they need detectron2); the checkpoint converters
are in :mod:`.converters`, the batched, resumable run in :mod:`.runner`.
"""
