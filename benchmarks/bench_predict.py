"""End-to-end latency of ``mmf_ml_predict`` on one raw 600 x 1000 image and a question, per stage, at the papers'
sizes (random weights, nothing downloaded): what a user waits for, and what of it is the predictor's own.

    python benchmarks/bench_predict.py                        # semvlp (BUTD R101-C4 in-process), soho, simla
    python benchmarks/bench_predict.py --methods semvlp --repeats 5 --record

For each method, the demo project's VQA config (``projects/<method>/demo/vqa.yaml``: its tokenizer vocabulary and
answer list) with the model at base size (the method's ``benchmark.py`` ``model_config("base", ...)`` over its
``defaults.yaml``) and its paper's input: region methods run this project's BUTD R101-C4 detector in-process on the
image (:class:`mmf_multilevel.predict.DetectorRegions`, random calibrated weights, 100 boxes, no region cache);
pixel methods read pixels at their base resolution (SOHO: shorter side 600, longer at most 1000; SIMLA: 256 x 256).

* ``ours``: :meth:`Predictor.vqa` from the JPEG's path, stage by stage as ``--profile`` prints them (``decode``,
  ``text``, ``regions`` = detection or ``pixels`` = preprocessing, ``model``), then :meth:`Predictor.picture` on the
  same query (its ``drawing`` stage: the alignment PNG + HTML; its own model pass is not counted again);
* ``reference`` (the same run, the same process): the least a prediction costs, the detector's extractor called
  directly on the decoded image (region methods) + the model called directly on the batch the predictor built.

``ours / reference`` is what the predictor's decoding, tokenising and sample building add. Each figure is the
median of ``--repeats`` timed calls after one untimed call; ours and the reference alternate, so the shared
machine's drift falls on both. ``--record`` appends the table to ``benchmarks/RESULTS.md``.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

IMAGE = (600, 1000)  # height, width
QUESTION = "what color is the circle on the left of the picture?"
STAGES = ("decode", "text", "regions", "pixels", "model", "drawing")

#: per method: the VQA head type, demo model settings kept (the demo's vocabulary and answers), dataset overrides
RECIPES = {
    "semvlp": dict(head="classification", keep=("num_labels",),
                   dataset={"max_features": 100}),
    "soho": dict(head="vqa", keep=("num_answers", "mask_token_id"),
                 dataset={"processors": {"image_processor": {"params": {"eval": {"size": 600, "max_size": 1000}}}}}),
    "simla": dict(head="vqa", keep=("cls_token_id", "sep_token_id", "pad_token_id", "vqa"),
                  dataset={"processors": {"image_processor": {"params": {"eval": {"size": [256, 256]}}}}}),
}


def base_config(method, data_dir):
    """The demo VQA run config with the model at base size (see the module docstring)."""
    from mmf.common.registry import registry
    from omegaconf import OmegaConf, open_dict

    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.methods import benchmarking as bm

    recipe = RECIPES[method]
    config = load_run_config(os.path.join(ROOT, "projects", method, "demo", "vqa.yaml"), [f"env.data_dir={data_dir}"])
    demo = config.model_config[method]
    defaults = OmegaConf.load(registry.get_model_class(method).config_path()).model_config[method]
    adapter = bm.adapter(method)
    mode = adapter.MODES[0]
    model = OmegaConf.merge(defaults, adapter.model_config("base", mode, recipe["head"]))
    with open_dict(model):
        for key in recipe["keep"]:
            if key in demo:
                model[key] = demo[key]
        if "vqa" in recipe["keep"] and "vqa" in demo:  # the demo's answers and vocabulary, the base decoder
            model.vqa = OmegaConf.merge(defaults.get("vqa", {}), {k: demo.vqa[k] for k in ("answer_list", "tokenizer")
                                                                    if k in demo.vqa})
        model.training_head_type = recipe["head"]
    dataset = config.datasets.split(",")[0].strip()
    with open_dict(config):
        config.model_config[method] = model
        config.dataset_config[dataset] = OmegaConf.merge(config.dataset_config[dataset], recipe["dataset"])
    return config


def write_picture(path):
    """A smooth random 600 x 1000 JPEG (compare.py's picture)."""
    from compare import picture

    with open(path, "wb") as handle:
        handle.write(picture("base"))
    return path


def measure(method, args, data_dir, jpeg, out_dir):
    import torch

    from mmf_multilevel.methods.base import load_method_model
    from mmf_multilevel.predict import Predictor
    from mmf_multilevel.predict.inputs import read_image

    torch.manual_seed(0)
    config = base_config(method, data_dir)
    model = load_method_model(config, method, None)
    regions = None
    detector = None
    if "regions" == _input(method):
        from mmf_multilevel.predict.detect import DetectorRegions

        detector = DetectorRegions("butd_r101", random_init=0, device="cpu", min_boxes=100, max_boxes=100, memory=1)
        regions = detector
    predictor = Predictor(model, config, regions=regions, device="cpu")
    params = sum(p.numel() for p in model.parameters()) / 1e6

    def ours():
        if detector is not None:  # every timed query is a new image; the picture's pass reuses its regions
            detector._memory.clear()
        predictor.vqa(jpeg, QUESTION)
        stages = dict(predictor.profile)
        predictor.picture(jpeg, QUESTION, os.path.join(out_dir, f"{method}.png"), os.path.join(out_dir, f"{method}.html"))
        stages["drawing"] = predictor.profile.get("drawing", 0.0)
        stages["total"] = sum(stages.values())
        return stages

    def reference():
        query = read_image(jpeg, "image")
        sample = predictor.visual_sample(jpeg)  # built outside the timing: the reference times the two costs only
        sample.update(predictor.text_fields(QUESTION))
        sample.question_id = torch.tensor(0, dtype=torch.long)
        batch = predictor._batch([sample])
        timing = {}
        if detector is not None:
            start = time.perf_counter()
            detector.extract(query)
            timing["regions"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            model(batch)
        timing["model"] = time.perf_counter() - start
        timing["total"] = sum(timing.values())
        return timing

    ours()
    reference()
    runs = {"ours": [], "reference": []}
    for _ in range(args.repeats):
        runs["ours"].append(ours())
        runs["reference"].append(reference())
    median = {kind: {key: statistics.median(run[key] for run in values) for key in values[0]}
              for kind, values in runs.items()}
    return {"method": method, "input": _input(method), "params_m": params, **median}


def _input(method):
    from mmf_multilevel.methods import benchmarking as bm

    return bm.adapter(method).INPUT


def table(results, args):
    lines = [f"### bench_predict.py ({datetime.date.today().isoformat()})", "",
             f"{platform.machine()}, {os.cpu_count()} cores, torch {_torch_version()}, python {platform.python_version()}; "
             f"a {IMAGE[0]}x{IMAGE[1]} (height x width) JPEG + a {len(QUESTION.split())}-word question through `Predictor.vqa` then "
             f"`Predictor.picture`; medians of {args.repeats} calls after 1 untimed; milliseconds. Region rows: BUTD "
             "R101-C4 in-process (random weights, 100 boxes). reference = the detector's extractor + the model called "
             "directly on the same batch.", "",
             "| method | input | params_m | " + " | ".join(f"{s}_ms" for s in STAGES)
             + " | total_ms | reference_ms | ours / reference (without drawing) |",
             "|---" * (len(STAGES) + 6) + "|"]
    for r in results:
        ours, ref = r["ours"], r["reference"]
        cells = [f"{1000 * ours[s]:.1f}" if s in ours else "" for s in STAGES]
        without = ours["total"] - ours.get("drawing", 0.0)
        lines.append(f"| {r['method']} | {r['input']} | {r['params_m']:.0f} | " + " | ".join(cells)
                     + f" | {1000 * ours['total']:.1f} | {1000 * ref['total']:.1f} | {without / ref['total']:.3f} |")
    return "\n".join(lines) + "\n"


def _torch_version():
    import torch

    return torch.__version__


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(RECIPES), help=f"comma-separated, of {sorted(RECIPES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(RECIPES))
    if unknown:
        parser.error(f"--methods: no recipe for {unknown}; known: {sorted(RECIPES)}")
    import mmf  # noqa: F401  (registers this plugin's methods and datasets)

    from mmf_multilevel.datasets import generate as gen

    with tempfile.TemporaryDirectory() as tmp:
        gen.generate(os.path.join(tmp, "demo"), num_images=4, progress=False)
        jpeg = write_picture(os.path.join(tmp, "query.jpg"))
        results = []
        for method in methods:
            results.append(measure(method, args, tmp, jpeg, tmp))
            print(f"{method}: done", file=sys.stderr, flush=True)
    text = table(results, args)
    print(text)
    if args.record:
        with open(os.path.join(HERE, "RESULTS.md"), "a", encoding="utf-8") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
