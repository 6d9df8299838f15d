"""Small vision-language data sets in exactly the package's formats, for tests and the demo.

``python -m mmf_multilevel.datasets.generate --out data/demo`` writes::

    data/demo/
      images/<image_id>.jpg            the pictures (coloured shapes on a background)
      features/regions.lmdb            region feature cache (mmf_multilevel.features): one region per shape,
                                       features / boxes (pixels) / cls_prob / objects / attr_prob / attrs
      annotations/captions_{train,val,test}.jsonl   {"image_id", "caption"}            (2 per image)
      annotations/vqa_{train,val}.jsonl             {"question_id", "image_id", "question",
                                                     "answers": [10 human answers]}
      annotations/vqa_test.jsonl                    the same without "answers" (like test-dev)
      annotations/{nlvr2,snli_ve,gqa,vgqa,retrieval}_{split}.jsonl, refcoco+_{train,val,testA,testB}.jsonl
                                       the downstream tasks' annotations
      corpus.txt                       the train captions as unpaired text (μ-VLA's retrieval corpus)
      answers.txt, answers_gqa.txt     answer vocabularies (VQA, GQA), one answer per line
      objects_vocab.txt / attributes_vocab.txt      detector class / attribute names
      vocab/vocab.txt, vocab/tokenizer_config.json  a WordPiece vocabulary covering the texts
                                       (a BERT tokenizer folder: AutoTokenizer.from_pretrained(dir))
      manifest.json                    what was generated, with which settings (written last)

Each image holds 2-5 shapes; a region's feature is a fixed function of its shape and colour
plus noise (so a model can learn to answer), and its detector outputs (class and attribute
distributions) are peaked at the true shape and colour. The human answers of a question
vary as real ones do (capitals, punctuation, number words, an occasional wrong or
out-of-vocabulary answer), so the official VQA accuracy is exercised.

The same settings always give the same files. The set is built in a temporary folder and
renamed into place, so an interrupted run leaves nothing half-written; an existing complete
set with the same settings is reused (``--force`` rebuilds it).
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 180),
    "yellow": (230, 200, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MANIFEST = "manifest.json"
FORMAT = "mmf_multilevel.demo_data"
FORMAT_VERSION = 3  # 2: downstream-task annotations; 3: corpus.txt


def _plural(shape):
    return shape + "s"


# --------------------------------------------------------------------------- scenes
def _scene(rng, min_objects, max_objects):
    """(width, height, [(shape, color, box), ...]) with non-overlapping boxes in pixels."""
    width = int(rng.integers(320, 641))
    height = int(rng.integers(240, 481))
    count = int(rng.integers(min_objects, max_objects + 1))
    colors = list(COLORS)
    objects = []
    attempts = 0
    while len(objects) < count and attempts < 200:
        attempts += 1
        size = int(rng.integers(40, min(width, height) // 2))
        x1 = int(rng.integers(0, width - size))
        y1 = int(rng.integers(0, height - size))
        box = (x1, y1, x1 + size, y1 + size)
        if any(not (box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]) for _, _, b in objects):
            continue
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = colors[int(rng.integers(len(colors)))]
        objects.append((shape, color, box))
    return width, height, objects


def _draw(path, width, height, objects, background):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for shape, color, (x1, y1, x2, y2) in objects:
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        elif shape == "triangle":
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
        else:  # diamond
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    tmp = f"{path}.tmp"
    image.save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)


def _regions(objects, prototypes, feature_dim, rng, dtype):
    """The detector outputs of one image: features, boxes, class/attribute distributions."""
    shape_proto, color_proto = prototypes
    n = len(objects)
    features = np.empty((n, feature_dim), dtype=np.float32)
    boxes = np.empty((n, 4), dtype=np.float32)
    cls_prob = np.empty((n, len(SHAPES) + 1), dtype=np.float32)  # column 0: background
    attr_prob = np.empty((n, len(COLORS) + 1), dtype=np.float32)  # column 0: no attribute
    colors = list(COLORS)
    for row, (shape, color, box) in enumerate(objects):
        s, c = SHAPES.index(shape), colors.index(color)
        # mean-pooled CNN features are non-negative; keep that property
        features[row] = np.abs(shape_proto[s] + color_proto[c] + 0.3 * rng.standard_normal(feature_dim))
        jitter = rng.uniform(-2.0, 2.0, size=4)
        boxes[row] = np.asarray(box, dtype=np.float32) + jitter
        for probs, index in ((cls_prob[row], s + 1), (attr_prob[row], c + 1)):
            logits = rng.standard_normal(probs.shape[0])
            logits[index] += 4.0
            expd = np.exp(logits - logits.max())
            probs[:] = expd / expd.sum()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, None)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, None)
    boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 1)
    boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 1)
    return {
        "features": features.astype(dtype),
        "boxes": boxes,
        "cls_prob": cls_prob,
        "objects": cls_prob[:, 1:].argmax(axis=1).astype(np.int64),
        "attr_prob": attr_prob,
        "attrs": attr_prob[:, 1:].argmax(axis=1).astype(np.int64),
    }


# --------------------------------------------------------------------------- texts
def _phrase(objects):
    words = [f"a {color} {shape}" for shape, color, _ in objects]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _captions(objects, rng):
    counts = {}
    for shape, _, _ in objects:
        counts[shape] = counts.get(shape, 0) + 1
    summary = " and ".join(
        f"{COUNT_WORDS[n]} {_plural(s) if n > 1 else s}" for s, n in sorted(counts.items())
    )
    first = f"{_phrase(objects)} on a plain background."
    templates = (
        f"a picture with {summary}.",
        f"there are {COUNT_WORDS[len(objects)]} shapes : {_phrase(objects)}.",
        f"{summary} drawn on a grey background.",
    )
    return [first, templates[int(rng.integers(len(templates)))]]


def _human_answers(truth, rng, variants=(), wrong=()):
    """Ten answers as annotators give them: mostly the truth, in various spellings."""
    answers = []
    for _ in range(10):
        u = rng.random()
        if u < 0.08 and wrong:
            answers.append(wrong[int(rng.integers(len(wrong)))])
        elif u < 0.11:
            answers.append("i don't know")  # outside the answer vocabulary
        elif u < 0.35 and variants:
            answers.append(variants[int(rng.integers(len(variants)))])
        else:
            answers.append(truth)
    return answers


def _questions(objects, rng):
    colors_of = {}
    for shape, color, _ in objects:
        colors_of.setdefault(shape, []).append(color)
    shape_of_color = {}
    for shape, color, _ in objects:
        shape_of_color.setdefault(color, []).append(shape)
    out = []
    unique = [s for s, cs in colors_of.items() if len(cs) == 1]
    if unique:
        shape = unique[int(rng.integers(len(unique)))]
        truth = colors_of[shape][0]
        wrong = [c for c in COLORS if c != truth]
        out.append((f"what color is the {shape}?", _human_answers(truth, rng, (truth.title(), truth + "."), wrong)))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    n = len(colors_of.get(shape, []))
    out.append(
        (f"how many {_plural(shape)} are there?", _human_answers(str(n), rng, (COUNT_WORDS[n],), (str(n + 1), str(max(n - 1, 0)))))
    )
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    truth = "yes" if shape in colors_of else "no"
    out.append((f"is there a {shape} in the picture?", _human_answers(truth, rng, (truth.title(), truth + "!"), ("no" if truth == "yes" else "yes",))))
    single = [c for c, ss in shape_of_color.items() if len(ss) == 1]
    if single:
        color = single[int(rng.integers(len(single)))]
        truth = shape_of_color[color][0]
        out.append((f"what shape is {color}?", _human_answers(truth, rng, (truth.title(), "a " + truth), [s for s in SHAPES if s != truth])))
    return out


def answer_vocabulary():
    return list(COLORS) + list(SHAPES) + [str(i) for i in range(len(COUNT_WORDS))] + ["yes", "no"]


def gqa_answer_vocabulary():
    """GQA-style answers; "diamond" is left out on purpose, so some gold answers are outside it."""
    return list(COLORS) + [s for s in SHAPES if s != "diamond"] + ["yes", "no", "left", "right"]


def _side(box, width):
    return "left" if (box[0] + box[2]) / 2 < width / 2 else "right"


def _xywh(box):
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def _texts_of(records):
    for record in records:
        for field in ("sentence", "hypothesis", "question", "expression"):
            if field in record:
                yield record[field]
        for caption in record.get("captions", ()):
            yield caption


def _nlvr2(split, items, rng):
    """Statements about two images; true/false balanced; about half mention left/right."""
    out = []
    for n in range(len(items)):
        left, right = items[n], items[(n + 1 + int(rng.integers(max(len(items) - 1, 1)))) % len(items)]
        counts = {}
        for _, _, _, objs in (left, right):
            for shape, _, _ in objs:
                counts[shape] = counts.get(shape, 0) + 1
        kind = int(rng.integers(3))
        if kind == 0:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            n_true = counts.get(shape, 0)
            n_said = n_true if rng.random() < 0.5 else n_true + int(rng.integers(1, 3))
            sentence = f"there are {COUNT_WORDS[min(n_said, 6)]} {_plural(shape)} in total ."
            label = n_said == n_true and n_said <= 6
        elif kind == 1:
            which, scene = (("left", left) if rng.random() < 0.5 else ("right", right))
            shape, color, _ = scene[3][int(rng.integers(len(scene[3])))]
            if rng.random() < 0.5:
                sentence, label = f"the {which} image contains a {color} {shape} .", True
            else:
                color2 = [c for c in COLORS if c != color][int(rng.integers(len(COLORS) - 1))]
                label = any(s == shape and c == color2 for s, c, _ in scene[3])
                sentence = f"the {which} image contains a {color2} {shape} ."
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            label = all(any(s == shape for s, _, _ in scene[3]) for scene in (left, right))
            sentence = f"both images contain a {shape} ."
        out.append({
            "identifier": f"{split}-{n}-0", "sentence": sentence, "left_image": left[0], "right_image": right[0],
            "label": bool(label),
        })
    return out


def _snli_ve(split, items, rng):
    labels = ("entailment", "neutral", "contradiction")
    out = []
    for image_id, _, _, objs in items:
        present = {s for s, _, _ in objs}
        for label in labels:
            if label == "entailment":
                shape, color, _ = objs[int(rng.integers(len(objs)))]
                hypothesis = f"there is a {color} {shape} ."
            elif label == "contradiction":
                absent = [s for s in SHAPES if s not in present]
                hypothesis = f"there is a {absent[0]} ." if absent else f"there are {COUNT_WORDS[6]} shapes ."
            else:
                shape = objs[int(rng.integers(len(objs)))][0]
                hypothesis = f"the {shape} was drawn by a child ."
            out.append({"pair_id": f"{image_id}#{label}", "image_id": image_id, "hypothesis": hypothesis, "label": label})
    return out


def _gqa(split, items, rng, prefix="gqa"):
    out = []
    for image_id, width, _, objs in items:
        by_shape = {}
        for shape, color, box in objs:
            by_shape.setdefault(shape, []).append((color, box))
        unique = [(s, v[0]) for s, v in by_shape.items() if len(v) == 1]
        if unique:
            shape, (color, box) = unique[int(rng.integers(len(unique)))]
            out.append({"question_id": f"{prefix}{len(out)}_{image_id}", "image_id": image_id,
                        "question": f"what color is the {shape}?", "answer": color})
            out.append({"question_id": f"{prefix}{len(out)}_{image_id}", "image_id": image_id,
                        "question": f"on which side is the {shape}?", "answer": _side(box, width)})
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        out.append({"question_id": f"{prefix}{len(out)}_{image_id}", "image_id": image_id,
                    "question": f"is there a {shape}?", "answer": "yes" if shape in by_shape else "no"})
        colors_of = {}
        for s, c, _ in objs:
            colors_of.setdefault(c, []).append(s)
        single = [(c, ss[0]) for c, ss in colors_of.items() if len(ss) == 1]
        if single:
            color, shape = single[int(rng.integers(len(single)))]
            out.append({"question_id": f"{prefix}{len(out)}_{image_id}", "image_id": image_id,
                        "question": f"which shape is {color}?", "answer": shape})
    return out


def _refcoco(split, items, rng):
    """Referring expressions for shapes whose (colour, shape) is unique in their image; gold box = the drawn box."""
    out = []
    for image_id, width, _, objs in items:
        combos = {}
        for shape, color, box in objs:
            combos.setdefault((color, shape), []).append(box)
        for (color, shape), boxes in sorted(combos.items()):
            if len(boxes) != 1:
                continue
            same_shape = [b for s, _, b in objs if s == shape]
            expression = f"the {color} {shape}"
            if len(same_shape) == 2 and rng.random() < 0.5:
                other = [b for b in same_shape if b is not boxes[0]][0]
                expression = f"the {shape} on the {'left' if boxes[0][0] < other[0] else 'right'}"
            out.append({"ref_id": len(out), "image_id": image_id, "expression": expression,
                        "bbox": _xywh(boxes[0]), "category": shape})
    return out


def _retrieval(split, items, rng):
    return [{"image_id": image_id, "captions": _captions(objs, rng)} for image_id, _, _, objs in items]


def _task_annotations(split, items, rng):
    """The downstream-task files of one split."""
    tasks = {
        f"nlvr2_{split}": _nlvr2(split, items, rng),
        f"snli_ve_{split}": _snli_ve(split, items, rng),
        f"gqa_{split}": _gqa(split, items, rng),
        f"vgqa_{split}": _gqa(split, items, rng, prefix="vg"),
        f"retrieval_{split}": _retrieval(split, items, rng),
    }
    refs = _refcoco(split, items, rng)
    if split == "test":  # UNC's testA / testB: two disjoint halves of the test images
        half = {image_id for image_id, _, _, _ in items[: len(items) // 2]}
        tasks["refcoco+_testA"] = [r for r in refs if r["image_id"] in half]
        tasks["refcoco+_testB"] = [r for r in refs if r["image_id"] not in half]
    else:
        tasks[f"refcoco+_{split}"] = refs
    return {name: records for name, records in tasks.items() if records}


def _wordpiece_vocab(texts):
    import re

    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))
    # a few frequent English words and every digit, as a real vocabulary would have them
    words.update(["the", "a", "is", "of", "in", "on", "with", "what", "how", "many"] + list("0123456789"))
    return list(SPECIAL_TOKENS) + sorted(words)


# --------------------------------------------------------------------------- driver
def settings_of(args):
    return {
        "num_images": args.num_images,
        "feature_dim": args.feature_dim,
        "min_objects": args.min_objects,
        "max_objects": args.max_objects,
        "seed": args.seed,
        "dtype": "float16" if args.float16 else "float32",
        "mmf_compat": bool(args.mmf_compat),
        "images": not args.no_images,
    }


def _existing(out, settings):
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    same = manifest.get("settings") == settings and manifest.get("version") == FORMAT_VERSION
    return manifest if same else None


def _checked_args(num_images, feature_dim, min_objects, max_objects, seed, float16, mmf_compat, images):
    """The settings of :func:`generate` as an ``argparse.Namespace`` (like the command line's), validated."""
    args = argparse.Namespace(
        num_images=int(num_images), feature_dim=int(feature_dim), min_objects=int(min_objects),
        max_objects=int(max_objects), seed=int(seed), float16=bool(float16), mmf_compat=bool(mmf_compat),
        no_images=not images,
    )
    if args.num_images < 3:
        raise ValueError(f"num_images must be at least 3 (one per split), got {args.num_images}")
    if not 1 <= args.min_objects <= args.max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {args.min_objects} and {args.max_objects}")
    if args.feature_dim < 1:
        raise ValueError(f"feature_dim must be positive, got {args.feature_dim}")
    return args


def _fresh_work_folder(out):
    """An empty ``<out>.partial-<pid>`` folder with the set's sub-folders, where the set is built."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("images", "features", "annotations", "vocab"):
        os.makedirs(os.path.join(work, sub))
    return work


def _prototypes(seed, feature_dim):
    """The per-shape and per-colour region feature prototypes, from their own random stream."""
    proto_rng = np.random.default_rng(12345 + seed)
    return (
        proto_rng.standard_normal((len(SHAPES), feature_dim)).astype(np.float32),
        proto_rng.standard_normal((len(COLORS), feature_dim)).astype(np.float32),
    )


def _split_bounds(num_images):
    """Image index boundaries of the splits: split ``i`` holds images ``bounds[i]`` to ``bounds[i + 1] - 1``."""
    bounds = np.cumsum([0] + [int(round(f * num_images)) for _, f in SPLITS])
    bounds[-1] = num_images
    return bounds


def _write_images(writer, work, indices, bounds, args, rng, prototypes, dtype):
    """Draw each image's scene, write its JPEG and regions; -> captions, questions, texts and scenes per split."""
    captions = {name: [] for name, _ in SPLITS}
    questions = {name: [] for name, _ in SPLITS}
    texts = []
    scenes = {name: [] for name, _ in SPLITS}
    question_id = 0
    for index in indices:
        split = next(name for (name, _), end in zip(SPLITS, bounds[1:]) if index < end)
        image_id = f"demo_{index:06d}"
        width, height, objects = _scene(rng, args.min_objects, args.max_objects)
        background = tuple(int(v) for v in rng.integers(90, 170, size=3))
        if not args.no_images:
            _draw(os.path.join(work, "images", f"{image_id}.jpg"), width, height, objects, background)
        record = _regions(objects, prototypes, args.feature_dim, rng, dtype)
        record.update(image_w=width, image_h=height)
        writer.write(image_id, record)
        scenes[split].append((image_id, width, height, objects))
        for caption in _captions(objects, rng):
            captions[split].append({"image_id": image_id, "caption": caption})
            texts.append(caption)
        for question, answers in _questions(objects, rng):
            question_id += 1
            item = {"question_id": question_id, "image_id": image_id, "question": question}
            if split != "test":
                item["answers"] = answers
            questions[split].append(item)
            texts.append(question)
    return captions, questions, texts, scenes


def _write_annotations(work, captions, questions, scenes, seed, texts):
    """Write the caption, VQA and downstream-task annotation files; the tasks' texts are added to ``texts``."""
    from mmf_multilevel.datasets.annotations import write_jsonl

    ann = os.path.join(work, "annotations")
    for split in captions:
        write_jsonl(os.path.join(ann, f"captions_{split}.jsonl"), captions[split])
        write_jsonl(os.path.join(ann, f"vqa_{split}.jsonl"), questions[split])
    task_rng = np.random.default_rng(seed + 1)
    for split, items in scenes.items():
        for name, records in _task_annotations(split, items, task_rng).items():
            write_jsonl(os.path.join(ann, f"{name}.jsonl"), records)
            texts.extend(_texts_of(records))


def _write_vocabularies(work, train_captions, texts):
    """Write corpus.txt, the answer/detector vocabularies and the tokenizer folder; -> (answers, token vocab)."""
    # every train caption as unpaired text, one per line: the text corpus of the weak-corpus builder
    _write_lines(os.path.join(work, "corpus.txt"), [c["caption"] for c in train_captions])
    answers = answer_vocabulary()
    _write_lines(os.path.join(work, "answers.txt"), answers)
    _write_lines(os.path.join(work, "answers_gqa.txt"), gqa_answer_vocabulary())
    _write_lines(os.path.join(work, "objects_vocab.txt"), SHAPES)
    _write_lines(os.path.join(work, "attributes_vocab.txt"), list(COLORS))
    vocab = _wordpiece_vocab(texts)
    _write_lines(os.path.join(work, "vocab", "vocab.txt"), vocab)
    with open(os.path.join(work, "vocab", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}, f, indent=2)
    return answers, vocab


def _manifest(args, settings, bounds, captions, questions, answers, vocab):
    """The content of ``manifest.json``: the format, the settings and the set's sizes."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "settings": settings,
        "num_images": {name: int(end - start) for (name, _), start, end in zip(SPLITS, bounds[:-1], bounds[1:])},
        "num_captions": {k: len(v) for k, v in captions.items()},
        "num_questions": {k: len(v) for k, v in questions.items()},
        "answer_vocab_size": len(answers),
        "token_vocab_size": len(vocab),
        "feature_dim": args.feature_dim,
        "max_regions": args.max_objects,
    }


def _publish(work, out, manifest):
    """Write the manifest into ``work`` (last, so it marks a complete set), then move ``work`` to ``out``."""
    with open(os.path.join(work, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(work, out)


def generate(out, num_images=240, feature_dim=2048, min_objects=2, max_objects=5, seed=0, float16=False,
             mmf_compat=False, images=True, force=False, progress=True):
    """Write a data set under ``out`` (see the module docstring); returns its manifest."""
    args = _checked_args(num_images, feature_dim, min_objects, max_objects, seed, float16, mmf_compat, images)
    settings = settings_of(args)
    out = os.path.abspath(os.fspath(out))
    found = _existing(out, settings)
    if found is not None and not force:
        return found
    if os.path.exists(out) and not force and os.listdir(out):
        raise FileExistsError(
            f"{out} exists and is not a data set generated with these settings; choose another --out or pass --force"
        )

    from tqdm import tqdm

    from mmf_multilevel.features import FeatureCacheWriter

    work = _fresh_work_folder(out)
    rng = np.random.default_rng(args.seed)
    prototypes = _prototypes(args.seed, args.feature_dim)
    dtype = settings["dtype"]
    cache = os.path.join(work, "features", "regions.lmdb")
    bounds = _split_bounds(args.num_images)
    # the class names in the header, as the extractor writes them (info.object_names: objects id k = name k)
    info = {"object_names": list(SHAPES), "attribute_names": list(COLORS)}
    with FeatureCacheWriter(cache, detector="demo_shapes", dtype=dtype, batch_size=64, mmf_compat=args.mmf_compat,
                            feature_dim=args.feature_dim, info=info) as writer:
        indices = tqdm(range(args.num_images), desc="demo data", unit="img", disable=not progress)
        captions, questions, texts, scenes = _write_images(writer, work, indices, bounds, args, rng, prototypes, dtype)
    _write_annotations(work, captions, questions, scenes, args.seed, texts)
    answers, vocab = _write_vocabularies(work, captions["train"], texts)
    manifest = _manifest(args, settings, bounds, captions, questions, answers, vocab)
    _publish(work, out, manifest)
    return manifest


def _write_lines(path, lines):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mmf_multilevel.datasets.generate",
        description="Generate a small image/caption/VQA data set with region features in the package's formats.",
    )
    p.add_argument("--out", required=True, help="output folder (created; reused when complete with the same settings)")
    p.add_argument("--num-images", type=int, default=240, help="images over train/val/test (70/15/15 %%); default 240")
    p.add_argument("--feature-dim", type=int, default=2048, help="region feature size D (default 2048, as BUTD/VinVL)")
    p.add_argument("--min-objects", type=int, default=2, help="fewest shapes (= regions) per image")
    p.add_argument("--max-objects", type=int, default=5, help="most shapes (= regions) per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float16", action="store_true", help="store region features as float16")
    p.add_argument("--mmf-compat", action="store_true", help="write the cache in MMF's pickled LMDB layout")
    p.add_argument("--no-images", action="store_true", help="skip the JPEG files (features and texts only)")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete set is already there")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        manifest = generate(
            args.out, args.num_images, args.feature_dim, args.min_objects, args.max_objects, args.seed,
            args.float16, args.mmf_compat, not args.no_images, args.force, not args.quiet,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"generate: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{os.path.abspath(args.out)}: {sum(manifest['num_images'].values())} images, "
        f"{sum(manifest['num_captions'].values())} captions, {sum(manifest['num_questions'].values())} questions, "
        f"{manifest['answer_vocab_size']} answers"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
