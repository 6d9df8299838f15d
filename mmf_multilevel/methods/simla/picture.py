"""Alignment pictures: Grad-CAM heat maps of SIMLA's ITM match score over an image, one per expression and one per
word (paper §3.5 and its Figure 3: "we visualize the Grad-CAM to show the grounding and fine-grained alignment
ability of the model").

    python -m mmf_multilevel.methods.simla.picture --config projects/simla/demo/refcoco_plus_weak.yaml \\
        --checkpoint save/simla_refcoco/simla_final.pth --image data/demo/images/demo_000000.jpg \\
        --text "the green circle" --text "the circle on the right" --out pictures/ env.data_dir=$PWD/data

For each ``--text`` (an expression), :func:`~mmf_multilevel.methods.simla.grounding.itm_gradcam` on the
cross-attention of ``model_config.simla.gradcam_layer`` (or ``--layer``) gives one map per text token; their
average over the real tokens ([CLS], the word pieces, [SEP]) is the expression's map, the one the grounding
evaluation scores boxes with. ``expression_<i>.png`` draws it over the image (bicubically resized to the
image's pixels, :func:`~mmf_multilevel.methods.simla.grounding.image_heatmap`); ``expression_<i>_word_<j>_<word>.png``
draws each word's own map (its word pieces' rows averaged; [CLS] and [SEP] are units of their own), so the
expression's map is the average of the word maps weighted by their piece counts (:func:`word_units`).
``index.html`` shows them all with the ITM match logit; ``summary.json`` lists the files. With
``--regions`` (a region cache, as ``refcoco_plus_images`` reads its proposals from) and ``--image-id``, the
image's proposals are drawn on the expression pictures, the best-scoring one (``Σ map / area^0.5``, the
grounding evaluation's choice) thick. The image and the texts go through the config's first dataset's
processors (its evaluation pipeline), as in evaluation.
"""
import argparse
import html
import json
import os
import re
import sys
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from mmf_multilevel.methods.simla.grounding import box_scores, image_heatmap, itm_gradcam

__all__ = ["PictureError", "WordUnit", "word_units", "word_maps", "alignment_maps", "draw_heatmap", "draw_heatmaps",
           "write_page", "predictor_signal", "main"]

SPECIAL_TOKENS = ("[CLS]", "[SEP]")


class PictureError(ValueError):
    """Bad input to the picture command; the message names the argument or file."""


class WordUnit(NamedTuple):
    """One word of an expression: its text and the token positions of its word pieces."""
    label: str
    positions: List[int]


def word_units(tokens: Sequence[str]) -> List[WordUnit]:
    """The tokenizer's ``tokens`` ([CLS] word pieces [SEP]) grouped into words: a ``##`` piece joins the word
    before it; [CLS] and [SEP] are units of their own."""
    units: List[WordUnit] = []
    for position, token in enumerate(tokens):
        if token.startswith("##") and units and units[-1].label not in SPECIAL_TOKENS:
            units[-1] = WordUnit(units[-1].label + token[2:], units[-1].positions + [position])
        else:
            units.append(WordUnit(token, [position]))
    return units


def word_maps(token_maps: torch.Tensor, units: Sequence[WordUnit]) -> torch.Tensor:
    """``(U, gh, gw)``: each unit's map, the mean of its word pieces' rows of ``token_maps`` ``(L, gh, gw)``."""
    return torch.stack([token_maps[unit.positions].mean(dim=0) for unit in units])


class AlignmentMaps(NamedTuple):
    expression: str
    units: List[WordUnit]
    expression_map: torch.Tensor  # (gh, gw)
    unit_maps: torch.Tensor  # (U, gh, gw)
    match_logit: float


@torch.no_grad()
def alignment_maps(model, pixels: torch.Tensor, texts: Sequence[dict], layer: Optional[int] = None
                   ) -> List[AlignmentMaps]:
    """Grad-CAM of ``model`` (a ``simla`` model) for each processed text of ``texts`` (the text processor's
    outputs: ``input_ids``, ``input_mask``, ``tokens``) over one processed image ``pixels`` ``(1, 3, H, W)``."""
    encoder = model.backbone.image_encoder
    layer = int(model.settings.gradcam_layer if layer is None else layer)
    ids = torch.stack([t["input_ids"] for t in texts]).to(pixels.device)
    mask = torch.stack([t["input_mask"] for t in texts]).to(pixels.device)
    image = encoder(pixels).expand(len(texts), -1, -1)
    cam = itm_gradcam(model.backbone.text_encoder, model.heads.itm_head, image, ids, mask, layer, encoder.grid_size)
    out = []
    for i, text in enumerate(texts):
        units = word_units(text["tokens"])
        out.append(AlignmentMaps(text["text"], units, cam.maps[i].cpu(), word_maps(cam.token_maps[i].cpu(), units),
                                 float(cam.match_logits[i])))
    return out


