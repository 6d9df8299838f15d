"""Shared pieces of the extractor tests: a tiny detector config and generated images."""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRACT_SCRIPT = os.path.join(ROOT, "feature_extraction", "extract.py")

# A tiny C4 detector with the real structure: ResNet-50 depth, narrow channels, few proposals and classes.
TINY_OPTS = [
    "MODEL.RESNETS.DEPTH", "50",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "4",
    "MODEL.ROI_HEADS.NUM_CLASSES", "20",
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES", "11",
    "MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM", "8",
    "MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM", "16",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "30",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "160",
]
TINY_VINVL_OPTS = TINY_OPTS + ["MODEL.RESNETS.NUM_GROUPS", "2"]  # grouped (ResNeXt) convolutions
TINY_FEATURE_DIM = 16 * 8


def tiny_opts(model):
    return list(TINY_VINVL_OPTS if model == "vinvl_x152c4" else TINY_OPTS)


def make_images(folder, count, seed=0, sizes=None):
    """``count`` smooth random JPEGs of varied sizes in ``folder``; -> list of ids."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(count):
        w, h = sizes[i % len(sizes)] if sizes else (int(rng.integers(60, 140)), int(rng.integers(50, 120)))
        coarse = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        name = f"img{i:03d}"
        img.save(os.path.join(folder, name + ".jpg"), quality=90)
        ids.append(name)
    return ids


def cli_env(tmp_path):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def cli_args(*args):
    return [sys.executable, EXTRACT_SCRIPT, *args]
