"""Phrase-to-region grounding pictures: for an image and a caption, each phrase concept's score with each
region (paper §3.3, Eq. 2: the cosine similarity of the multimodal outputs of phrase and region, which WPG
trains and the paper's Figure 3 shows), drawn as the region boxes over the image, one panel per phrase.

    python -m mmf_multilevel.methods.mvptr.picture --config projects/mvptr/demo/pretrain.yaml \\
        --checkpoint save/mvptr_demo/pretrain/mvptr_final.pth --index 0 --out grounding.png env.data_dir=$PWD/data
    python -m mmf_multilevel.methods.mvptr.picture --config projects/mvptr/demo/pretrain.yaml \\
        --checkpoint mvptr_final.pth --image-id demo_000003 --caption "a red circle on a plain background." \\
        --vocab data/demo/vocab/vocab.txt --out grounding.png --html grounding.html env.data_dir=$PWD/data

``--index N``: caption ``N`` of the config's dataset split (its phrases from the concept tool's output);
``--caption`` with ``--image-id``: a new caption, parsed as the concept tool parses (spaCy, the model's
concept vocabulary ``model_config.mvptr.concepts``, ``--vocab``: the tokenizer's ``vocab.txt``). The image's
pixels come from ``--images`` (default ``<dataset data_dir>/images``, files ``<image id>.jpg|.png``);
without them the boxes are drawn on a blank canvas of the image's size. Each panel: every region's box
coloured by its score with that phrase (the colour bar: cosine similarity), the best ``--top`` boxes
drawn thick with their score. ``--html`` also writes a page with the picture and the score table.

The computation (:func:`grounding_scores`) is apart from the drawing (:func:`draw_grounding`) and from the
files (``write_picture``: a temporary file renamed onto the path).
"""
import argparse
import base64
import html
import json
import math
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["grounding_scores", "draw_grounding", "write_html", "main"]


@torch.no_grad()
def grounding_scores(model, sample_list):
    """``(phrase positions (P,), scores (P, K), region mask (K,))`` of the first pair of ``sample_list``
    (an ``mvptr_captions`` batch): the cosine similarity of each phrase slot's multimodal output with
    each region's, the caption fused with its own image."""
    net = model.backbone
    out = model.encode(sample_list)
    states, _, mask = net.fuse(out["text"][:1], out["text_mask"][:1], out["visual"][:1], out["visual_mask"][:1])
    width = out["text"].size(1)
    slots = sample_list["phrase_slots"][0].bool()
    phrases = F.normalize(states[0, :width][slots].float(), dim=-1)
    regions = F.normalize(states[0, width:].float(), dim=-1)
    return slots.nonzero().view(-1), phrases @ regions.t(), mask[0, width:].bool()


def draw_grounding(picture: Optional[np.ndarray], size, boxes: np.ndarray, names: Sequence[str], scores: np.ndarray,
                   top: int = 3, columns: int = 3, panel_inches: float = 4.0, title: str = ""):
    """A matplotlib figure, one panel per phrase (``names[p]``, ``scores[p]`` over the regions): the image
    (``picture``, ``H x W x 3``; None: a blank canvas of ``size`` = (width, height)) under every region's
    box (``boxes`` in pixels, ``x1 y1 x2 y2``) coloured by its score, the ``top`` best thick with their
    score written. Panel ``p`` is ``figure.axes[p]``."""
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if len(names) != len(scores) or not len(names):
        raise ValueError(f"draw_grounding needs one name per score row and at least one phrase, got {len(names)} "
                         f"names and {len(scores)} rows")
    width, height = (picture.shape[1], picture.shape[0]) if picture is not None else size
    columns = max(1, min(columns, len(names)))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(panel_inches * columns, panel_inches * rows * height / max(width, 1) + 0.6))
    norm = colors.Normalize(vmin=float(np.min(scores)), vmax=float(np.max(scores)) + 1e-6)
    cmap = matplotlib.colormaps["viridis"]
    for p, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, p + 1)
        if picture is not None:
            axes.imshow(picture)
        else:
            axes.imshow(np.full((int(height), int(width), 3), 235, dtype=np.uint8))
        order = np.argsort(-scores[p])
        best = set(order[:top].tolist())
        for k in order[::-1]:  # the best drawn last, on top
            x1, y1, x2, y2 = boxes[k]
            thick = k in best
            axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=cmap(norm(scores[p, k])),
                                     linewidth=3.0 if thick else 1.0, alpha=1.0 if thick else 0.6))
            if thick:
                axes.text(x1 + 2, y1 + 2, f"{scores[p, k]:.2f}", color="white", fontsize=8, va="top",
                          bbox=dict(facecolor=cmap(norm(scores[p, k])), alpha=0.8, pad=1, linewidth=0))
        axes.set_title(name, fontsize=10)
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        axes.set_xticks([])
        axes.set_yticks([])
    mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
    figure.colorbar(mappable, ax=figure.axes, shrink=0.6, label="phrase-region cosine similarity")
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def write_html(path: str, picture_path: str, title: str, names: Sequence[str], scores: np.ndarray,
               region_labels: Sequence[str]) -> str:
    """A page with the picture (embedded) and, per phrase, the regions ranked by score."""
    from mmf_multilevel.files import write_atomically

    with open(picture_path, "rb") as f:
        encoded = base64.b64encode(f.read()).decode("ascii")
    rows = []
    for p, name in enumerate(names):
        order = np.argsort(-scores[p])[:5]
        cells = ", ".join(f"{html.escape(region_labels[k])} {scores[p, k]:.3f}" for k in order)
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{cells}</td></tr>")
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<h1>{html.escape(title)}</h1><img src='data:image/png;base64,{encoded}' style='max-width:100%'>"
            "<table border='1' cellpadding='4'><tr><th>phrase</th><th>best regions (cosine)</th></tr>"
            + "".join(rows) + "</table>")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_atomically(path, write)
    return path