def draw_heatmap(picture: np.ndarray, heat: np.ndarray, title: str, boxes: Optional[np.ndarray] = None,
                 chosen: Optional[int] = None, inches: float = 5.0):
    """A matplotlib figure: ``picture`` (``H x W x 3``) under ``heat`` (``H x W``, the same pixels) in a
    colour map, ``boxes`` (``x1 y1 x2 y2``) drawn thin and box ``chosen`` thick."""
    from matplotlib.figure import Figure

    height, width = picture.shape[:2]
    figure = Figure(figsize=(inches, inches * height / max(width, 1) + 0.5))
    axes = figure.add_subplot(1, 1, 1)
    figure.colorbar(_heatmap_panel(axes, picture, heat, title, boxes, chosen), ax=axes, shrink=0.7, label="Grad-CAM")
    return figure


def _heatmap_panel(axes, picture, heat, title, boxes=None, chosen=None):
    """One panel of :func:`draw_heatmap` / :func:`draw_heatmaps`; returns the heat map's image (for a colour bar)."""
    import matplotlib
    from matplotlib.patches import Rectangle

    axes.imshow(picture)
    shown = axes.imshow(heat, cmap=matplotlib.colormaps["jet"], alpha=0.5, vmin=0.0,
                        vmax=max(float(heat.max()), 1e-12))
    if boxes is not None:
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white" if k != chosen else "lime",
                                     linewidth=3.0 if k == chosen else 0.8))
    axes.set_title(title, fontsize=9)
    axes.set_xticks([])
    axes.set_yticks([])
    return shown


def draw_heatmaps(picture: np.ndarray, heats: Sequence[np.ndarray], titles: Sequence[str], columns: int = 4,
                  inches: float = 3.2, title: str = ""):
    """:func:`draw_heatmap`'s panels side by side in one figure, ``columns`` a row: panel ``i`` (``figure.axes[i]``)
    is ``heats[i]`` over ``picture``, each with its own colour scale (0 to its maximum, as one picture each)."""
    import math

    from matplotlib.figure import Figure

    if len(heats) != len(titles) or not len(heats):
        raise ValueError(f"draw_heatmaps needs one title per map and at least one map, got {len(heats)} maps and "
                         f"{len(titles)} titles")
    height, width = picture.shape[:2]
    columns = max(1, min(int(columns), len(heats)))
    rows = math.ceil(len(heats) / columns)
    figure = Figure(figsize=(inches * columns, (inches * height / max(width, 1) + 0.4) * rows + 0.6))
    for index, (heat, name) in enumerate(zip(heats, titles)):
        _heatmap_panel(figure.add_subplot(rows, columns, index + 1), picture, heat, name)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def write_page(path: str, title: str, sections: Sequence[dict]) -> str:
    """``index.html``: per expression its picture and its words' pictures (files beside the page)."""
    from mmf_multilevel.files import write_bytes_atomically

    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section['expression'])}</h2><p>ITM match logit "
                     f"{section['match_logit']:.3f}" + (f"; chosen proposal {section['chosen']}" if
                                                       section.get("chosen") is not None else "") + "</p>")
        parts.append(f"<img src='{html.escape(section['picture'])}' style='max-width:48%'><div>")
        for word in section["words"]:
            parts.append(f"<figure style='display:inline-block;width:23%;margin:2px'><img src='"
                         f"{html.escape(word['picture'])}' style='width:100%'><figcaption>"
                         f"{html.escape(word['word'])}</figcaption></figure>")
        parts.append("</div>")
    return write_bytes_atomically(path, "".join(parts).encode("utf-8"))


