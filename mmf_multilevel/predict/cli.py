"""``mmf_ml_predict``: one prediction as JSON on stdout, or a batch over a jsonl file.

    mmf_ml_predict --config projects/simla/demo/vqa.yaml --checkpoint save/simla_vqa/simla_final.pth \\
        --image data/demo/images/demo_000000.jpg --question "what color is the circle?" env.data_dir=$PWD/data
    mmf_ml_predict --model <zoo name or folder> --image photo.jpg --text "a red circle"
    mmf_ml_predict --config ... --checkpoint ... --batch queries.jsonl --out results.jsonl env.data_dir=...

``--question`` asks the VQA head (``answer``, ``score`` and the ``top_k`` answers); ``--text`` asks the matching
head how well the text matches the image (``score``, ``probability``). Region methods read the image's regions
from ``--regions`` (a region cache; default: the config's dataset's cache), by ``--image-id`` or by the image's
SHA-256, or run the region detector on the image in-process with ``--detector`` (``butd_r101`` or
``vinvl_x152c4``; ``--detector-weights`` a path or URL, or ``--detector-random-init SEED``; ``--detector-cache``:
a region cache keyed by the image's SHA-256, so an image is detected once). ``--profile`` adds the seconds of
each stage (decode, regions or pixels, text, model) to the JSON. ``--picture PNG`` (and ``--html HTML``) also draws the
text's attention to the image (:meth:`~mmf_multilevel.predict.predictor.Predictor.picture`) and names the files in
the JSON (``picture``, ``html``); ``--profile`` then adds the stage times of that pass too, ``drawing`` included.
``--signal PNG`` draws the method's own grounding signal instead (:meth:`~mmf_multilevel.predict.predictor.Predictor.signal_picture`:
MVPTR's phrase-region scores, SIMLA's Grad-CAM, SOHO's dictionary ids; SemVLP and μ-VLA have none, exit status 2),
named in the JSON as ``signal``; ``--html`` goes with whichever of ``--picture`` and ``--signal`` is given.

``--retrieve-images FOLDER --text "..."`` ranks the folder's images for the text, ``--retrieve-texts CAPTIONS.txt
--image IMG`` the file's captions (one a line) for the image, as the method's retrieval evaluation ranks
(:mod:`.retrieve`): the ``--top-k`` best (``results``), ``gallery_size`` and the ``skipped`` files;
``--embedding-cache DIR`` keeps a dual-encoder method's gallery embeddings (SIMLA, MVPTR) for the next query.

Batch mode: each line of the jsonl is an object with ``image`` (a path, relative to the jsonl's folder when not
absolute) and/or ``image_id``, and ``question`` or ``text``; ``id`` (default: the line number) names it in the
output. Each result is appended to ``--out`` as one JSON line as soon as it is computed; a rerun skips the ids
already there (resumable). A bad line (not JSON, a missing field, an unreadable image) is reported on stderr
with its line number and skipped; the command then exits with status 1. Configuration mistakes exit with 2.
"""
import argparse
import contextlib
import json
import os
import sys
import time

from mmf_multilevel.predict.retrieve import add_retrieval_arguments, wants_retrieval
from mmf_multilevel.predict.retrieve import run_cli as run_retrieval

__all__ = ["main", "read_done", "run_batch", "add_model_arguments", "add_region_arguments", "region_source"]


class BatchLineError(ValueError):
    pass


