"""The tag↔phrase links of one weak-corpus record drawn over its image (paper §3.3.2): the image with every
region's box and tag, and beside each linked tag's box the noun phrases it is linked to, with the link score; the
record's retrieved sentences listed with each linked phrase highlighted in its tag's colour.

    python -m mmf_multilevel.weak_corpus picture --weak data/demo/weak.jsonl --image-id demo_000003 \\
        --features data/demo/features/regions.lmdb --images data/demo/images --out links.png --html links.html

``--image-id ID`` or ``--line N`` (1-based line of ``weak.jsonl``) picks the record. ``--features``: what the
corpus was built from (a region feature cache, with ``--object-vocab`` when its header names no classes, or a tags
jsonl with ``boxes``): the image's boxes, read as the builder read its tags; the tags must be the record's
``objects``, or the cache is not the one the corpus was built from. ``--images`` (a folder, zip or image LMDB,
:func:`~mmf_multilevel.images.sources.open_image_source`): the pixels; without it, or when it lacks the image, the
boxes are drawn on a blank canvas of the image's size.

A link (:func:`record_links`) is one region ``k`` and one retrieved sentence ``j`` with ``objects_cs_arg[k][j] >=
0``: the region's tag ``objects[k]`` is linked to the phrase ``noun_phrases[j][objects_cs_arg[k][j]]`` with the
score ``objects_cs[k][j]`` (``s / t`` for an SBERT cosine ``s`` above the builder's ``--link-threshold`` ``t``).
Regions with the same tag and the same links are drawn as one group (:func:`link_groups`): the builder links every
region of a tag alike. The computation is apart from the drawing (:func:`draw_links`, in the style and font of
:mod:`mmf_multilevel.predict.pictures`) and from the files (:func:`write_links`: PNG and a self-contained HTML page,
each through a temporary file and a rename).
"""
import argparse
import html
import json
import math
import os
import sys
import textwrap
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from mmf_multilevel.weak_corpus._util import Report, RetrievalError, progress

__all__ = ["Link", "LinkGroup", "Regions", "read_record", "record_links", "link_groups", "phrase_spans",
           "image_regions", "read_picture", "draw_links", "links_html", "write_links", "add_arguments", "run", "main"]

#: the record fields a link picture reads
LINK_FIELDS = ("image_id", "captions", "noun_phrases", "objects", "objects_cs", "objects_cs_arg")
#: the colours of the linked tags (matplotlib's categorical tab10, cycled)
TAG_COLOURS = "tab10"
#: characters of a sentence line in the picture's text panel
WRAP = 100


class Link(NamedTuple):
    """Region ``region``'s tag linked to phrase ``phrase_index`` of retrieved sentence ``caption``."""
    region: int
    tag: str
    caption: int
    phrase_index: int
    phrase: str
    score: float


class LinkGroup(NamedTuple):
    """Regions with the same tag and the same links (``links``: ``(caption, phrase_index, phrase, score)``)."""
    tag: str
    regions: List[int]
    links: List[Tuple[int, int, str, float]]


class Regions(NamedTuple):
    """An image's regions as the corpus was built from them."""
    tags: List[str]
    boxes: np.ndarray  # (N, 4) x1 y1 x2 y2 in the pixels of an image_w x image_h image (or normalised to [0, 1])
    size: Optional[Tuple[int, int]]  # (image_w, image_h), None when the tags jsonl has none
    source: str