def predictor_signal(predictor, image=None, text=None, image_id=None):
    """SIMLA's Grad-CAM of the ITM match score (paper §3.5) of a query for :mod:`mmf_multilevel.predict.signals`:
    :func:`alignment_maps` on the predictor's sample (the image through the dataset's evaluation pipeline, the text
    through its text processor) on the cross-attention of ``model_config.simla.gradcam_layer``; the expression's map
    and each word's (:func:`word_units`: [CLS] and [SEP] are units of their own) over the query image
    (:func:`~mmf_multilevel.methods.simla.grounding.image_heatmap`), drawn by :func:`draw_heatmaps`."""
    from mmf_multilevel.methods.simla.grounding import check_gradcam_layer
    from mmf_multilevel.predict.inputs import PredictInputError, checked_text
    from mmf_multilevel.predict.signals import Signal

    model = predictor.model
    if getattr(getattr(model, "heads", None), "itm_head", None) is None:
        raise PredictInputError(f"SIMLA's Grad-CAM is that of its ITM head, which a {model.head_type!r} model does not "
                                "have: give a simla model with training_head_type pretraining, retrieval or grounding "
                                "(--picture draws any model's attention)")
    text = checked_text(text, "text")
    layer = int(model.settings.gradcam_layer)
    try:
        check_gradcam_layer(layer, model.backbone.text_encoder.num_layers)
    except ValueError as error:
        raise PredictInputError(str(error)) from None
    sample, query, _ = predictor._visual(image, image_id, "image")
    fields = predictor.text_fields(text)
    count = int(fields["input_mask"].sum())
    tokens = predictor.tokenizer.convert_ids_to_tokens(fields["input_ids"][:count].tolist())
    batch = predictor._batch([sample])
    pixels = batch.image.float()
    with predictor._stage("model"):
        (maps,) = alignment_maps(model, pixels, [dict(fields, tokens=tokens, text=text)], layer)
    width, height = query.picture.size
    content = [int(n) for n in sample.image_size]
    heats = [image_heatmap(grid, pixels.shape[-2:], content, (height, width)).numpy()
             for grid in [maps.expression_map, *maps.unit_maps]]
    picture = np.asarray(query.picture.convert("RGB"), dtype=np.uint8)
    titles = [f"the expression (ITM match logit {maps.match_logit:.2f})"] + [
        unit.label if len(unit.positions) == 1 else f"{unit.label} ({len(unit.positions)} pieces)" for unit in maps.units]
    source = f"Grad-CAM of the ITM match score on the cross-attention of layer {layer} (SIMLA §3.5)"

    def peak(heat):
        row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
        return [int(column), int(row)]

    def table(top):
        rows = [[name, f"{float(heat.max()):.3g}", ", ".join(str(v) for v in peak(heat))]
                for name, heat in zip(["(expression)"] + [unit.label for unit in maps.units], heats)]
        return ["word", "largest Grad-CAM", "at pixel (x, y)"], rows

    def summary(top):
        return {"method": predictor.method, "signal": source, "text": text, "layer": layer,
                "match_logit": round(maps.match_logit, 6), "expression": {"max": float(heats[0].max()), "peak": peak(heats[0])},
                "words": [{"word": unit.label, "pieces": len(unit.positions), "max": float(heat.max()), "peak": peak(heat)}
                          for unit, heat in zip(maps.units, heats[1:])]}

    return Signal(predictor.method, source, text, (int(width), int(height)),
                  {"maps": maps, "heats": heats, "layer": layer},
                  lambda top: draw_heatmaps(picture, heats, titles, title=f"{source}\n{text}"), table, summary)


