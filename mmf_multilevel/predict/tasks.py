"""NLVR2 and referring-expression grounding on raw inputs: :meth:`Predictor.nlvr2
<mmf_multilevel.predict.predictor.Predictor.nlvr2>` and :meth:`Predictor.ground
<mmf_multilevel.predict.predictor.Predictor.ground>`, with their ``mmf_ml_predict`` options and the grounding
picture.

**NLVR2** (a model with ``training_head_type: nlvr2`` fine-tuned on ``nlvr2`` / ``nlvr2_images``: SemVLP, μ-VLA,
SOHO, SIMLA): the statement goes through the dataset's text processor once and the two images are laid out by the
dataset's own :func:`~mmf_multilevel.datasets.nlvr2.pair_visual_fields` - ``input_layout: paired`` puts the left
image's visual fields under ``img0`` and the right one's under ``img1`` (regions, or the pixels of the raw-image
variant), ``concatenated`` one region sequence of both, left first, with ``image_segment_ids``. Each image's
fields are the predictor's (the dataset's processors, the region source). The answer is the dataset's
:func:`~mmf_multilevel.datasets.nlvr2.statement_labels` on the head's two-way ``scores`` (what ``accuracy``
scores and the submission file writes): ``label`` True when the "true" class wins; ``probability`` is the
softmax of the two scores, ``score`` their log-odds (:func:`~mmf_multilevel.metrics.pair_match_scores`).

**Grounding** (``refcoco_plus`` / ``mvptr_refcoco_plus`` with a ``refcoco`` head: μ-VLA, MVPTR; the weakly
supervised ``refcoco_plus_images`` of SIMLA, ``training_head_type: grounding``; ``visual_bert_grounding``): the
image's proposals are the region source's record (the dataset's region cache by image id or SHA-256, or the
in-process detector), in the sample as the dataset puts them (:func:`~mmf_multilevel.datasets.refcoco.
proposal_fields`); the model scores every proposal - a region scoring head, MVPTR's text-region cosine (its
paper §4.2), or SIMLA's Grad-CAM mass of each box (paper §3.5, :mod:`mmf_multilevel.methods.simla.grounding`) -
and the chosen box is :func:`~mmf_multilevel.evaluation.grounding.chosen_proposals`, the pick
``refcoco_accuracy`` scores against the gold box. Boxes are in the image's pixels ``[x0, y0, x1, y1]`` (the
region record's: the original image's).
"""
import math
from typing import Optional

import torch

from mmf_multilevel.predict.inputs import PredictInputError, positive_int

__all__ = ["NLVR2_HEAD_TYPES", "GROUND_HEAD_TYPES", "nlvr2", "ground", "ground_picture", "draw_grounding",
           "write_grounding", "add_task_arguments", "task_fields", "check_task_arguments", "batch_query",
           "predict_task", "BATCH_FIELDS"]

#: head types that judge a statement about two images
NLVR2_HEAD_TYPES = ("nlvr2",)
#: head types that score an image's proposals for an expression (μ-VLA and MVPTR: ``refcoco``; SIMLA: ``grounding``)
GROUND_HEAD_TYPES = ("refcoco", "grounding")
#: methods whose one head type (``classification``) is a per-region scorer: RefCOCO+'s reference model
REGION_SCORER_METHODS = ("visual_bert_grounding",)


def _dataset_class(name: str):
    from mmf.common.registry import registry

    return getattr(registry.get_builder_class(name), "dataset_class", None)


def _require_dataset(predictor, base, task: str, expected: str) -> None:
    dataset_class = _dataset_class(predictor.dataset_name)
    if not (isinstance(dataset_class, type) and issubclass(dataset_class, base)):
        raise PredictInputError(f"{task} needs a run config whose dataset is {expected}; this one's is "
                                f"{predictor.dataset_name!r} (the run config's datasets)")


