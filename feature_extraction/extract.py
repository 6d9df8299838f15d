#!/usr/bin/env python
"""Region feature extractor (BUTD R101-C4, VinVL X152-C4) -> LMDB region feature cache.

    python feature_extraction/extract.py --model vinvl_x152c4 --weights vinvl_vg_x152c4.pth \
        --images DIR --output feats.lmdb
    python feature_extraction/extract.py merge --output feats.lmdb feats.shard*.lmdb

Run with --help for every option; the code lives in mmf_multilevel/extraction.
"""
import os
import sys

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # run from a checkout without installing the package
        sys.path.insert(0, root)
    from mmf_multilevel.extraction.cli import run

    run()
