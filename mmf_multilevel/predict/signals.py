"""A method's own grounding signal of a query (:meth:`Predictor.signal
<mmf_multilevel.predict.predictor.Predictor.signal>`, drawn by :meth:`~mmf_multilevel.predict.predictor.Predictor.signal_picture`
and ``mmf_ml_predict --signal``): what the method itself computes to ground a text in an image, where it has it,
beside the attention every method has (:mod:`.align`):

* MVPTR: each phrase concept's cosine with each region after the multimodal encoder (paper §3.3, Eq. 2, what WPG
  trains), the text parsed into phrases as the concept tool parses it: :mod:`mmf_multilevel.methods.mvptr.picture`;
* SIMLA: Grad-CAM of the ITM match score on the cross-attention, for the whole expression and for each word (paper
  §3.5): :mod:`mmf_multilevel.methods.simla.picture`;
* SOHO: the visual-dictionary id of every grid cell of the image (paper §3.2, Eq. 2; the text is not read):
  :mod:`mmf_multilevel.methods.soho.picture`;
* SemVLP and μ-VLA have none: a :class:`~.inputs.PredictInputError` says so and names ``--picture``.

The dispatch is the model class's hook :attr:`MethodModel.signal_module
<mmf_multilevel.methods.base.MethodModel.signal_module>`: the method's picture module, whose
``predictor_signal(predictor, image, text, image_id)`` computes the signal from the predictor's sample (the
dataset-equal sample :meth:`~mmf_multilevel.predict.predictor.Predictor.visual_sample` and ``text_fields`` build,
collated by its ``_batch``) with the module's own computation, and returns a :class:`Signal` whose ``draw`` is the
module's own drawing. :attr:`~mmf_multilevel.methods.base.MethodModel.no_signal_hint` adds where a method without
one keeps a signal of its own (μ-VLA: the weak corpus's tag↔phrase links).
"""
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mmf_multilevel.predict.inputs import PredictInputError

__all__ = ["Signal", "method_signal", "signal_html", "write_signal"]


@dataclass
class Signal:
    """One query's grounding signal, as the method's picture module computes it; ``draw``, ``table`` and ``summary``
    take ``top`` (how many of the strongest units a phrase or word lists, where the signal ranks units)."""

    method: str
    name: str  # what the numbers are, with the paper's place
    text: Optional[str]  # the query text (None: the signal does not read one)
    size: Tuple[int, int]  # (width, height) of the query image
    values: Dict[str, Any]  # the computed arrays, as the picture module's computation returns them
    draw: Callable[[int], Any]  # top -> a matplotlib Figure (the picture module's drawing)
    table: Callable[[int], Tuple[Sequence[str], List[Sequence[str]]]]  # top -> (the page's columns, rows: plain texts)
    summary: Callable[[int], Dict]  # top -> JSON-able: the numbers the picture shows


def method_signal(predictor, image=None, text: Optional[str] = None, image_id=None) -> Signal:
    """The :class:`Signal` of ``predictor``'s model on the query (see the module docstring); a model whose class names
    no ``signal_module`` is refused with a :class:`~.inputs.PredictInputError` that points to ``--picture``."""
    model = predictor.model
    module = getattr(model, "signal_module", None)
    if not module:
        hint = getattr(model, "no_signal_hint", "") or ""
        raise PredictInputError(f"{predictor.method} has no grounding signal of its own (the methods with one: MVPTR's "
                                "phrase-region scores, SIMLA's Grad-CAM, SOHO's dictionary ids); draw the text's "
                                "attention to the image instead: mmf_ml_predict --picture PNG, Predictor.picture"
                                + (f". {hint}" if hint else ""))
    return importlib.import_module(module).predictor_signal(predictor, image, text, image_id)


def signal_html(signal: Signal, png: bytes, top: int = 3) -> str:
    """A self-contained page: the picture and the signal's table (:func:`~.pictures.html_page`)."""
    import html

    from mmf_multilevel.predict.pictures import html_page

    escape = html.escape
    header, rows = signal.table(top)
    intro = (f"Signal: {escape(signal.name)}." + (f"<br>Text: <b>{escape(signal.text)}</b>" if signal.text else "")
             + f"<br>Image: {int(signal.size[0])} x {int(signal.size[1])} pixels.")
    return html_page(f"{signal.method}: {signal.text or signal.name}", f"{signal.method}: its own grounding signal",
                     intro, png, signal.name, list(header), [[escape(str(c)) for c in row] for row in rows])


def write_signal(signal: Signal, png_path, html_path=None, top: int = 3, dpi: int = 100) -> Dict[str, Optional[str]]:
    """The picture ``signal.draw(top)`` to ``png_path`` and, when given, the page of :func:`signal_html` to
    ``html_path``, each through a temporary file and a rename (:func:`~.pictures.write_picture_files`)."""
    from mmf_multilevel.predict.pictures import _positive, check_paths, figure_png, write_picture_files

    check_paths(png_path, html_path)
    png = figure_png(signal.draw(_positive(top, "top")), dpi)
    page = signal_html(signal, png, top) if html_path is not None else None
    return write_picture_files(png_path, png, html_path, page)