# ---------------------------------------------------------------------------------------------- the record
def read_record(path: str, image_id=None, line: Optional[int] = None) -> Tuple[dict, int]:
    """``(record, line number)`` of ``weak.jsonl``: the record of ``image_id`` (compared as text) or the one on
    ``line`` (1-based). An error names the option and the file."""
    if (image_id is None) == (line is None):
        raise RetrievalError("give --image-id ID or --line N (the record's line in --weak), one of them")
    if not os.path.isfile(path):
        raise RetrievalError(f"--weak {path}: no such file (the builder's weak.jsonl)")
    if line is not None and (isinstance(line, bool) or not isinstance(line, int) or line < 1):
        raise RetrievalError(f"--line: expected a positive line number, got {line!r}")
    wanted = None if image_id is None else str(image_id)
    # a line without the id's text is not parsed (the id as the builder writes it: JSON, non-ASCII kept)
    needle = None if wanted is None else json.dumps(wanted, ensure_ascii=False)[1:-1].encode("utf-8")
    number = 0
    with open(path, "rb") as handle, progress(total=os.path.getsize(path), desc="read weak corpus", unit="B") as bar:
        for number, raw in enumerate(handle, 1):
            bar.update(len(raw))
            if line is not None and number != line:
                continue
            if needle is not None and needle not in raw:
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                if line is None:
                    continue  # another record's bad line is not this command's business
                raise RetrievalError(f"--weak {path} line {number}: not a JSON record ({error})") from None
            if not isinstance(record, dict):
                if line is None:
                    continue
                raise RetrievalError(f"--weak {path} line {number}: expected a JSON object, got {type(record).__name__}")
            if line is not None or str(record.get("image_id")) == wanted:
                return record, number
    if line is not None:
        raise RetrievalError(f"--line {line}: {path} has {number} lines")
    raise RetrievalError(f"--image-id {wanted}: no record of {path} has image_id {wanted!r}")


def _field(record, key, where):
    if key not in record:
        raise RetrievalError(f"{where}: the record has no '{key}'; expected a weak.jsonl record of the builder "
                             f"(fields {', '.join(LINK_FIELDS)})")
    return record[key]


def record_links(record: dict, where: str = "the record") -> List[Link]:
    """Every link of ``record`` (see the module docstring), region by region, sentence by sentence. A field of the
    wrong shape is an error naming it; a record without a link is an error too (nothing to draw)."""
    captions = _field(record, "captions", where)
    phrases = _field(record, "noun_phrases", where)
    objects = _field(record, "objects", where)
    scores = _field(record, "objects_cs", where)
    args = _field(record, "objects_cs_arg", where)
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise RetrievalError(f"{where}: 'captions' must be a list of sentences")
    if not isinstance(objects, list) or not all(isinstance(t, str) for t in objects):
        raise RetrievalError(f"{where}: 'objects' must be a list of tags (one per region)")
    count = len(captions)
    if not isinstance(phrases, list) or len(phrases) != count or not all(
            isinstance(p, list) and all(isinstance(x, str) for x in p) for p in phrases):
        raise RetrievalError(f"{where}: 'noun_phrases' must hold one list of phrases per caption ({count})")
    for key, table in (("objects_cs", scores), ("objects_cs_arg", args)):
        if not isinstance(table, list) or len(table) != len(objects) or not all(
                isinstance(row, list) and len(row) == count for row in table):
            raise RetrievalError(f"{where}: '{key}' must be {len(objects)} x {count} (a row per region of 'objects', a "
                                 "column per caption)")
    links = []
    for region, tag in enumerate(objects):
        for caption in range(count):
            index = args[region][caption]
            if isinstance(index, bool) or not isinstance(index, int):
                raise RetrievalError(f"{where}: objects_cs_arg[{region}][{caption}] must be an integer, got {index!r}")
            if index < 0:
                continue
            if index >= len(phrases[caption]):
                raise RetrievalError(f"{where}: objects_cs_arg[{region}][{caption}] = {index} but caption {caption} has "
                                     f"{len(phrases[caption])} noun phrases")
            links.append(Link(region, tag, caption, index, phrases[caption][index], float(scores[region][caption])))
    if not links:
        raise RetrievalError(f"{where}: image {record.get('image_id')!r} has no tag linked to a phrase (every "
                             "objects_cs_arg is -1): no link to draw (the builder's --link-threshold decides them)")
    return links


def link_groups(links: Sequence[Link]) -> List[LinkGroup]:
    """The links grouped by region: regions with the same tag and the same links form one group, in the order of
    their first region."""
    per_region: Dict[int, List[Link]] = {}
    for link in links:
        per_region.setdefault(link.region, []).append(link)
    groups: Dict[tuple, LinkGroup] = {}
    for region, own in per_region.items():
        key = (own[0].tag,) + tuple((link.caption, link.phrase_index, link.score) for link in own)
        if key not in groups:
            groups[key] = LinkGroup(own[0].tag, [], [(link.caption, link.phrase_index, link.phrase, link.score)
                                                     for link in own])
        groups[key].regions.append(region)
    return list(groups.values())