def _visual_fields(predictor, query, target) -> None:
    """The visual fields of one query image ``(image, image_id, where)`` copied into ``target`` (the sample's
    ``id`` is the caller's)."""
    visual = predictor.visual_sample(*query)
    for key, value in visual.items():
        if key != "id":
            target[key] = value


def _region_pair(predictor, query):
    visual = predictor.visual_sample(*query)
    return visual.image_feature_0, visual.image_info_0


# ---------------------------------------------------------------------- NLVR2
def nlvr2(predictor, left_image=None, right_image=None, statement: str = "", left_image_id=None,
          right_image_id=None) -> dict:
    """Whether ``statement`` is true of the pair (``left_image``, ``right_image``): see the module docstring.
    Images are paths, encoded bytes or ``PIL.Image``\\ s; region methods may name them by id in the region source
    instead. Returns ``{"statement", "label", "probability", "score", "scores"}``."""
    from mmf.common.sample import Sample

    from mmf_multilevel.datasets.base import setting
    from mmf_multilevel.datasets.nlvr2 import LAYOUTS, NLVR2Dataset, pair_visual_fields, statement_labels
    from mmf_multilevel.metrics import pair_match_scores

    predictor.profile = {}
    predictor._require("nlvr2", NLVR2_HEAD_TYPES)
    _require_dataset(predictor, NLVR2Dataset, "nlvr2", "an NLVR2 dataset (nlvr2, nlvr2_images)")
    try:
        layout = str(setting(predictor.dataset_config, "input_layout", predictor.dataset_name))
    except KeyError as error:
        raise PredictInputError(str(error.args[0])) from None
    where = f"dataset_config.{predictor.dataset_name}.input_layout"
    if layout not in LAYOUTS:
        raise PredictInputError(f"{where} must be one of {list(LAYOUTS)}, got {layout!r}")
    if predictor.visual == "pixels" and layout != "paired":
        raise PredictInputError(f"{where}: raw images are given per image (img0.image, img1.image): use 'paired', "
                                f"not {layout!r}")
    sides = []
    for side, image, image_id in (("left_image", left_image, left_image_id),
                                  ("right_image", right_image, right_image_id)):
        if image is None and (image_id is None or predictor.visual == "pixels"):
            by_id = f" or {side}_id (its key in the region source)" if predictor.visual == "regions" else ""
            raise PredictInputError(f"{side}: NLVR2 judges a statement about two images; give {side} (a path, "
                                    f"encoded bytes or a PIL.Image){by_id}")
        sides.append((image, image_id, side))
    sample = Sample()
    sample.update(predictor.text_fields(statement, "statement"))
    pair_visual_fields(sample, layout, sides[0], sides[1], lambda target, query: _visual_fields(predictor, query, target),
                       lambda query: _region_pair(predictor, query))
    sample.id = torch.tensor(0, dtype=torch.long)
    scores = predictor.forward([sample])["scores"].float().cpu()
    if tuple(scores.shape) != (1, 2):
        raise RuntimeError(f"the {predictor.method} nlvr2 head gave scores of shape {tuple(scores.shape)}, expected "
                           "(1, 2): false, true")
    probability = float(torch.softmax(scores[0], dim=0)[1])
    return {"statement": statement, "label": bool(statement_labels(scores)[0]), "probability": probability,
            "score": float(pair_match_scores(scores)[0]), "scores": scores[0]}


# ---------------------------------------------------------------------- grounding
def _require_grounding(predictor) -> None:
    from mmf_multilevel.datasets.refcoco import RefCOCODataset

    if predictor.method not in REGION_SCORER_METHODS:
        predictor._require("ground", GROUND_HEAD_TYPES)
    _require_dataset(predictor, RefCOCODataset, "ground",
                     "a referring-expression dataset with proposals (refcoco_plus, mvptr_refcoco_plus, "
                     "refcoco_plus_images)")


