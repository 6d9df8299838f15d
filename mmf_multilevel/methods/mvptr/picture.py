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

The computation (:func:`grounding_scores`; :func:`phrase_grounding` names its rows and regions) is apart from
the drawing (:func:`draw_grounding`) and from the files (``write_picture``: a temporary file renamed onto the path).
:func:`predictor_signal` computes the same scores for a query of :mod:`mmf_multilevel.predict` (the predictor's
sample, the text parsed into phrases as ``--caption`` parses it): ``Predictor.signal`` / ``mmf_ml_predict --signal``.
"""
import argparse
import base64
import html
import json
import math
import os
import sys
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["grounding_scores", "NoPhraseError", "PhraseGrounding", "phrase_grounding", "caption_batch", "draw_grounding",
           "write_html", "predictor_signal", "main"]


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


class NoPhraseError(ValueError):
    """The caption has no phrase of the concept vocabulary: there is no score row."""


class PhraseGrounding(NamedTuple):
    """:func:`grounding_scores` of one caption with its rows and its real regions named."""
    positions: torch.Tensor  # (P,) the phrase slots
    scores: torch.Tensor  # (P, K) every region slot
    region_mask: torch.Tensor  # (K,) the real regions
    names: List[str]  # (P,) the phrases' words
    values: np.ndarray  # (P, R) the scores of the R real regions
    boxes: np.ndarray  # (R, 4) their boxes, x1 y1 x2 y2 in the pixels of the region record's image
    size: Tuple[int, int]  # (width, height) of the region record's image
    labels: List[str]  # (R,) "region k (tag)"


def phrase_grounding(model, sample_list, record, object_names=None) -> PhraseGrounding:
    """:func:`grounding_scores` of the first pair of ``sample_list`` with its rows named by the caption ``record``'s
    ``phrases`` (``phrase <id>`` when the record lists none) and its real regions by their boxes and the class names
    ``object_names`` of their ``objects``; a :class:`NoPhraseError` when the caption has no phrase."""
    positions, scores, region_mask = grounding_scores(model, sample_list)
    if positions.numel() == 0:
        raise NoPhraseError(f"the caption has no phrase of the concept vocabulary: {record.get('text')!r}")
    positions, scores, region_mask = positions.cpu(), scores.cpu(), region_mask.cpu()
    names: List[str] = [" ".join(p) for p in record.get("phrases", [])]
    if len(names) < positions.numel():  # captions.jsonl without the "phrases" field
        names = [f"phrase {int(i)}" for i in record["phrase_ids"][: positions.numel()]]
    keep = region_mask.nonzero().view(-1)
    info = sample_list.image_info_0
    boxes = info["bbox"][0][keep].float().cpu().numpy()
    size = (int(info["image_width"][0]), int(info["image_height"][0]))
    classes = list(object_names) if object_names else []
    objects = info["objects"][0][keep].tolist() if "objects" in info else [None] * keep.numel()
    labels = [f"region {int(k)}" + (f" ({classes[int(o)]})" if o is not None and 0 <= int(o) < len(classes) else "")
              for k, o in zip(keep.tolist(), objects)]
    return PhraseGrounding(positions, scores, region_mask, names[: positions.numel()], scores[:, keep].numpy(), boxes,
                           size, labels)


def caption_batch(dataset, record, split: str):
    """The dataset's own sample of the caption ``record`` (a line of the concept tool's ``captions.jsonl``) with its
    image's regions and tags, collated as one batch: what ``--index`` and ``--caption`` score."""
    from mmf.common.sample import Sample, SampleList

    sample = Sample()
    dataset.attach_visual(sample, str(record["image_id"]))
    dataset.mvptr_text(record, sample)
    dataset.add_tags(sample)
    batch = SampleList([sample])
    batch.dataset_name, batch.dataset_type = dataset.dataset_name, split
    return batch


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
    from mmf_multilevel.files import write_bytes_atomically

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
    return write_bytes_atomically(path, page.encode("utf-8"))