def add_model_arguments(parser) -> None:
    """``--model`` / ``--config``, ``--checkpoint`` and ``--device`` (``mmf_ml_predict``, ``mmf_ml_serve``)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model zoo name, or a folder with a run config (.yaml) and a checkpoint")
    source.add_argument("--config", help="a run config (.yaml), as mmf_run reads")
    parser.add_argument("--checkpoint", default=None, help="the model's weights (.pth / .ckpt); none: as built")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def add_region_arguments(parser) -> None:
    """``--regions`` and the in-process detector's options (region methods); :func:`region_source` reads them."""
    parser.add_argument("--regions", default=None, help="region methods: a region cache (default: the dataset's)")
    detector = parser.add_argument_group("in-process region extraction (region methods)")
    detector.add_argument("--detector", default=None, choices=("butd_r101", "vinvl_x152c4"),
                          help="run this detector on the image instead of reading a region cache")
    detector.add_argument("--detector-weights", default=None, help="the detector's checkpoint (a path or URL)")
    detector.add_argument("--detector-random-init", type=int, default=None, metavar="SEED",
                          help="random calibrated detector weights (tests and demos)")
    detector.add_argument("--detector-cache", default=None,
                          help="a region cache folder the detected regions are kept in, keyed by SHA-256")
    detector.add_argument("--detector-opts", default="", metavar="'KEY VALUE ...'",
                          help="detectron2 config overrides, in one quoted string")
    detector.add_argument("--min-boxes", type=int, default=None, help="regions per image, at least (default: config)")
    detector.add_argument("--max-boxes", type=int, default=None, help="regions per image, at most (default: config)")
    detector.add_argument("--object-vocab", default=None, help="the detector's object class names, one per line")


def _parser():
    parser = argparse.ArgumentParser(prog="mmf_ml_predict", description=(
        "A registered method's prediction on raw inputs (VQA answer or image-text match), as JSON."))
    add_model_arguments(parser)
    parser.add_argument("--image", default=None, help="an image file")
    parser.add_argument("--image-id", default=None, help="region methods: the image's key in the region cache")
    task = parser.add_mutually_exclusive_group()
    task.add_argument("--question", default=None, help="a question about the image (VQA)")
    task.add_argument("--text", default=None, help="a text to match with the image (image-text matching)")
    from mmf_multilevel.predict.tasks import add_task_arguments

    add_task_arguments(parser, task)  # --statement (NLVR2, with --image2), --expression (grounding)
    parser.add_argument("--top-k", type=int, default=5, help="answers listed with their scores (VQA)")
    add_region_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="add each stage's seconds ('profile') to the JSON")
    parser.add_argument("--picture", default=None, metavar="PNG",
                        help="also draw the text's attention to the image into this .png (one query)")
    parser.add_argument("--html", default=None, metavar="HTML",
                        help="with --picture or --signal: also a self-contained .html page")
    signals = parser.add_argument_group("the method's own grounding signal (MVPTR, SIMLA, SOHO)")
    signals.add_argument("--signal", default=None, metavar="PNG",
                         help="also draw the method's own grounding signal of the query into this .png (one query): "
                              "MVPTR's phrase-region scores, SIMLA's Grad-CAM, SOHO's dictionary ids")
    parser.add_argument("--batch", default=None, help="a jsonl of queries (see the module docstring)")
    parser.add_argument("--out", default=None, help="with --batch: the results jsonl (appended; resumable)")
    add_retrieval_arguments(parser)  # --retrieve-images / --retrieve-texts (mmf_multilevel.predict.retrieve)
    parser.add_argument("opts", nargs="*", help="config overrides, as for mmf_run (env.data_dir=...)")
    return parser


def _public(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "scores"}


def predict_one(predictor, image, image_id, question, text, top_k, profile=False, **task):
    """One query's JSON result; ``task``: NLVR2 / grounding fields (:func:`.tasks.task_fields`)."""
    if task:
        from mmf_multilevel.predict.tasks import predict_task

        result = predict_task(predictor, image, image_id, top_k, **task)
    elif question is not None:
        result = {"task": "vqa", **_public(predictor.vqa(image, question, top_k=top_k, image_id=image_id))}
    else:
        result = {"task": "match", **_public(predictor.match(image, text, image_id=image_id))}
    if profile:
        result["profile"] = {stage: round(seconds, 6) for stage, seconds in predictor.profile.items()}
    return result


def draw_picture(predictor, args, profile=None) -> dict:
    """``--picture`` / ``--html``: the alignment picture of the query's image and text; the paths for the JSON, and
    ``profile`` (the prediction's stage times) with this pass's stages added."""
    text = args.question if args.question is not None else args.text
    if args.expression is not None:  # grounding: the chosen box thick, the other top-k proposals thin
        from mmf_multilevel.predict.tasks import ground_picture

        drawn = ground_picture(predictor, args.image, args.expression, args.picture, args.image_id, args.top_k)
    else:
        drawn = predictor.picture(args.image, text, args.picture, args.html, image_id=args.image_id)
    out = {"picture": drawn["picture"]} if args.html is None else {"picture": drawn["picture"], "html": drawn["html"]}
    if profile is not None:
        stages = {**profile, **predictor.profile}
        out["profile"] = {stage: round(profile.get(stage, 0.0) + predictor.profile.get(stage, 0.0), 6) for stage in stages}
    return out