def _read_picture(folder: Optional[str], image_id: str):
    if folder is None:
        return None
    for extension in (".jpg", ".png", ".jpeg"):
        path = os.path.join(folder, f"{image_id}{extension}")
        if os.path.isfile(path):
            from PIL import Image

            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
    return None


def _parser():
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.mvptr.picture",
                                     description="Phrase-to-region grounding scores of MVPTR drawn over the image.")
    parser.add_argument("--config", required=True, help="an mvptr project whose dataset is mvptr_captions")
    parser.add_argument("--checkpoint", required=True, help="the model's weights (.pth / .ckpt)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--index", type=int, default=None, help="caption N of the split (its phrases from the tool)")
    parser.add_argument("--image-id", default=None, help="with --caption: the image (an id of the region cache)")
    parser.add_argument("--caption", default=None, help="a new caption, parsed as the concept tool does")
    parser.add_argument("--vocab", default=None, help="with --caption: the tokenizer's vocab.txt")
    parser.add_argument("--images", default=None, help="folder of <image id>.jpg/.png (default <data_dir>/images)")
    parser.add_argument("--top", type=int, default=3, help="boxes drawn thick per phrase")
    parser.add_argument("--out", required=True, help="the picture (PNG)")
    parser.add_argument("--html", default=None, help="also write this page (picture + score table)")
    parser.add_argument("opts", nargs="*", help="config overrides, as for mmf_run (env.data_dir=...)")
    return parser


def main(argv=None) -> int:
    from mmf.common.sample import Sample, SampleList

    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.files import write_picture
    from mmf_multilevel.methods.mvptr.retrieval import load_model

    args = _parser().parse_args(argv)
    if (args.index is None) == (args.caption is None):
        print("error: give either --index or --caption (with --image-id)", file=sys.stderr)
        return 2
    try:
        config = load_run_config(args.config, args.opts)
        model = load_model(config, args.checkpoint)
        from mmf_multilevel.datasets.base import init_fresh_processors
        from mmf_multilevel.methods.mvptr.data import MVPTRCaptionsDataset

        settings = config.dataset_config.mvptr_captions
        dataset = MVPTRCaptionsDataset("mvptr_captions", settings, args.split)
        init_fresh_processors(dataset)
        dataset.mlm_probability = dataset.phrase_mask_probability = dataset.mcr_mask_probability = 0.0
        if args.caption is not None:
            if not args.image_id or not args.vocab:
                raise ValueError("--caption needs --image-id and --vocab")
            from mmf_multilevel.methods.mvptr.concepts import caption_record
            from mmf_multilevel.methods.mvptr.model import read_id2phrase

            concepts = config.model_config.mvptr.concepts
            if not concepts:
                raise ValueError("model_config.mvptr.concepts is null: a new caption needs the concept vocabulary")
            record = caption_record(args.caption, args.vocab, read_id2phrase(str(concepts)), image_id=args.image_id)
        else:
            if not 0 <= args.index < len(dataset.records):
                raise ValueError(f"--index {args.index}: the {args.split} split has {len(dataset.records)} captions")
            record = dataset.records[args.index]
        image_id = str(record["image_id"])
        sample = Sample()
        dataset.attach_visual(sample, image_id)
        dataset.mvptr_text(record, sample)
        dataset.add_tags(sample)
        batch = SampleList([sample])
        batch.dataset_name, batch.dataset_type = "mvptr_captions", args.split
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    positions, scores, region_mask = grounding_scores(model, batch)
    if positions.numel() == 0:
        print(f"error: the caption has no phrase of the concept vocabulary: {record.get('text')!r}", file=sys.stderr)
        return 2
    phrase_words: List[str] = [" ".join(p) for p in record.get("phrases", [])]
    if len(phrase_words) < positions.numel():  # captions.jsonl without the "phrases" field
        phrase_words = [f"phrase {int(i)}" for i in record["phrase_ids"][: positions.numel()]]
    keep = region_mask.nonzero().view(-1)
    info = batch.image_info_0
    boxes = info["bbox"][0][keep].float().numpy()
    size = (int(info["image_width"][0]), int(info["image_height"][0]))
    names = list(dataset.object_names) if dataset.object_names else []
    objects = info["objects"][0][keep].tolist() if "objects" in info else [None] * keep.numel()
    labels = [f"region {int(k)}" + (f" ({names[int(o)]})" if o is not None and 0 <= int(o) < len(names) else "")
              for k, o in zip(keep.tolist(), objects)]
    folder = args.images or os.path.join(str(settings.data_dir), "images")
    picture = _read_picture(folder, image_id)
    values = scores[:, keep].numpy()
    title = f"{image_id}: {record.get('text', '')}"
    figure = draw_grounding(picture, size, boxes, phrase_words[: positions.numel()], values, top=args.top, title=title)
    write_picture(figure, args.out)
    if args.html:
        write_html(args.html, args.out, title, phrase_words[: positions.numel()], values, labels)
    print(json.dumps({"image_id": image_id, "caption": record.get("text"), "picture": args.out,
                      "phrases": {name: labels[int(np.argmax(row))] for name, row in
                                  zip(phrase_words[: positions.numel()], values)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