def phrase_spans(sentence: str, phrases: Sequence[str]) -> List[Optional[Tuple[int, int]]]:
    """The character span of each of ``phrases`` in ``sentence`` (spaCy's noun chunks: substrings in sentence
    order, not overlapping), each found after the one before; None for a phrase not found."""
    spans, start = [], 0
    for phrase in phrases:
        at = sentence.find(phrase, start)
        if at < 0:
            at = sentence.find(phrase)
            spans.append(None if at < 0 else (at, at + len(phrase)))
            continue
        spans.append((at, at + len(phrase)))
        start = at + len(phrase)
    return spans


# ---------------------------------------------------------------------------------------------- regions, pixels
def image_regions(features: str, image_id, object_vocab: Optional[str] = None) -> Regions:
    """The regions of ``image_id`` in ``features`` (what the corpus was built from), read as the builder reads
    them (:func:`~mmf_multilevel.weak_corpus.inputs.cache_image`, or the tags jsonl's line)."""
    from mmf_multilevel.weak_corpus.inputs import (
        _is_feature_cache,
        _iter_tags_jsonl,
        cache_image,
        cache_object_names,
        read_object_vocab,
    )

    if not os.path.exists(features):
        raise RetrievalError(f"--features {features}: no such file or directory (the region cache or tags jsonl the "
                             "corpus was built from)")
    key = str(image_id)
    names = read_object_vocab(object_vocab) if object_vocab else None
    if _is_feature_cache(features):
        from mmf_multilevel.features import FeatureCacheReader

        with FeatureCacheReader(features) as reader:
            if key not in reader:
                raise RetrievalError(f"--features {features}: the region cache has no image {key!r}; give the cache the "
                                     "corpus was built from")
            rec = cache_image(reader, key, cache_object_names(reader, features, names), f"{features}[{key}]")
        if rec is None:
            raise RetrievalError(f"--features {features}: image {key!r} has no class ids ('objects' or 'cls_prob'): the "
                                 "builder took no tags from it")
        size = None if rec.get("image_w") is None else (int(rec["image_w"]), int(rec["image_h"]))
    else:
        for rec in _iter_tags_jsonl(features, Report(quiet=True)):
            if str(rec["image_id"]) == key:
                break
        else:
            raise RetrievalError(f"--features {features}: the tags jsonl has no image {key!r}; give the file the corpus "
                                 "was built from")
        size = (int(rec["image_w"]), int(rec["image_h"])) if "image_w" in rec and "image_h" in rec else None
    if rec.get("boxes") is None:
        raise RetrievalError(f"--features {features}: image {key!r} has no boxes (one per tag): the picture draws each "
                             "tag's box")
    return Regions(list(rec["tags"]), np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4), size, features)


def read_picture(images: Optional[str], image_id) -> Tuple[Optional[np.ndarray], str]:
    """``(H x W x 3 uint8 pixels or None, a note)``: the image from the image source ``images`` (a folder, zip or
    image LMDB); None with the reason when no source is given or it lacks the image."""
    if images is None:
        return None, "no --images: a blank canvas of the image's size"
    from mmf_multilevel.images.sources import ImageSourceError, open_image_source

    if not os.path.exists(images):
        raise RetrievalError(f"--images {images}: no such folder or file (a folder, zip or LMDB of images)")
    try:
        source = open_image_source(images)
        if str(image_id) not in source:
            return None, f"{images} has no image {str(image_id)!r}: a blank canvas of the image's size"
        picture = source.get(str(image_id))
    except ImageSourceError as error:
        raise RetrievalError(f"--images {error}") from None
    return np.asarray(picture.convert("RGB"), dtype=np.uint8), f"pixels from {images}"


def _check(record: dict, regions: Regions, where: str) -> None:
    if list(record["objects"]) != regions.tags:
        raise RetrievalError(f"{where}: the record's objects {record['objects']!r:.120} are not the tags "
                             f"{regions.tags!r:.120} {regions.source} gives image {str(record['image_id'])!r}: give "
                             "the --features (and --object-vocab) the corpus was built from")


# ---------------------------------------------------------------------------------------------- drawing
def _colours(groups: Sequence[LinkGroup]) -> Dict[str, tuple]:
    from matplotlib import colormaps

    table = colormaps[TAG_COLOURS].colors
    tags = list(dict.fromkeys(group.tag for group in groups))
    return {tag: tuple(table[n % len(table)][:3]) for n, tag in enumerate(tags)}