def draw_signal(predictor, args, profile=None) -> dict:
    """``--signal`` (``--html`` with it when ``--picture`` is not given): the method's own grounding signal picture of
    the query; the paths for the JSON, and ``profile`` (the stage times so far) with this pass's stages added."""
    text = args.question if args.question is not None else args.text
    page = args.html if args.picture is None else None
    drawn = predictor.signal_picture(args.image, text, args.signal, page, image_id=args.image_id)
    out = {"signal": drawn["picture"]} if page is None else {"signal": drawn["picture"], "html": drawn["html"]}
    if profile is not None:
        stages = {**profile, **predictor.profile}
        out["profile"] = {stage: round(profile.get(stage, 0.0) + predictor.profile.get(stage, 0.0), 6) for stage in stages}
    return out


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def region_source(args):
    """``--regions`` (a cache path), or a :class:`~mmf_multilevel.predict.detect.DetectorRegions` for ``--detector``."""
    detector_flags = (args.detector_weights, args.detector_random_init, args.detector_cache, args.min_boxes,
                      args.max_boxes, args.object_vocab)
    if args.detector is None:
        if any(flag is not None for flag in detector_flags) or args.detector_opts:
            raise BatchLineError("--detector-* / --min-boxes / --max-boxes / --object-vocab need --detector")
        return args.regions
    if args.regions is not None:
        raise BatchLineError("give --regions (read a region cache) or --detector (run the detector), not both")
    from mmf_multilevel.predict.detect import DetectorRegions

    return DetectorRegions(args.detector, weights=args.detector_weights, random_init=args.detector_random_init,
                           opts=args.detector_opts.split(), cache=args.detector_cache, device=args.device or default_device(),
                           min_boxes=args.min_boxes, max_boxes=args.max_boxes, object_vocab=args.object_vocab)