def _pixel_method_proposals(predictor, sample, query, image_id) -> None:
    """A pixel method's (SIMLA's) proposals in ``sample.image_info_0``, from the region source, as
    ``refcoco_plus_images`` reads its proposals' boxes from the region cache beside the pixels (a region method's
    visual sample holds them already)."""
    from mmf_multilevel.datasets.base import REGION_DEFAULTS, region_record_fields, setting_or_default

    with predictor._stage("regions"):
        source = predictor.region_source
        record = source(query, None if image_id is None else str(image_id))
        rows = int(setting_or_default(predictor.dataset_config, "max_features", REGION_DEFAULTS))
        _, sample.image_info_0 = region_record_fields(
            record, image_id or query.sha256, rows, predictor.dataset_config.get("feature_dim"),
            getattr(source, "path", type(source).__name__))


def ground(predictor, image=None, expression: str = "", image_id=None, top_k: int = 3) -> dict:
    """The proposal of ``image`` that ``expression`` refers to, chosen as ``refcoco_accuracy`` chooses it (see the
    module docstring). ``image``: a path, encoded bytes or a ``PIL.Image`` (region methods may name it by
    ``image_id`` instead; with both, ``image_id`` keys the region cache). Returns ``{"expression", "box",
    "score", "index", "label", "image_size", "num_proposals", "top_k", "scores"}``: ``box`` ``[x0, y0, x1, y1]``
    in the image's pixels, ``top_k`` the best ``top_k`` proposals (index, box, score, label), best first."""
    return _ground(predictor, image, expression, image_id, top_k)[0]


def _ground(predictor, image, expression, image_id, top_k):
    """``(ground's result, the decoded query image or None)``."""
    from mmf_multilevel.datasets.refcoco import proposal_fields
    from mmf_multilevel.evaluation.grounding import chosen_proposals

    predictor.profile = {}
    _require_grounding(predictor)
    top_k = positive_int(top_k, "top_k")
    text = predictor.text_fields(expression, "expression")
    sample, query, _ = predictor._visual(image, image_id, "image")
    if predictor.visual == "pixels":
        _pixel_method_proposals(predictor, sample, query, image_id)
    sample.update(text)
    count = proposal_fields(sample)
    if count == 0:
        raise PredictInputError(f"image: the region source has no proposal for {image_id or query.where}: nothing to "
                                "ground the expression in")
    scores = predictor.forward([sample])["scores"].float().cpu()
    rows = int(sample.proposal_boxes.shape[0])
    if tuple(scores.shape) != (1, rows):
        raise RuntimeError(f"the {predictor.method} model gave scores of shape {tuple(scores.shape)}, expected one per "
                           f"proposal (1, {rows})")
    choice, _ = chosen_proposals(scores, sample.num_proposals.view(1))
    index = int(choice[0])
    scores = scores[0, :count]
    info = sample.image_info_0
    boxes = info.bbox[:count].float()
    labels = predictor._region_labels(info, count)
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    listed = [k for k in order if math.isfinite(float(scores[k]))][:top_k]

    def entry(k):
        return {"index": k, "box": [float(v) for v in boxes[k]], "score": float(scores[k]),
                "label": labels[k] if labels else None}

    chosen = entry(index)
    return {"expression": expression, **chosen, "image_size": [int(info.image_width), int(info.image_height)],
            "num_proposals": count, "top_k": [entry(k) for k in listed], "scores": scores}, query


