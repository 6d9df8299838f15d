"""The demo comparison's report (mmf_multilevel/evaluation/demo.py): accuracies from MMF logs and the
majority-answer level, against hand-computed values."""
import json

import pytest

from mmf_multilevel.evaluation import demo


def write_log(folder, lines):
    folder.mkdir(parents=True)
    (folder / "train.log").write_text("\n".join(lines) + "\n")


def test_report_reads_the_final_accuracy_and_the_last_losses(tmp_path):
    save, data = tmp_path / "save", tmp_path / "data"
    for i, (name, _, _) in enumerate(demo.RUNS):
        write_log(save / name, [f"progress: 500/1500, val/vqa2/vqa_official_accuracy: 0.{i}000, x: 1",
                                f"progress: 1500/1500, val/vqa2/vqa_official_accuracy: 0.{i}5{i}0, x: 1"])
    write_log(save / "semvlp_pretrain", [
        "progress: 300/600, val/coco_captions/single/itm: 0.6931, val/coco_captions/single/mrc: 1.30, val/total_loss: 3",
        "progress: 600/600, val/coco_captions/single/itm: 0.4000, train/coco_captions/single/itm: 0.1, val/total_loss: 2",
    ])
    (data / "annotations").mkdir(parents=True)
    train = [{"question": "is it red?", "answers": ["yes"] * 6 + ["2"] * 4},
             {"question": "Is it blue?", "answers": ["Yes."] * 5 + ["no"] * 5},
             {"question": "is it blue?", "answers": ["no"] * 3}]
    val = [{"question": "is it red?", "answers": ["yes"] * 10}, {"question": "is it blue?", "answers": ["yes"] * 2 + ["no"] * 8},
           {"question": "how many?", "answers": ["no"] * 10}]
    for split, records in (("train", train), ("val", val)):
        (data / "annotations" / f"vqa_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    result = demo.report(str(save), str(data))
    assert [result["runs"][name]["vqa_accuracy"] for name, _, _ in demo.RUNS] == pytest.approx([5.0, 15.1, 25.2, 35.3])
    assert result["runs"]["semvlp_pretrain"]["val_losses"] == {"coco_captions/single/itm": 0.4,
                                                              "coco_captions/single/mrc": 1.30}
    # "yes" (11 of 23 train answers, "Yes." normalised) scores 100 %, 60 % (2 of 10 humans: the mean of
    # min(1, matches / 3) over the ten leave-one-out subsets, (2 * 1/3 + 8 * 2/3) / 10) and 0 %
    assert result["majority"]["answer"] == "yes"
    assert result["majority"]["vqa_accuracy"] == pytest.approx(100 * (1 + 0.6) / 3)
    # per question text: "is it red?" -> yes (100 %), "is it blue?" -> no (8 of 13 answers; 100 %), an unseen
    # question -> the overall majority "yes" (0 %)
    assert result["question_prior"]["vqa_accuracy"] == pytest.approx(100 * 2 / 3)
    assert json.loads((save / "report.json").read_text()) == result


def test_missing_runs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fine-tuning run"):
        demo.report(str(tmp_path), str(tmp_path))
    write_log(tmp_path / "semvlp_vqa", ["val/vqa2/vqa_official_accuracy: 0.5"])
    with pytest.raises(FileNotFoundError, match="semvlp_vqa_scratch/train.log"):  # half a pair
        demo.report(str(tmp_path), str(tmp_path))
    write_log(tmp_path / "x", ["no accuracy here"])
    with pytest.raises(ValueError, match="vqa_official_accuracy"):
        demo.final_vqa_accuracy(str(tmp_path / "x"))


def test_soho_runs_vqa2_images_accuracy_and_dictionary_usage(tmp_path):
    """SOHO's runs log ``val/vqa2_images/...`` (raw images) and the dictionary's usage line."""
    write_log(tmp_path / "vqa", ["progress: 100/200, val/vqa2_images/vqa_official_accuracy: 0.2500, x: 1",
                                 "progress: 200/200, val/vqa2_images/vqa_official_accuracy: 0.3125, x: 1"])
    assert demo.final_vqa_accuracy(str(tmp_path / "vqa")) == pytest.approx(31.25)
    write_log(tmp_path / "pretrain", [
        "soho visual dictionary: last update used 14 of 64 entries (perplexity 11.6), never used so far 27; ResNet frozen",
        "soho visual dictionary: last update used 9 of 64 entries (perplexity 6.5), never used so far 30; ResNet training"])
    assert demo.dictionary_usage(str(tmp_path / "pretrain")) == {"used": 9, "size": 64, "perplexity": 6.5,
                                                                 "never_used": 30}
    assert demo.dictionary_usage(str(tmp_path / "vqa")) is None