def _rich_line(axes, x, y, pieces, fontsize):
    """One line of ``(text, colour or None)`` pieces, each after the one before; coloured pieces highlighted."""
    from mmf_multilevel.predict.pictures import FONT, draw_text

    previous = None
    for text, colour in pieces:
        box = {"facecolor": colour, "alpha": 0.45, "pad": 0.6, "linewidth": 0} if colour is not None else None
        if previous is None:
            previous = draw_text(axes, x, y, text, transform=axes.transAxes, fontsize=fontsize, va="bottom", bbox=box)
        else:
            previous = axes.annotate(text, xy=(1, 0), xycoords=previous, va="bottom", fontsize=fontsize,
                                     fontfamily=FONT, annotation_clip=False, bbox=box)


def _sentence_lines(sentence: str, marks: Sequence[Tuple[int, int, tuple]]) -> List[List[Tuple[str, Optional[tuple]]]]:
    """``sentence`` wrapped at :data:`WRAP` characters into lines of ``(text, colour)`` pieces: the characters in
    ``marks`` (``(start, end, colour)``) coloured."""
    colour_at: List[Optional[tuple]] = [None] * len(sentence)
    for start, end, colour in marks:
        for i in range(start, end):
            colour_at[i] = colour_at[i] or colour
    lines, start = [], 0
    for part in textwrap.wrap(sentence, WRAP, break_long_words=True, drop_whitespace=False) or [""]:
        at = sentence.find(part, start)
        at = start if at < 0 else at
        pieces: List[Tuple[str, Optional[tuple]]] = []
        for i, char in enumerate(part):
            colour = colour_at[at + i] if at + i < len(colour_at) else None
            if pieces and pieces[-1][1] == colour:
                pieces[-1] = (pieces[-1][0] + char, colour)
            else:
                pieces.append((char, colour))
        lines.append(pieces)
        start = at + len(part)
    return lines