def read_done(path: str) -> set:
    """The ids already in the results file ``path``; a last line cut short by a killed run is removed."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as handle:
        data = handle.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    done = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                done.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                raise BatchLineError(f"--out {path} line {number}: not a result line of mmf_ml_predict (a JSON object "
                                     "with 'id'); give another --out") from None
    return done


def _query(line: str, number: int, folder: str):
    try:
        query = json.loads(line)
    except ValueError as error:
        raise BatchLineError(f"not JSON ({error})") from None
    if not isinstance(query, dict):
        raise BatchLineError(f"expected a JSON object, got {type(query).__name__}")
    from mmf_multilevel.predict.tasks import BATCH_FIELDS, batch_query

    if any(key in query for key in BATCH_FIELDS):  # an NLVR2 or grounding line
        return batch_query(query, number, folder)
    unknown = sorted(set(query) - {"id", "image", "image_id", "question", "text", "top_k"})
    if unknown:
        raise BatchLineError(f"unknown field(s) {unknown}; expected id, image, image_id, question or text, top_k")
    if ("question" in query) == ("text" in query):
        raise BatchLineError("give exactly one of 'question' (VQA) and 'text' (image-text matching)")
    if "image" not in query and "image_id" not in query:
        raise BatchLineError("give 'image' (a path) or 'image_id' (region methods: the image's key in the cache)")
    image = query.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise BatchLineError(f"field 'image' must be a path string, got {image!r}")
        image = image if os.path.isabs(image) else os.path.join(folder, image)
    return str(query.get("id", number)), image, query


def run_batch(predictor, batch: str, out: str, default_top_k: int = 5, stream=None, profile=False) -> dict:
    """Every query of ``batch`` not already in ``out`` predicted and appended to ``out``; returns the counts. Bad
    lines are reported on ``stream`` (default: ``sys.stderr`` at the call, not at import)."""
    from mmf_multilevel.predict.inputs import PredictInputError
    from mmf_multilevel.predict.tasks import task_fields

    stream = sys.stderr if stream is None else stream
    if not os.path.isfile(batch):
        raise FileNotFoundError(f"--batch {batch}: no such file")
    done = read_done(out)
    folder = os.path.dirname(os.path.abspath(batch))
    counts = {"predicted": 0, "skipped": 0, "bad": 0}
    seen = set()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(batch, encoding="utf-8") as lines, open(out, "a", encoding="utf-8") as results:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                key, image, query = _query(line, number, folder)
                if key in seen:
                    raise BatchLineError(f"id {key!r} repeats an earlier line's")
                seen.add(key)
                if key in done:
                    counts["skipped"] += 1
                    continue
                result = predict_one(predictor, image, query.get("image_id"), query.get("question"),
                                     query.get("text"), int(query.get("top_k", default_top_k)), profile,
                                     **task_fields(query))
            except (BatchLineError, PredictInputError, FileNotFoundError, KeyError, ValueError, TypeError) as error:
                counts["bad"] += 1
                print(f"mmf_ml_predict: {batch} line {number}: {error}", file=stream or sys.stderr, flush=True)
                continue
            results.write(json.dumps({"id": key, **result}) + "\n")
            results.flush()
            counts["predicted"] += 1
    return counts


def main(argv=None) -> int:
    from mmf_multilevel.compat.launcher import ConfigError
    from mmf_multilevel.predict.inputs import PredictInputError
    from mmf_multilevel.predict.predictor import load_predictor
    from mmf_multilevel.predict.tasks import check_task_arguments, task_fields

    parser = _parser()
    args = parser.parse_args(argv)
    if wants_retrieval(args):
        return run_retrieval(parser, args)
    check_task_arguments(parser, args)
    if args.batch is None:
        if args.question is None and args.text is None and not task_fields(args):
            parser.error("give --question (VQA), --text (image-text matching), --statement (NLVR2) or --expression "
                         "(grounding), or --batch")
        if args.image is None and args.image_id is None:
            parser.error("give --image (or, for a region method, --image-id)")
    elif args.out is None:
        parser.error("--batch needs --out (the results jsonl)")
    elif args.question is not None or args.text is not None or args.image is not None:
        parser.error("--batch reads the queries from the jsonl: drop --image / --question / --text")
    if args.picture is None and args.signal is None and args.html is not None:
        parser.error("--html needs --picture or --signal (the .png the page shows)")
    if args.html is not None and args.picture is not None and args.signal is not None:
        parser.error("--html is one page: give it with --picture or with --signal, not both")
    if args.picture is not None and args.batch is not None:
        parser.error("--picture draws one query's alignment: not with --batch")
    if args.signal is not None and args.batch is not None:
        parser.error("--signal draws one query's grounding signal: not with --batch")
    start = time.perf_counter()
    try:
        if args.picture is not None:  # a bad path fails before the model loads
            from mmf_multilevel.predict.pictures import check_paths

            check_paths(args.picture, args.html)
        if args.signal is not None:
            from mmf_multilevel.predict.pictures import check_paths

            check_paths(args.signal, args.html if args.picture is None else None)
        with contextlib.redirect_stdout(sys.stderr):  # MMF's config messages: stdout carries the JSON alone
            predictor = load_predictor(args.model or args.config, args.checkpoint, args.opts,
                                       regions=region_source(args), device=args.device)
        if args.batch is not None:
            counts = run_batch(predictor, args.batch, args.out, args.top_k, profile=args.profile)
            print(json.dumps({"out": args.out, **counts, "seconds": round(time.perf_counter() - start, 3)}))
            return 1 if counts["bad"] else 0
        result = predict_one(predictor, args.image, args.image_id, args.question, args.text, args.top_k, args.profile,
                             **task_fields(args))
        if args.picture is not None:
            result.update(draw_picture(predictor, args, predictor.profile if args.profile else None))
        if args.signal is not None:
            result.update(draw_signal(predictor, args, result["profile"] if args.profile else None))
    except (ConfigError, PredictInputError, BatchLineError, FileNotFoundError, KeyError, ValueError,
            NotImplementedError) as error:
        print(f"mmf_ml_predict: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"method": predictor.method, "image": args.image, "image_id": args.image_id, **result},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