def _slug(word: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", word.lower()) or "token"


def _read_image(path: str):
    from mmf_multilevel.images.sources import ImageDecodeError, decode_image

    if not os.path.isfile(path):
        raise PictureError(f"--image {path}: no such file")
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return decode_image(data, path)
    except ImageDecodeError as error:
        raise PictureError(f"--image {error}") from None


def _processors(config):
    from mmf.datasets.processors.processors import Processor

    names = [name.strip() for name in str(config.get("datasets") or "").split(",") if name.strip()]
    if not names or names[0] not in config.get("dataset_config", {}):
        raise PictureError(f"the config's datasets ({config.get('datasets')!r}) name no dataset_config section: the "
                           "picture takes the text and image processors from it")
    processors = config.dataset_config[names[0]].get("processors") or {}
    for key in ("text_processor", "image_processor"):
        if key not in processors:
            raise PictureError(f"dataset_config.{names[0]}.processors has no {key}")
    return Processor(processors.text_processor), Processor(processors.image_processor)


def _proposals(path: str, image_id: Optional[str], size):
    from mmf_multilevel.features.reader import FeatureCacheReader

    if not image_id:
        raise PictureError("--regions needs --image-id (the image's key in the region cache)")
    if not os.path.exists(path):
        raise PictureError(f"--regions {path}: no such region cache")
    with FeatureCacheReader(path) as reader:
        if image_id not in reader:
            raise PictureError(f"--image-id {image_id!r} is not in the region cache {path}")
        record = reader.get(image_id)
    width, height = int(record["image_w"]), int(record["image_h"])
    if (height, width) != tuple(size):
        raise PictureError(f"--regions: image {image_id!r} is {width}x{height} in the region cache, the --image is "
                           f"{size[1]}x{size[0]}: the boxes would not fit the picture")
    return np.asarray(record["boxes"], dtype=np.float32)[: int(record.get("num_boxes", len(record["boxes"])))]


def _parser():
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.methods.simla.picture",
                                     description="Grad-CAM heat maps of SIMLA's ITM score per expression and per word.")
    parser.add_argument("--config", required=True, help="a simla project (its first dataset's processors are used)")
    parser.add_argument("--checkpoint", required=True, help="the model's weights (.pth / .ckpt)")
    parser.add_argument("--image", required=True, help="an image file")
    parser.add_argument("--text", action="append", required=True, help="an expression (repeat for several)")
    parser.add_argument("--out", required=True, help="the folder for the PNGs, index.html and summary.json")
    parser.add_argument("--layer", type=int, default=None, help="the cross-attention layer (default: gradcam_layer)")
    parser.add_argument("--regions", default=None, help="a region cache with the image's proposals (optional)")
    parser.add_argument("--image-id", default=None, help="with --regions: the image's key in the cache")
    parser.add_argument("opts", nargs="*", help="config overrides, as for mmf_run (env.data_dir=...)")
    return parser


def main(argv=None) -> int:
    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.files import write_bytes_atomically, write_picture
    from mmf_multilevel.methods.base import load_method_model
    from mmf_multilevel.methods.simla.grounding import check_gradcam_layer

    args = _parser().parse_args(argv)
    try:
        empty = [i for i, text in enumerate(args.text) if not text.strip()]
        if empty:
            raise PictureError(f"--text number {empty[0] + 1} is empty: give a non-empty expression")
        picture = _read_image(args.image)
        config = load_run_config(args.config, args.opts)
        text_processor, image_processor = _processors(config)
        model = load_method_model(config, "simla", args.checkpoint)
        layer = int(model.settings.gradcam_layer if args.layer is None else args.layer)
        check_gradcam_layer(layer, model.backbone.text_encoder.num_layers)
        size = (picture.height, picture.width)
        boxes = _proposals(args.regions, args.image_id, size) if args.regions else None
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    processed = image_processor({"image": picture, "train": False})
    pixels = processed["image"].unsqueeze(0).float()
    content = processed.get("image_size", torch.tensor(pixels.shape[-2:])).tolist()
    texts = [dict(text_processor({"text": text}), text=text) for text in args.text]
    results = alignment_maps(model, pixels, texts, layer)
    array = np.asarray(picture)
    sections = []
    for i, result in enumerate(results):
        heat = image_heatmap(result.expression_map, pixels.shape[-2:], content, size)
        chosen = None
        if boxes is not None and len(boxes):
            chosen = int(box_scores(heat, torch.from_numpy(boxes)).argmax())
        name = f"expression_{i}.png"
        title = f"{result.expression} (ITM match logit {result.match_logit:.2f}, layer {layer})"
        write_picture(draw_heatmap(array, heat.numpy(), title, boxes, chosen), os.path.join(args.out, name))
        words = []
        for j, (unit, unit_map) in enumerate(zip(result.units, result.unit_maps)):
            word_heat = image_heatmap(unit_map, pixels.shape[-2:], content, size)
            word_name = f"expression_{i}_word_{j:02d}_{_slug(unit.label)}.png"
            write_picture(draw_heatmap(array, word_heat.numpy(), f"{unit.label} in '{result.expression}'"),
                          os.path.join(args.out, word_name))
            words.append({"word": unit.label, "pieces": len(unit.positions), "picture": word_name})
        sections.append({"expression": result.expression, "match_logit": result.match_logit, "picture": name,
                         "words": words, "chosen": chosen,
                         "chosen_box": None if chosen is None else [float(v) for v in boxes[chosen]]})
    page = write_page(os.path.join(args.out, "index.html"), f"SIMLA Grad-CAM: {os.path.basename(args.image)}",
                      sections)
    summary = {"image": args.image, "layer": layer, "page": page, "expressions": sections}
    write_bytes_atomically(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1).encode("utf-8"))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
