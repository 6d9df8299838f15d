"""The demo comparison's report (``projects/semvlp/demo_compare.sh``): from the runs' MMF logs, the
official VQA accuracy of each fine-tuning run, the last logged pre-training losses, and two blind levels of the
demo's val split scored with the official metric: the most frequent training answer, and the most frequent
training answer of the same question text (what a model that ignores the image can reach).

    python -m mmf_multilevel.evaluation.demo --save save/demo_compare --data data/demo

prints a table and writes ``<save>/report.json``.
"""
import argparse
import collections
import json
import os
import re
import sys
from typing import Dict, Optional

from mmf_multilevel.evaluation.vqa import normalize_answer, vqa_official_accuracy

__all__ = ["RUNS", "final_vqa_accuracy", "last_losses", "dictionary_usage", "blind_levels", "report"]

#: (run folder, model, pre-trained?) in the order of the table
RUNS = (
    ("semvlp_vqa_scratch", "SemVLP", False),
    ("semvlp_vqa", "SemVLP", True),
    ("visual_bert_vqa_scratch", "VisualBERT", False),
    ("visual_bert_vqa", "VisualBERT", True),
)
#: ``vqa2`` (region features) or ``vqa2_images`` (raw images: SOHO)
_ACCURACY = re.compile(r"val/(?:mvptr_)?vqa2(?:_images)?/vqa_official_accuracy: ([0-9.]+)")
_LOSS = re.compile(r"(train|val)/([\w]+)/(?:(single|two)/)?(\w+): ([0-9.]+)")
#: the line SOHO's model logs every log_interval updates in pre-training (methods/soho/model.py, log_message)
_USAGE = re.compile(r"soho visual dictionary: last update used (\d+) of (\d+) entries \(perplexity ([0-9.]+)\), "
                    r"never used so far (\d+)")


def _log(folder: str) -> str:
    path = os.path.join(folder, "train.log")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no MMF log (did the run finish?)")
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def final_vqa_accuracy(folder: str) -> float:
    """The last ``val/vqa2/vqa_official_accuracy`` (or ``val/vqa2_images/...``, ``val/mvptr_vqa2/...``) of a run's log (MMF's final
    evaluation of the best checkpoint), in %."""
    found = _ACCURACY.findall(_log(folder))
    if not found:
        raise ValueError(f"{folder}/train.log has no val/vqa2/vqa_official_accuracy")
    return 100.0 * float(found[-1])


def last_losses(folder: str, split: str = "val") -> Dict[str, float]:
    """``{<dataset>/[<mode>/]<loss>: value}``: the last value of each ``split`` loss in a run's log."""
    out = {}
    for kind, dataset, mode, name, value in _LOSS.findall(_log(folder)):
        if kind == split and name != "total_loss":
            out["/".join(p for p in (dataset, mode, name) if p)] = float(value)
    return out


def dictionary_usage(folder: str) -> Optional[Dict[str, float]]:
    """SOHO's visual dictionary at the last logged update of a pre-training run: ``used`` (distinct entries
    the update's real cells chose) of ``size``, the ``perplexity`` of that assignment and the entries
    ``never_used`` in the whole run; None when the log has no such line (not a SOHO pre-training run)."""
    found = _USAGE.findall(_log(folder))
    if not found:
        return None
    used, size, perplexity, never = found[-1]
    return {"used": int(used), "size": int(size), "perplexity": float(perplexity), "never_used": int(never)}


def _read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def blind_levels(data_dir: str) -> dict:
    """Two levels a model that ignores the image can reach on the val split (official accuracy, in %), from
    the train split's human answers (normalised): ``majority`` - the most frequent answer for every
    question; ``question_prior`` - the most frequent answer of the same question text (the demo's
    questions are templates), else the overall majority."""
    annotations = os.path.join(data_dir, "annotations")
    train = _read_jsonl(os.path.join(annotations, "vqa_train.jsonl"))
    val = _read_jsonl(os.path.join(annotations, "vqa_val.jsonl"))
    overall = collections.Counter()
    per_question = collections.defaultdict(collections.Counter)
    for record in train:
        answers = [normalize_answer(a) for a in record["answers"]]
        overall.update(answers)
        per_question[record["question"].strip().lower()].update(answers)
    majority = overall.most_common(1)[0][0]

    def accuracy(answer_of):
        return 100.0 * sum(vqa_official_accuracy(answer_of(record), record["answers"]) for record in val) / len(val)

    def prior(record):
        counts = per_question.get(record["question"].strip().lower())
        return counts.most_common(1)[0][0] if counts else majority

    return {"majority": {"answer": majority, "vqa_accuracy": accuracy(lambda record: majority)},
            "question_prior": {"vqa_accuracy": accuracy(prior)}}


def report(save: str, data_dir: str, out: Optional[str] = None) -> dict:
    """The table of the runs found under ``save`` (a model's pair of runs, both or neither; none at all is
    an error)."""
    result = {"runs": {}}
    for model in sorted({model for _, model, _ in RUNS}):
        pair = [(folder, pretrained) for folder, name, pretrained in RUNS if name == model]
        if not any(os.path.isdir(os.path.join(save, folder)) for folder, _ in pair):
            continue
        for folder, pretrained in pair:
            result["runs"][folder] = {"model": model, "pretrained": pretrained,
                                      "vqa_accuracy": final_vqa_accuracy(os.path.join(save, folder))}
    if not result["runs"]:
        raise FileNotFoundError(f"{save}: no fine-tuning run ({', '.join(folder for folder, _, _ in RUNS)})")
    for folder in ("semvlp_pretrain", "visual_bert_pretrain"):
        if os.path.isdir(os.path.join(save, folder)):
            result["runs"][folder] = {"val_losses": last_losses(os.path.join(save, folder))}
    result.update(blind_levels(data_dir))
    with open(out or os.path.join(save, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    return result


def _print(result):
    runs = result["runs"]
    print("VQA accuracy (official metric, demo val split, best checkpoint), same fine-tuning budget:")
    print(f"  {'model':<11} {'from scratch':>13} {'pre-trained':>12}")
    for model, scratch, pre in (("SemVLP", "semvlp_vqa_scratch", "semvlp_vqa"),
                                ("VisualBERT", "visual_bert_vqa_scratch", "visual_bert_vqa")):
        if scratch not in runs:
            continue
        print(f"  {model:<11} {runs[scratch]['vqa_accuracy']:>12.2f} % {runs[pre]['vqa_accuracy']:>10.2f} %")
    majority = result["majority"]
    print(f"  majority answer ({majority['answer']!r}): {majority['vqa_accuracy']:.2f} %; the most frequent answer "
          f"per question text (a blind model): {result['question_prior']['vqa_accuracy']:.2f} %")
    losses = runs.get("semvlp_pretrain", {}).get("val_losses", {})
    if losses:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(losses.items()))
        print(f"SemVLP pre-training, last val losses: {shown}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.evaluation.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", required=True, help="the demo comparison's save folder (one sub-folder per run)")
    parser.add_argument("--data", required=True, help="the generated demo set (its annotations/ folder)")
    args = parser.parse_args(argv)
    try:
        result = report(args.save, args.data)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    _print(result)


if __name__ == "__main__":
    main()