def predictor_signal(predictor, image=None, text=None, image_id=None):
    """MVPTR's phrase-region scores of a query (paper §3.3, Eq. 2) for :mod:`mmf_multilevel.predict.signals`: ``text``
    parsed into phrase concepts as ``--caption`` parses a caption (:func:`~.concepts.parse_caption`: spaCy tuples
    looked up in ``model_config.mvptr.concepts``, word pieces of the dataset's tokenizer), laid out by the dataset's
    own code (``mvptr_text``) beside the query image's regions and tags (the predictor's sample), then
    :func:`phrase_grounding`. Boxes are mapped onto the query image (region methods' boxes, as ``align`` maps them)."""
    from mmf_multilevel.methods.mvptr.concepts import ConceptError, parse_caption, read_id2phrase
    from mmf_multilevel.predict.align import region_boxes
    from mmf_multilevel.predict.inputs import PredictInputError, checked_text
    from mmf_multilevel.predict.signals import Signal
    from mmf_multilevel.weak_corpus._util import RetrievalError

    text = checked_text(text, "text")
    dataset = predictor.dataset_name
    if not predictor._mvptr_layout:
        raise PredictInputError(f"dataset {dataset} does not lay out MVPTR's inputs (an mvptr_* dataset): the phrase-region "
                                "scores read its phrase slots")
    inputs = predictor.mvptr_inputs
    if not inputs.use_phrases:
        raise PredictInputError(f"dataset_config.{dataset}.use_phrases is false: the text has no phrase slot to score")
    concepts = predictor.config.model_config.mvptr.get("concepts")
    if not concepts:
        raise PredictInputError("model_config.mvptr.concepts is null: a text's phrases are looked up in the concept "
                                "vocabulary (the concept tool's id2phrase.json)")
    try:
        id2phrase = read_id2phrase(str(concepts), "model_config.mvptr.concepts")
        with predictor._stage("text"):
            from tokenizers import BertWordPieceTokenizer

            wordpiece = BertWordPieceTokenizer(dict(predictor.tokenizer.get_vocab()), lowercase=True)
            record = parse_caption(text, wordpiece, id2phrase)
    except (FileNotFoundError, ValueError, ConceptError, RetrievalError) as error:
        raise PredictInputError(str(error)) from None
    if not record["phrase_ids"]:
        raise PredictInputError(f"text {text!r}: none of its phrases (spaCy's object-attribute tuples) is in the concept "
                                f"vocabulary {concepts}: MVPTR scores phrases against regions")
    sample, query, _ = predictor._visual(image, image_id, "image")
    inputs.mvptr_text(record, sample)
    batch = predictor._batch([sample])
    with predictor._stage("model"):
        grounding = phrase_grounding(predictor.model, batch, record,
                                     inputs.object_names or predictor.region_source.object_names())
    size = tuple(query.picture.size) if query is not None else grounding.size
    picture = np.asarray(query.picture.convert("RGB"), dtype=np.uint8) if query is not None else None
    boxes = region_boxes(grounding.boxes, grounding.size[0], grounding.size[1], size)
    source = "phrase-region cosine of the multimodal outputs (MVPTR §3.3, Eq. 2)"

    def ranked(top):
        return [(name, [(int(k), float(row[k])) for k in np.argsort(-row, kind="stable")[:top]])
                for name, row in zip(grounding.names, grounding.values)]

    def table(top):
        rows = [[name if rank == 1 else "", rank, grounding.labels[k], f"{score:.4f}",
                 ", ".join(f"{v:.0f}" for v in boxes[k])]
                for name, best in ranked(top) for rank, (k, score) in enumerate(best, 1)]
        return ["phrase", "rank", "region", "cosine", "box (x1, y1, x2, y2)"], rows

    def summary(top):
        return {"method": predictor.method, "signal": source, "text": text, "phrases": [
            {"phrase": name, "top": [{"region": grounding.labels[k], "cosine": round(score, 6),
                                      "box": [round(float(v), 2) for v in boxes[k]]} for k, score in best]}
            for name, best in ranked(top)]}

    return Signal(predictor.method, source, text, (int(size[0]), int(size[1])),
                  {"positions": grounding.positions, "scores": grounding.scores, "region_mask": grounding.region_mask,
                   "record": record, "boxes": boxes, "labels": grounding.labels},
                  lambda top: draw_grounding(picture, size, boxes, grounding.names, grounding.values, top=top,
                                             title=f"{source}\n{text}"),
                  table, summary)


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
        batch = caption_batch(dataset, record, args.split)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        grounding = phrase_grounding(model, batch, record, dataset.object_names)
    except NoPhraseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = args.images or os.path.join(str(settings.data_dir), "images")
    picture = _read_picture(folder, image_id)
    title = f"{image_id}: {record.get('text', '')}"
    figure = draw_grounding(picture, grounding.size, grounding.boxes, grounding.names, grounding.values, top=args.top,
                            title=title)
    write_picture(figure, args.out)
    if args.html:
        write_html(args.html, args.out, title, grounding.names, grounding.values, grounding.labels)
    print(json.dumps({"image_id": image_id, "caption": record.get("text"), "picture": args.out,
                      "phrases": {name: grounding.labels[int(np.argmax(row))] for name, row in
                                  zip(grounding.names, grounding.values)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