def draw_links(record: dict, groups: Sequence[LinkGroup], boxes: np.ndarray, size: Tuple[int, int],
               picture: Optional[np.ndarray] = None, note: str = "", panel_inches: float = 5.0, dpi: int = 100):
    """The figure: on the left the image (``picture``; None: a blank canvas of ``size`` = (width, height)) with every
    region's box (``boxes`` in its pixels) and ``k: tag``, linked tags' boxes thick in the tag's colour and the first
    box of each group labelled with its links (``→ phrase  score  [S j]``); on the right the retrieved sentences
    (``S 1`` ..) with each linked phrase highlighted in its tag's colour and the links listed under it.
    ``figure.axes[0]`` is the image (data coordinates: its pixels), ``figure.axes[1]`` the sentences."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from mmf_multilevel.predict.pictures import CANVAS, FONT, draw_text

    width, height = (int(n) for n in size)
    colours = _colours(groups)
    captions, phrases = record["captions"], record["noun_phrases"]
    lines: List[Tuple[str, object]] = []  # ("title" | "sentence" | "link" | "gap", payload)
    for j, sentence in enumerate(captions):
        spans = phrase_spans(sentence, phrases[j])
        marks, listed = [], []
        for group in groups:
            for caption, index, phrase, score in group.links:
                if caption == j:
                    if spans[index] is not None:
                        marks.append((*spans[index], colours[group.tag]))
                    listed.append((group, phrase, score))
        scores = record.get("retrieval_scores")
        shown = f"  (retrieval {float(scores[j]):.3f})" if isinstance(scores, list) and j < len(scores) else ""
        lines.append(("title", f"S {j + 1}{shown}"))
        lines.extend(("sentence", pieces) for pieces in _sentence_lines(sentence, marks))
        for group, phrase, score in listed:
            regions = ", ".join(str(k) for k in group.regions)
            lines.append(("link", (f"{group.tag} (region{'s' if len(group.regions) > 1 else ''} {regions}) → "
                                   f"“{phrase}”  {score:.3f}", colours[group.tag])))
        lines.append(("gap", None))
    aspect = height / max(width, 1)
    image_w, image_h = (panel_inches, panel_inches * aspect) if aspect <= 1 else (panel_inches / aspect, panel_inches)
    text_w, line_h, gap, top_band = 6.6, 0.19, 0.2, 0.75
    text_h = max(1.0, line_h * len(lines))
    figure_w = gap + image_w + gap + text_w + gap
    figure_h = top_band + max(image_h, text_h) + gap
    figure = Figure(figsize=(figure_w, figure_h), dpi=dpi)
    FigureCanvasAgg(figure)
    bottom = figure_h - top_band
    axes = figure.add_axes([gap / figure_w, (bottom - image_h) / figure_h, image_w / figure_w, image_h / figure_h])
    axes.imshow(picture if picture is not None else np.full((height, width, 3), CANVAS, dtype=np.uint8),
                extent=(0, width, height, 0), interpolation="antialiased")
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    linked = {k: group for group in groups for k in group.regions}
    labelled = {group.regions[0] for group in groups}
    order = [k for k in range(len(boxes)) if k not in linked] + [k for k in range(len(boxes)) if k in linked]
    for k in order:  # the linked boxes drawn last, on top
        x1, y1, x2, y2 = boxes[k]
        tag = record["objects"][k]
        if k in linked:
            colour = colours[tag]
            axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.5))
            label = f"{k}: {tag}"
            if k in labelled:
                label += "".join(f"\n→ {phrase}  {score:.2f}  [S {caption + 1}]"
                                 for caption, _, phrase, score in linked[k].links)
            draw_text(axes, x1 + 1, y1 + 1, label, color="black", fontsize=7, va="top",
                      bbox={"facecolor": "white", "alpha": 0.8, "pad": 1, "edgecolor": colour, "linewidth": 1})
        else:
            axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=0.8,
                                     linestyle="--"))
            draw_text(axes, x1 + 1, y1 + 1, f"{k}: {tag}", color="white", fontsize=7, va="top",
                      bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    text_axes = figure.add_axes([(2 * gap + image_w) / figure_w, (bottom - text_h) / figure_h, text_w / figure_w,
                                 text_h / figure_h])
    text_axes.set_axis_off()
    for row, (kind, payload) in enumerate(lines):
        y = 1.0 - (row + 1) / len(lines)
        if kind == "title":
            draw_text(text_axes, 0.0, y, payload, transform=text_axes.transAxes, fontsize=8, fontweight="bold",
                      va="bottom")
        elif kind == "sentence":
            _rich_line(text_axes, 0.02, y, payload, 8)
        elif kind == "link":
            words, colour = payload
            draw_text(text_axes, 0.05, y, words, transform=text_axes.transAxes, fontsize=7.5, color="black",
                      va="bottom", bbox={"facecolor": colour, "alpha": 0.25, "pad": 0.6, "linewidth": 0})
    count = sum(len(group.links) * len(group.regions) for group in groups)
    figure.suptitle(f"μ-VLA weak corpus: image {record['image_id']}, {count} tag↔phrase link{'s' * (count != 1)} "
                    f"(paper §3.3.2)\nquery: {record.get('query', '')}" + (f"\n{note}" if note else ""),
                    fontsize=9, fontfamily=FONT, parse_math=False, y=1 - 0.08 / figure_h,
                    va="top")
    return figure


def links_html(record: dict, groups: Sequence[LinkGroup], png: bytes, where: str, note: str = "") -> str:
    """A self-contained page (:func:`mmf_multilevel.predict.pictures.html_page`): the picture and one row per link
    group and sentence: the tag, its regions, the sentence with the phrase marked, the phrase and the score."""
    from mmf_multilevel.predict.pictures import html_page

    escape = html.escape
    colours = _colours(groups)
    rows = []
    for group in groups:
        colour = "#%02x%02x%02x" % tuple(int(round(255 * c)) for c in colours[group.tag])
        for caption, index, phrase, score in group.links:
            sentence = record["captions"][caption]
            span = phrase_spans(sentence, record["noun_phrases"][caption])[index]
            if span is None:
                marked = escape(sentence)
            else:
                a, b = span
                marked = (f"{escape(sentence[:a])}<mark style=\"background: {colour}66\">{escape(sentence[a:b])}</mark>"
                          f"{escape(sentence[b:])}")
            rows.append([f'<span style="border-left: 6px solid {colour}; padding-left: 4px">{escape(group.tag)}</span>',
                         escape(", ".join(str(k) for k in group.regions)), str(caption + 1), marked, escape(phrase),
                         f"{score:.4f}"])
    intro = (f"Image <b>{escape(str(record['image_id']))}</b> ({escape(where)}); query: <i>{escape(str(record.get('query', '')))}"
             f"</i>; {len(record['captions'])} retrieved sentences. A link: a region's tag and the noun phrase of a "
             "retrieved sentence whose SBERT cosine passed the builder's threshold t; its score is cosine / t "
             "(<code>objects_cs</code>), the phrase <code>noun_phrases[j][objects_cs_arg[k][j]]</code>."
             + (f"<br>{escape(note)}." if note else ""))
    return html_page(f"weak corpus links: {record['image_id']}", "μ-VLA weak corpus: tag↔phrase links", intro, png,
                     "the image's regions and their tags' linked phrases",
                     ["tag", "regions", "sentence", "the sentence, the phrase marked", "phrase", "score"], rows,
                     right_aligned=(3, 6))


def write_links(weak: str, features: str, png_path: str, html_path: Optional[str] = None, image_id=None,
                line: Optional[int] = None, images: Optional[str] = None, object_vocab: Optional[str] = None,
                dpi: int = 100) -> dict:
    """The link picture of one record of ``weak`` (:func:`read_record`) to ``png_path`` and, when given, its page to
    ``html_path``; returns ``{"image_id", "line", "picture", "html", "links"}`` (the links as dicts)."""
    from mmf_multilevel.predict.align import region_boxes
    from mmf_multilevel.predict.inputs import PredictInputError
    from mmf_multilevel.predict.pictures import check_paths, figure_png, write_picture_files

    try:
        check_paths(png_path, html_path)
    except PredictInputError as error:
        raise RetrievalError(f"--out / --html: {error}") from None
    record, number = read_record(weak, image_id, line)
    where = f"{weak} line {number}"
    links = record_links(record, where)
    regions = image_regions(features, record["image_id"], object_vocab)
    _check(record, regions, where)
    picture, note = read_picture(images, record["image_id"])
    size = regions.size
    if picture is not None:
        found = (picture.shape[1], picture.shape[0])
        if size is not None and tuple(size) != found:
            raise RetrievalError(f"--images: image {str(record['image_id'])!r} is {found[0]}x{found[1]} px but "
                                 f"{features} has it {size[0]}x{size[1]}: not the same image")
        size = found
    if size is None:  # a tags jsonl without the image's size, no pixels: the boxes' extent
        size = (max(1, math.ceil(float(regions.boxes[:, 2].max()))), max(1, math.ceil(float(regions.boxes[:, 3].max()))))
    boxes = region_boxes(regions.boxes, size[0], size[1], size)
    groups = link_groups(links)
    png = figure_png(draw_links(record, groups, boxes, size, picture, note, dpi=dpi), dpi)
    page = links_html(record, groups, png, where, note) if html_path is not None else None
    paths = write_picture_files(png_path, png, html_path, page)
    return {"image_id": record["image_id"], "line": number, **paths, "links": [link._asdict() for link in links]}


# ---------------------------------------------------------------------------------------------- command
def add_arguments(parser) -> None:
    """The options of ``python -m mmf_multilevel.weak_corpus picture`` (and of this module's command)."""
    parser.add_argument("--weak", required=True, help="the builder's weak.jsonl")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--image-id", default=None, help="the record of this image")
    which.add_argument("--line", type=int, default=None, help="the record on this line of --weak (1-based)")
    parser.add_argument("--features", required=True,
                        help="the region cache (or tags jsonl with boxes) the corpus was built from")
    parser.add_argument("--object-vocab", default=None,
                        help="class names of a region cache whose header names none (as given to the builder)")
    parser.add_argument("--images", default=None,
                        help="the images (a folder, zip or image LMDB; default: a blank canvas of the image's size)")
    parser.add_argument("--out", required=True, help="the picture (.png)")
    parser.add_argument("--html", default=None, help="also a self-contained page (.html)")


def run(args) -> int:
    """The command on parsed ``args``: the JSON summary on stdout; exit status 2 with the message for bad input."""
    try:
        result = write_links(args.weak, args.features, args.out, args.html, image_id=args.image_id, line=args.line,
                             images=args.images, object_vocab=args.object_vocab)
    except RetrievalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.weak_corpus.picture",
                                     description="Draw one weak-corpus record's tag-phrase links over its image.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
