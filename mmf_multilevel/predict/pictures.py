"""Pictures of an :class:`~mmf_multilevel.predict.align.Alignment` (what :meth:`Predictor.align
<mmf_multilevel.predict.predictor.Predictor.align>` returns).

:func:`draw_alignment` makes a matplotlib figure (the ``Figure`` API on an Agg canvas, no pyplot state, DejaVu
Sans): a first panel with the whole image and every visual unit's box (region methods: the detected boxes with
their tags), then one panel per word (word pieces merged, a word's weights the mean of its pieces' rows) with the
``top`` units it attends to most, their boxes coloured by weight on the figure's colour bar (spanning the
weights shown, lowest to highest) and labelled with it.

:func:`write_alignment` writes the PNG and, when asked, a self-contained HTML page (the PNG inlined as base64, a
table of each word's top units and weights, every text HTML-escaped, no external reference), each through a
temporary file in the same folder and a rename, so an error never leaves a half-written file.
"""
import base64
import html
import io
import math
import os
from typing import Dict, Optional

import numpy as np

from mmf_multilevel.files import write_bytes_atomically
from mmf_multilevel.predict.align import Alignment
from mmf_multilevel.predict.inputs import PredictInputError

__all__ = ["FONT", "COLORMAP", "draw_alignment", "alignment_html", "write_alignment", "check_paths", "draw_text",
           "html_page", "figure_png", "write_picture_files"]

#: the font of every text in the figure (shipped with matplotlib)
FONT = "DejaVu Sans"
#: the colour map of the weights
COLORMAP = "plasma"
#: the colour of the image-less canvas (region methods given only an image_id)
CANVAS = 232