# ---------------------------------------------------------------------- the grounding picture
def draw_grounding(result: dict, picture=None, title: Optional[str] = None, inches: float = 5.0, dpi: int = 100):
    """A matplotlib figure of :func:`ground`'s ``result``: ``picture`` (the query's ``PIL.Image``; None, when the
    query named the image by id only: a grey canvas of its size) with the chosen box thick and the other ``top_k``
    proposals thin, each labelled with its rank, score and class. Its axes' data coordinates are the image's pixels
    (x right, y down)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from mmf_multilevel.predict.pictures import CANVAS, FONT

    width, height = (int(n) for n in result["image_size"])
    picture = np.asarray(picture.convert("RGB")) if picture is not None else np.full((height, width, 3), CANVAS,
                                                                                          dtype=np.uint8)
    aspect = height / max(width, 1)
    figure = Figure(figsize=(inches, inches * aspect + 0.4), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes([0.02, 0.02, 0.96, (inches * aspect) / (inches * aspect + 0.4) - 0.02])
    axes.imshow(picture, extent=(0, width, height, 0), interpolation="antialiased")
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    entries = [e for e in result["top_k"] if e["index"] != result["index"]][::-1] + [result]  # the chosen on top
    for entry in entries:
        x1, y1, x2, y2 = entry["box"]
        chosen = entry["index"] == result["index"]
        colour = "#e8112d" if chosen else "#f5d000"
        axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                                 linewidth=3.5 if chosen else 1.2))
        rank = next((r for r, e in enumerate(result["top_k"], 1) if e["index"] == entry["index"]), 1)
        tag = f"{rank}. {entry['score']:.3g}" + (f" {entry['label']}" if entry.get("label") else "")
        axes.text(x1 + 1, y1 + 1, tag, color="black", fontsize=7, va="top", fontfamily=FONT, parse_math=False,
                  bbox={"facecolor": "white", "alpha": 0.75, "pad": 1, "edgecolor": colour, "linewidth": 1})
    figure.suptitle(title if title is not None else result["expression"], fontsize=10, fontfamily=FONT,
                    parse_math=False, y=1 - 0.08 / (inches * aspect + 0.4), va="top")
    return figure


def write_grounding(result: dict, png_path, picture=None, title: Optional[str] = None, dpi: int = 100) -> str:
    """:func:`draw_grounding` written to ``png_path`` (a ``.png``; parent folders created; a temporary file beside
    it, then a rename). Returns the path."""
    import os

    from mmf_multilevel.files import write_bytes_atomically
    from mmf_multilevel.predict.pictures import check_paths, figure_png

    check_paths(png_path)
    figure = draw_grounding(result, picture, title=title, dpi=dpi)
    return write_bytes_atomically(os.fspath(png_path), figure_png(figure, dpi))


def ground_picture(predictor, image=None, expression: str = "", png_path="", image_id=None, top_k: int = 3) -> dict:
    """:func:`ground`, then its picture (:func:`draw_grounding`) written to ``png_path``, timed as the ``drawing``
    stage; the result has ``picture``: the path."""
    from mmf_multilevel.predict.pictures import check_paths

    check_paths(png_path)
    result, query = _ground(predictor, image, expression, image_id, top_k)
    with predictor._stage("drawing"):
        path = write_grounding(result, png_path, query.picture if query is not None else None,
                               title=f"{predictor.method}: {expression}")
    return {**result, "picture": path}


# ---------------------------------------------------------------------- mmf_ml_predict
#: the fields a batch line may add for these tasks (``image2`` a path like ``image``)
BATCH_FIELDS = ("image2", "image2_id", "statement", "expression")


def add_task_arguments(parser, task_group) -> None:
    """``--statement`` and ``--expression`` (in the command's group of tasks, one query asks one) and the second
    image of NLVR2 (``--image2``, ``--image2-id``)."""
    task_group.add_argument("--statement", default=None,
                            help="NLVR2: a statement about --image (left) and --image2 (right); true or false")
    task_group.add_argument("--expression", default=None,
                            help="grounding: a referring expression; the box of --image it names")
    pair = parser.add_argument_group("NLVR2 and grounding")
    pair.add_argument("--image2", default=None, help="NLVR2: the right image (--image is the left one)")
    pair.add_argument("--image2-id", default=None, help="NLVR2, region methods: the right image's key in the region "
                                                        "cache (--image-id is the left one's)")


def task_fields(source) -> dict:
    """The NLVR2 / grounding fields of parsed arguments or of a batch line (a dict), None left out."""
    get = source.get if isinstance(source, dict) else (lambda key: getattr(source, key, None))
    return {key: get(key) for key in BATCH_FIELDS if get(key) is not None}


def check_task_arguments(parser, args) -> None:
    """The command-line rules of these tasks (``parser.error`` exits 2)."""
    given = task_fields(args)
    if args.batch is not None:
        if given:
            parser.error("--batch reads the queries from the jsonl: drop --image2 / --statement / --expression")
        return
    if "statement" not in given and ("image2" in given or "image2_id" in given):
        parser.error("--image2 / --image2-id are the right image of an NLVR2 statement: give --statement")
    if "statement" in given and "image2" not in given and "image2_id" not in given:
        parser.error("--statement (NLVR2) needs two images: --image (left) and --image2 (right; region methods may "
                     "give --image2-id)")
    if args.picture is not None and "statement" in given:
        parser.error("--picture draws a grounding (--expression) or a text's attention (--question / --text), not an "
                     "NLVR2 statement")
    if args.html is not None and "expression" in given:
        parser.error("--html is the page of a text's attention (--question / --text); a grounding draws --picture alone")


def batch_query(query: dict, number: int, folder: str):
    """``(id, image, query)`` of a batch line that asks NLVR2 (``statement``, ``image`` / ``image_id`` the left
    image, ``image2`` / ``image2_id`` the right one) or grounding (``expression``); ``image`` and ``image2`` are
    paths, relative to the jsonl's folder when not absolute. A bad line raises the command's ``BatchLineError``."""
    import os

    from mmf_multilevel.predict.cli import BatchLineError

    asked = [key for key in ("question", "text", "statement", "expression") if key in query]
    if len(asked) != 1:
        raise BatchLineError(f"give exactly one of 'question' (VQA), 'text' (image-text matching), 'statement' "
                             f"(NLVR2) and 'expression' (grounding), got {asked}")
    allowed = {"id", "image", "image_id", "top_k", *BATCH_FIELDS}
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise BatchLineError(f"unknown field(s) {unknown}; an NLVR2 / grounding line has id, image, image_id, image2, "
                             "image2_id, statement or expression, top_k")
    if "image" not in query and "image_id" not in query:
        raise BatchLineError("give 'image' (a path) or 'image_id' (region methods: the image's key in the cache)")
    if "statement" in query and "image2" not in query and "image2_id" not in query:
        raise BatchLineError("a 'statement' (NLVR2) needs the right image too: 'image2' (a path) or 'image2_id'")
    if "expression" in query and ("image2" in query or "image2_id" in query):
        raise BatchLineError("'image2' / 'image2_id' are the right image of an NLVR2 'statement', not of an "
                             "'expression'")
    query = dict(query)
    for key in ("image", "image2"):
        if key in query:
            path = query[key]
            if not isinstance(path, str) or not path:
                raise BatchLineError(f"field '{key}' must be a path string, got {path!r}")
            query[key] = path if os.path.isabs(path) else os.path.join(folder, path)
    return str(query.get("id", number)), query.get("image"), query


def predict_task(predictor, image, image_id, top_k, image2=None, image2_id=None, statement=None, expression=None):
    """One NLVR2 or grounding query as ``mmf_ml_predict`` prints it (no tensor, no picture)."""
    if statement is not None and expression is not None:
        raise PredictInputError("give 'statement' (NLVR2) or 'expression' (grounding), not both")
    if statement is not None:
        result = predictor.nlvr2(image, image2, statement, left_image_id=image_id, right_image_id=image2_id)
        return {"task": "nlvr2", "image2": image2, "image2_id": image2_id,
                **{k: v for k, v in result.items() if k != "scores"}}
    if image2 is not None or image2_id is not None:
        raise PredictInputError("image2 is the right image of an NLVR2 statement: give 'statement' with it")
    result = predictor.ground(image, expression, image_id=image_id, top_k=top_k)
    return {"task": "ground", **{k: v for k, v in result.items() if k not in ("scores", "picture")}}
