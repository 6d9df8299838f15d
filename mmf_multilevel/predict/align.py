"""What :meth:`Predictor.align <mmf_multilevel.predict.predictor.Predictor.align>` returns: the text's word pieces
against the model's visual units, weighted by the model's own attention (:meth:`MethodModel.alignment
<mmf_multilevel.methods.base.MethodModel.alignment>`), with each unit's box in the query image's pixels.

* region methods: unit ``k`` is region ``k`` of the region record; its box is the record's, which the region
  cache keeps in the pixels of an image of ``image_w`` x ``image_h`` (or, in a cache written that way, normalised
  to ``[0, 1]``), mapped onto the query image;
* pixel methods: unit ``k`` is a grid cell (SOHO) or a patch (SIMLA) of the image the processor made; its box is
  the part of that image it covers, mapped back through the processor's resize (the processed picture's size
  against the decoded image's). Cells wholly in the processor's padding are no units; the model's global
  visual token, where it has one, is never a column.

Word pieces are merged into words for the pictures and the summary: a word's weights are the **mean** of its
pieces' rows (so a word's row, like a piece's, sums to at most 1).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mmf_multilevel.predict.inputs import PredictInputError

__all__ = ["Alignment", "region_boxes", "cell_boxes", "merge_pieces", "alignment_summary", "CONTINUATION"]

#: WordPiece's mark of a piece that continues the word before it
CONTINUATION = "##"


@dataclass
class Alignment:
    """The attention of a text's word pieces to the visual units of an image (see the module docstring)."""

    method: str
    text: str
    tokens: List[str]  # the rows: the text's word pieces, special tokens dropped
    weights: np.ndarray  # (T, K) float32, >= 0, each row summing to at most 1
    boxes: np.ndarray  # (K, 4) float32, x1 y1 x2 y2 in the query image's pixels
    units: List[str]  # (K,) each unit's name: "region 3", "cell 1,2", "patch 0,5"
    labels: Optional[List[str]]  # (K,) the regions' class names when the record has them, else None
    picture: Optional[np.ndarray]  # (H, W, 3) uint8, the decoded image; None when only an image_id was given
    size: Tuple[int, int]  # (width, height) of the query image
    source: str  # the layer and signal the weights come from

    def words(self) -> List[Tuple[str, List[str], np.ndarray]]:
        """``[(word, pieces, weights (K,))]``: the word pieces merged into words (see :func:`merge_pieces`)."""
        return merge_pieces(self.tokens, self.weights)


def merge_pieces(tokens: Sequence[str], weights: np.ndarray) -> List[Tuple[str, List[str], np.ndarray]]:
    """Word pieces -> words: a piece starting with ``##`` continues the word before it; a word's weights are the
    mean of its pieces' rows."""
    if len(tokens) != len(weights):
        raise ValueError(f"{len(tokens)} tokens but {len(weights)} weight rows")
    groups: List[List[int]] = []
    for index, token in enumerate(tokens):
        if groups and token.startswith(CONTINUATION) and len(token) > len(CONTINUATION):
            groups[-1].append(index)
        else:
            groups.append([index])
    out = []
    for group in groups:
        pieces = [tokens[i] for i in group]
        word = pieces[0] + "".join(p[len(CONTINUATION):] for p in pieces[1:])
        out.append((word, pieces, np.asarray(weights)[group].mean(0)))
    return out


def region_boxes(boxes: np.ndarray, image_w: int, image_h: int, size: Tuple[int, int]) -> np.ndarray:
    """A region record's ``(K, 4)`` boxes in the pixels of a ``size`` = (width, height) image: pixel boxes of an
    ``image_w`` x ``image_h`` image are scaled by the size ratio; boxes that all lie in ``[0, 1]`` (a cache that
    stores them normalised) are multiplied by ``size``. Clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width, height = (float(s) for s in size)
    if image_w <= 0 or image_h <= 0:
        raise PredictInputError(f"the region record's image size is {image_w} x {image_h}; expected positive "
                                "image_w and image_h")
    if len(boxes) and boxes.min() >= 0.0 and boxes.max() <= 1.0 and max(image_w, image_h) > 1:
        scale = np.array([width, height, width, height])
    else:
        scale = np.array([width / image_w, height / image_h, width / image_w, height / image_h])
    out = boxes * scale
    out[:, 0::2] = out[:, 0::2].clip(0.0, width)
    out[:, 1::2] = out[:, 1::2].clip(0.0, height)
    return out.astype(np.float32)


def cell_boxes(grid: Tuple[int, int], cell: Tuple[int, int], processed: Tuple[int, int],
               size: Tuple[int, int]) -> np.ndarray:
    """The ``(rows · columns, 4)`` boxes, row-major, of a ``grid`` of cells of ``cell`` = (height, width) pixels
    over a processed picture of ``processed`` = (height, width) pixels (cells clipped to it), mapped onto the
    decoded image of ``size`` = (width, height): the processor's resize undone."""
    rows, columns = (int(n) for n in grid)
    cell_h, cell_w = (int(n) for n in cell)
    height, width = (int(n) for n in processed)
    if min(rows, columns, cell_h, cell_w, height, width) <= 0:
        raise ValueError(f"grid {grid}, cell {cell} and processed size {processed} must be positive")
    r, c = np.divmod(np.arange(rows * columns), columns)
    boxes = np.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], axis=1).astype(np.float64)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    scale = np.array([size[0] / width, size[1] / height, size[0] / width, size[1] / height])
    return (boxes * scale).astype(np.float32)


def alignment_summary(alignment: Alignment, top: int = 3) -> Dict:
    """A JSON-able summary: per word, its ``top`` units with their weights, boxes and labels."""
    if not isinstance(top, int) or top < 1:
        raise PredictInputError(f"top: expected a positive integer, got {top!r}")
    words = []
    for word, pieces, row in alignment.words():
        order = np.argsort(-row, kind="stable")[:top]
        words.append({"word": word, "pieces": pieces, "top": [
            {"unit": alignment.units[k], "label": alignment.labels[k] if alignment.labels else None,
             "weight": round(float(row[k]), 6), "box": [round(float(v), 2) for v in alignment.boxes[k]]}
            for k in order]})
    return {"method": alignment.method, "text": alignment.text, "source": alignment.source,
            "size": [int(alignment.size[0]), int(alignment.size[1])], "words": words,
            "merge": "a word's weights are the mean of its word pieces' rows"}