def _positive(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PredictInputError(f"{what}: expected a positive integer, got {value!r}")
    return value


def draw_text(axes, *args, **kwargs):
    """``axes.text`` in the pictures' font (:data:`FONT`), the text taken literally (no math mode)."""
    return axes.text(*args, fontfamily=FONT, parse_math=False, **kwargs)


def draw_alignment(alignment: Alignment, top: int = 3, columns: int = 4, panel_inches: float = 3.2, dpi: int = 100):
    """The figure of ``alignment`` (see the module docstring): panel 0 every unit, then one panel per word with its
    ``top`` units; ``columns`` panels a row. Panel ``i`` is ``figure.axes[i]`` (the colour bar's axes come last);
    its data coordinates are the image's pixels (x right, y down)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    _positive(top, "top")
    _positive(columns, "columns")
    words = alignment.words()
    width, height = (int(n) for n in alignment.size)
    count = 1 + len(words)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    # each panel fits a panel_inches square; the layout is placed by hand (inches), the colour bar on the right
    aspect = height / max(width, 1)
    panel_w, panel_h = (panel_inches, panel_inches * aspect) if aspect <= 1 else (panel_inches / aspect, panel_inches)
    gap, title, top_band, bar_band = 0.15, 0.3, 0.7, 0.9
    figure_w = gap + columns * (panel_w + gap) + bar_band
    figure_h = top_band + rows * (title + panel_h + gap)
    figure = Figure(figsize=(figure_w, figure_h), dpi=dpi)
    FigureCanvasAgg(figure)

    def place(index):
        row, column = divmod(index, columns)
        left = gap + column * (panel_w + gap)
        bottom = figure_h - top_band - (row + 1) * (title + panel_h + gap) + gap
        return [left / figure_w, bottom / figure_h, panel_w / figure_w, panel_h / figure_h]

    picture = alignment.picture
    if picture is None:
        picture = np.full((height, width, 3), CANVAS, dtype=np.uint8)
    boxes = np.asarray(alignment.boxes, dtype=np.float64).reshape(-1, 4)
    tops = [np.argsort(-row, kind="stable")[:top] for _, _, row in words]
    shown = [float(row[k]) for (_, _, row), order in zip(words, tops) for k in order]
    low, high = (min(shown), max(shown)) if shown else (0.0, 1.0)
    norm = Normalize(low, high if high > low else low + 1e-6)
    cmap = colormaps[COLORMAP]

    def panel(index, title):
        axes = figure.add_axes(place(index))
        axes.imshow(picture, extent=(0, width, height, 0), interpolation="antialiased")
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        axes.set_axis_off()
        axes.set_title(title, fontsize=9, fontfamily=FONT, parse_math=False)
        return axes

    kind = alignment.units[0].split(" ")[0] if alignment.units else "unit"
    everything = panel(0, f"{len(boxes)} {kind}{'es' if kind.endswith('ch') else 's'}, every box")
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        everything.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=0.8))
        if alignment.labels is not None:
            draw_text(everything, x1 + 1, y1 + 1, f"{k}: {alignment.labels[k]}", color="white", fontsize=7, va="top",
                  bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    word_axes = []
    for index, ((word, pieces, row), order) in enumerate(zip(words, tops), 1):
        axes = panel(index, word if len(pieces) == 1 else f"{word} ({' '.join(pieces)})")
        for k in order[::-1]:  # the strongest drawn last, on top
            x1, y1, x2, y2 = boxes[k]
            colour = cmap(norm(float(row[k])))
            axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.5))
            tag = f"{row[k]:.3f}" + (f" {alignment.labels[k]}" if alignment.labels else "")
            draw_text(axes, x1 + 1, y1 + 1, tag, color="black", fontsize=7, va="top",
                  bbox={"facecolor": "white", "alpha": 0.75, "pad": 1, "edgecolor": colour, "linewidth": 1})
        word_axes.append(axes)
    if word_axes:
        bar_axes = figure.add_axes([(figure_w - bar_band + 0.1) / figure_w, gap / figure_h, 0.15 / figure_w,
                                    (figure_h - top_band - gap) / figure_h])
        bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=bar_axes)
        bar.set_label("attention weight", fontfamily=FONT)
        bar.ax.tick_params(labelsize=7, labelfontfamily=FONT)
    figure.suptitle(f"{alignment.method}: {alignment.text}\n{alignment.source}", fontsize=10, fontfamily=FONT,
                    parse_math=False, y=1 - 0.12 / figure_h, va="top")
    return figure


def alignment_html(alignment: Alignment, png: bytes, top: int = 3) -> str:
    """A self-contained HTML page: the picture (``png`` bytes, inlined as base64) and a table of each word's
    ``top`` units with their weights and boxes; every text escaped, no external reference."""
    from mmf_multilevel.predict.align import alignment_summary

    summary = alignment_summary(alignment, top)
    escape = html.escape
    rows = []
    for entry in summary["words"]:
        for rank, unit in enumerate(entry["top"], 1):
            word = escape(entry["word"]) if rank == 1 else ""
            label = escape(unit["label"]) if unit["label"] is not None else ""
            box = ", ".join(f"{v:.0f}" for v in unit["box"])
            rows.append([word, str(rank), escape(unit["unit"]), label, f"{unit['weight']:.4f}", box])
    intro = (f"Text: <b>{escape(alignment.text)}</b><br>Weights: {escape(alignment.source)}; {escape(summary['merge'])}."
             f"<br>Image: {int(alignment.size[0])} x {int(alignment.size[1])} pixels.")
    return html_page(f"{alignment.method}: {alignment.text}", alignment.method, intro, png,
                     "alignment of the text with the image",
                     ["word", "rank", "unit", "label", "weight", "box (x1, y1, x2, y2)"], rows, right_aligned=(5,))


def html_page(title: str, heading: str, intro: str, png: bytes, alt: str, header, rows, right_aligned=()) -> str:
    """The self-contained page every picture of :mod:`mmf_multilevel.predict` (and the weak corpus's link picture)
    writes beside its PNG: ``heading``, the ``intro`` paragraph, the picture (``png`` bytes inlined as base64) and a
    table (``header``: plain texts; ``rows``: cells already HTML-escaped, so a cell may mark up a part); columns
    numbered in ``right_aligned`` (1-based) right-aligned. No external reference."""
    escape = html.escape
    image = base64.b64encode(png).decode("ascii")
    aligned = " ".join(f"td:nth-child({n}) {{ text-align: right; }}" for n in right_aligned)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>body {{ font-family: '{FONT}', sans-serif; margin: 1em; }} img {{ max-width: 100%; }} "
        "table { border-collapse: collapse; } td, th { border: 1px solid #bbb; padding: 2px 8px; } "
        f"mark {{ padding: 0 2px; }} {aligned}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(heading)}</h1>",
        f"<p>{intro}</p>",
        f'<img alt="{escape(alt)}" src="data:image/png;base64,{image}">',
        "<table>",
        "<tr>" + "".join(f"<th>{escape(name)}</th>" for name in header) + "</tr>",
        *("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows),
        "</table>",
        "</body>",
        "</html>",
        "",
    ])


def check_paths(png_path, html_path=None) -> None:
    """``png_path``: a ``.png`` path; ``html_path``: None or an ``.html`` path, not the same file."""
    if not isinstance(png_path, (str, os.PathLike)) or not os.fspath(png_path) \
            or not os.fspath(png_path).lower().endswith(".png"):
        raise PredictInputError(f"picture path: expected a path ending in .png, got {png_path!r}")
    if html_path is not None:
        if not isinstance(html_path, (str, os.PathLike)) or not os.fspath(html_path).lower().endswith((".html", ".htm")):
            raise PredictInputError(f"html path: expected a path ending in .html, got {html_path!r}")
        if os.path.abspath(os.fspath(html_path)) == os.path.abspath(os.fspath(png_path)):
            raise PredictInputError("the html path and the picture path are the same file")


def figure_png(figure, dpi: int = 100) -> bytes:
    """``figure`` as PNG bytes (no software tag in the file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})  # no link in the file
    return buffer.getvalue()


def write_picture_files(png_path, png: bytes, html_path=None, page: Optional[str] = None) -> Dict[str, Optional[str]]:
    """``png`` written to ``png_path`` and, when given, ``page`` to ``html_path`` (parent folders created; each
    file written to a temporary file beside it, then renamed). Returns ``{"picture": png_path, "html": html_path
    or None}``."""
    write_bytes_atomically(os.fspath(png_path), png)
    if html_path is not None:
        write_bytes_atomically(os.fspath(html_path), page.encode("utf-8"))
    return {"picture": os.fspath(png_path), "html": os.fspath(html_path) if html_path is not None else None}


def write_alignment(alignment: Alignment, png_path, html_path=None, top: int = 3, columns: int = 4,
                    dpi: int = 100) -> Dict[str, Optional[str]]:
    """The picture of :func:`draw_alignment` written to ``png_path`` and, when given, the page of
    :func:`alignment_html` to ``html_path`` (:func:`write_picture_files`). Returns ``{"picture": png_path,
    "html": html_path or None}``."""
    check_paths(png_path, html_path)
    png = figure_png(draw_alignment(alignment, top=top, columns=columns, dpi=dpi), dpi)
    page = alignment_html(alignment, png, top) if html_path is not None else None
    return write_picture_files(png_path, png, html_path, page)
