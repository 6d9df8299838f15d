"""VQA v2 evaluation: official answer normalisation and accuracy, the answer processor, the MMF metrics,
and MMF rc10's own VQA metrics measured against the official algorithm on hand-made questions."""
import itertools
import logging

import mmf  # noqa: F401  (the compat hook makes rc10 importable)
import numpy as np
import pytest
import torch
from mmf.common.registry import registry
from mmf.common.report import Report
from mmf.common.sample import Sample, SampleList
from mmf.datasets.processors.processors import EvalAIAnswerProcessor, Processor, VQAAnswerProcessor
from mmf.modules.metrics import Metrics, VQAAccuracy, VQAEvalAIAccuracy
from omegaconf import OmegaConf

from mmf_multilevel.metrics import (
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    VQAOfficialAccuracy,
    VQASoftScoreAccuracy,
    accuracy_from_matches,
    comparison_forms,
    encode_answer_keys,
    normalize_answer,
    vqa_official_accuracy,
)
from mmf_multilevel.processors.answers import VQAOfficialAnswerProcessor

VOCAB = ["yes", "no", "2", "dog", "don't", "it's", "red white", "t shirt", "1000", "3"]


def leave_one_out(matching, total=10):
    """Closed form of the official average: `matching` humans gave the answer out of `total`."""
    own = min(1.0, (matching - 1) / 3) if matching else 0.0
    other = min(1.0, matching / 3)
    return (matching * own + (total - matching) * other) / total


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "answers.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def processor(vocab_file):
    return VQAOfficialAnswerProcessor({"vocab_file": str(vocab_file), "num_answers": 10})


@pytest.fixture
def registered():
    """Register processors under '<name>_answer_processor' for the test; unregister afterwards."""
    names = []

    def register(dataset_name, proc):
        key = f"{dataset_name}_answer_processor"
        registry.register(key, proc)
        names.append(key)
        return dataset_name

    yield register
    for key in names:
        registry.unregister(key)


def batch(outputs, dataset_name, **extra):
    samples = []
    for out in outputs:
        fields = {"answers_keys": out["answers_keys"], "targets": out["answers_scores"], "answers": out["answers"]}
        samples.append(Sample(fields))
    sample_list = SampleList(samples)
    sample_list.dataset_name = dataset_name
    sample_list.dataset_type = "val"
    for key, value in extra.items():
        sample_list[key] = value
    return sample_list


def one_hot_scores(indices, width):
    scores = torch.full((len(indices), width), -5.0)
    for row, index in enumerate(indices):
        scores[row, index] = 5.0
    return scores


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("  yes\t", "yes"),
        ("\nno\n", "no"),
        ("two", "2"),
        ("Two Dogs", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("the dog", "dog"),
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("a an the", ""),
        ("theater", "theater"),
        ("dont", "don't"),
        ("whats that", "what's that"),
        ("couldnt've", "couldn't've"),
        ("couldntve", "couldntve"),
        ("somebody'd", "somebodyd"),
        ("Im", "im"),
        ("1,000", "1000"),
        ("red,white", "red white"),
        ("red, white", "red white"),
        ("red/white", "red white"),
        ("t-shirt", "t shirt"),
        ("1,000-2,000", "10002000"),
        ("what?!", "what"),
        ("1.5", "1.5"),
        ("3.", "3"),
        ("x.y", "xy"),
        ("2:30", "2:30"),
        ("girl's", "girl's"),
        ("a*b", "a*b"),
        ("." * 40, "." * 8),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalisation_tables_equal_the_official_ones_shipped_in_mmf():
    official = EvalAIAnswerProcessor.CONTRACTIONS  # MMF's copy of the official table
    reachable = {k: v for k, v in official.items() if k == k.lower()}  # text is lower-cased before lookup
    assert CONTRACTIONS == reachable
    assert len(official) - len(reachable) == 4
    assert NUMBER_WORDS == EvalAIAnswerProcessor.NUMBER_MAP
    assert list(PUNCTUATION) == EvalAIAnswerProcessor.PUNCTUATIONS


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="must be a str"):
        normalize_answer(3)


# ------------------------------------------------------------------------------------------------
# Official accuracy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_accuracy_by_number_of_matching_humans(matching, expected):
    answers = ["yes"] * matching + ["no", "maybe"] * 5
    answers = answers[:10]
    assert vqa_official_accuracy("yes", answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("total", [1, 3, 5, 10])
def test_accuracy_matches_closed_form_for_every_count(total):
    for matching in range(total + 1):
        answers = ["yes"] * matching + [f"other{i}" for i in range(total - matching)]
        assert vqa_official_accuracy("yes", answers) == pytest.approx(leave_one_out(matching, total), abs=1e-12)


def test_accuracy_sums_in_annotation_order_like_the_official_code():
    # Mathematically 0.6 wherever the two "yes" are; the float depends on the order of the per-human terms,
    # and the official code adds them left to right in annotation order.
    seen = set()
    for positions in itertools.combinations(range(10), 2):
        answers = ["yes" if i in positions else "no" for i in range(10)]
        total = 0.0
        for i in range(10):
            total += min(1.0, float(2 - (i in positions)) / 3)
        value = vqa_official_accuracy("yes", answers)
        assert value == total / 10  # bit-identical, not approximately
        assert value == pytest.approx(0.6, abs=1e-12)
        seen.add(value)
    assert len(seen) > 1  # so the order really matters at the last bit


def test_accuracy_normalises_both_sides_when_humans_disagree():
    answers = ["Two.", "two", "2", "no", "no", "no", "no", "no", "no", "no"]
    assert vqa_official_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_official_accuracy("TWO", answers) == pytest.approx(0.9)
    assert vqa_official_accuracy("a dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_official_accuracy("dont", ["don't"] * 4 + ["no"] * 6) == pytest.approx(1.0)


def test_unanimous_answers_are_compared_without_normalisation():
    # The official code normalises only when the (stripped) human answers are not all identical.
    assert vqa_official_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_official_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_official_accuracy(" Yes\n", ["Yes"] * 10) == 1.0
    assert vqa_official_accuracy("yes", ["Yes"] * 9 + ["yes"]) == 1.0  # not unanimous: normalised
    forms, normalized = comparison_forms(["Yes\t"] * 10)
    assert forms == ["Yes"] * 10 and normalized is False


def test_accuracy_input_errors():
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_official_accuracy("yes", [])
    with pytest.raises(TypeError, match=r"gt_answers\[1\] must be a str"):
        vqa_official_accuracy("yes", ["yes", None])
    with pytest.raises(TypeError, match="list of answer strings"):
        vqa_official_accuracy("yes", "yes")
    with pytest.raises(TypeError, match="prediction must be a str"):
        vqa_official_accuracy(1, ["yes"])
    with pytest.raises(ValueError, match="at least one"):
        accuracy_from_matches([])


# ------------------------------------------------------------------------------------------------
# MMF rc10's metrics against the official algorithm
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def mmf_vqa(tmp_path, registered):
    """MMF's own pipeline: the `vqa_answer` processor (simple_word preprocessor, as in MMF's VQA configs)
    feeding `vqa_accuracy`, and `vqa_evalai_accuracy` on the raw answers."""
    path = tmp_path / "mmf_answers.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    config = OmegaConf.create(
        {"vocab_file": str(path), "num_answers": 10, "preprocessor": {"type": "simple_word", "params": {}}}
    )
    mmf_processor = VQAAnswerProcessor(config)
    name = registered("mmf_rc10_vqa", mmf_processor)

    def run(prediction, answers):
        out = mmf_processor({"answers": list(answers)})
        scores = one_hot_scores([mmf_processor.word2idx(prediction)], mmf_processor.get_vocab_size())
        sample_list = SampleList([Sample({"targets": out["answers_scores"]})])
        sample_list.dataset_name = name
        sample_list.answers = [list(answers)]
        sample_list.context_tokens = [[]]
        return (
            VQAAccuracy()(sample_list, {"scores": scores}).item(),
            VQAEvalAIAccuracy()(sample_list, {"scores": scores}).item(),
        )

    return run


@pytest.mark.parametrize("matching", [1, 2, 3, 4])
def test_mmf_agrees_on_plain_answers(mmf_vqa, matching):
    answers = ["yes"] * matching + ["no"] * (10 - matching)
    vqa_accuracy, evalai = mmf_vqa("yes", answers)
    official = vqa_official_accuracy("yes", answers)
    assert vqa_accuracy == pytest.approx(official, abs=1e-6)  # float32 soft score
    assert evalai == pytest.approx(official, abs=1e-6)


@pytest.mark.parametrize(
    "prediction, answers, official, mmf_vqa_accuracy, mmf_evalai",
    [
        # number words: MMF's soft scores never normalise "two" to "2"
        ("2", ["two"] * 3 + ["2"] + ["no"] * 6, 1.0, 0.3, 1.0),
        ("2", ["2."] * 2 + ["no"] * 8, 0.6, 0.0, 0.6),
        # articles, contractions, possessive 's, hyphen
        ("dog", ["a dog"] * 3 + ["no"] * 7, 0.9, 0.0, 0.9),
        ("don't", ["dont"] * 3 + ["no"] * 7, 0.9, 0.0, 0.9),
        ("it's", ["it's"] * 3 + ["no"] * 7, 0.9, 0.0, 0.9),
        ("t shirt", ["t-shirt"] * 3 + ["no"] * 7, 0.9, 0.0, 0.9),
        # a comma between words: EvalAI's processor deletes it ("redwhite"), the official code spaces it
        ("red white", ["red,white"] * 3 + ["no"] * 7, 0.9, 0.0, 0.0),
        # unanimous answers are not normalised by the official code; MMF always preprocesses
        ("yes", ["Yes"] * 10, 0.0, 1.0, 1.0),
        ("2", ["two"] * 10, 0.0, 0.0, 1.0),
        # fewer than 10 answers: MMF's processor repeats them up to 10
        ("yes", ["yes", "yes", "no", "no", "no"], leave_one_out(2, 5), 1.0, leave_one_out(2, 5)),
    ],
)
def test_mmf_differs_from_official(mmf_vqa, prediction, answers, official, mmf_vqa_accuracy, mmf_evalai):
    assert vqa_official_accuracy(prediction, answers) == pytest.approx(official, abs=1e-12)
    got_vqa_accuracy, got_evalai = mmf_vqa(prediction, answers)
    assert got_vqa_accuracy == pytest.approx(mmf_vqa_accuracy, abs=1e-6)
    assert got_evalai == pytest.approx(mmf_evalai, abs=1e-6)


def test_mmf_vqa_accuracy_masks_column_zero_even_without_unk():
    # With a vocabulary without <unk> (the standard 3,129 answers), the first answer can never be predicted.
    targets = torch.tensor([[1.0, 0.3, 0.0]])
    sample_list = SampleList([Sample({"targets": targets[0]})])
    scores = torch.tensor([[9.0, 0.0, 0.0]])
    assert VQAAccuracy()(sample_list, {"scores": scores}).item() == pytest.approx(0.3)
    assert VQASoftScoreAccuracy()(sample_list, {"scores": scores}).item() == pytest.approx(1.0)
    assert VQASoftScoreAccuracy(mask_index=0)(sample_list, {"scores": scores}).item() == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------------
# The answer processor
# ------------------------------------------------------------------------------------------------

SAMPLES = [
    ["two"] * 3 + ["2"] + ["no"] * 2 + ["cat"] * 4,
    ["yes"] * 10,
    ["Yes"] * 10,  # unanimous, not the vocabulary's spelling: the official evaluation gives 0 to "yes"
    ["A dog", "dog", "the dog.", "dogs", "cat", "cat", "cat", "cat", "dont", "don't"],
    ["1,000"] * 2 + ["1000"] + ["3."] + ["three"] * 2 + ["zebra"] * 4,
    ["red,white", "red white", "red/white", "t-shirt", "T shirt", "it's", "its", "no", "yes", "2"],
]


@pytest.mark.parametrize("answers", SAMPLES)
def test_soft_targets_are_the_official_accuracy_of_every_entry(processor, answers):
    out = processor({"answers": answers})
    assert out["answers"] == answers
    assert out["answers_scores"].shape == (len(VOCAB),) and out["answers_scores"].dtype == torch.float32
    expected = torch.tensor([vqa_official_accuracy(word, answers) for word in VOCAB])
    assert torch.allclose(out["answers_scores"], expected, atol=1e-7)
    assert out["answers_keys"].shape == (10,) and out["answers_keys"].dtype == torch.long
    assert torch.equal(out["answers_keys"], encode_answer_keys(answers))


@pytest.mark.parametrize("total", [3, 5])
def test_soft_targets_for_other_answer_counts(vocab_file, total):
    # With 10 answers the official average equals min(1, 0.3 * matches); with other counts it does not.
    proc = VQAOfficialAnswerProcessor({"vocab_file": str(vocab_file), "num_answers": total})
    answers = ["yes", "yes"] + ["no"] * (total - 2)
    scores = proc({"answers": answers})["answers_scores"]
    assert scores[VOCAB.index("yes")].item() == pytest.approx(leave_one_out(2, total), abs=1e-7)
    assert scores[VOCAB.index("no")].item() == pytest.approx(leave_one_out(total - 2, total), abs=1e-7)


def test_processor_outputs(processor):
    out = processor({"answers": SAMPLES[0]})
    scores = dict(zip(VOCAB, out["answers_scores"].tolist()))
    assert scores["2"] == pytest.approx(1.0)  # "two" x3 + "2" = 4 humans
    assert scores["no"] == pytest.approx(0.6)
    assert sum(scores.values()) == pytest.approx(1.6)
    assert out["answers_indices"].tolist() == [2, 2, 2, 2, 1, 1, -1, -1, -1, -1]
    out = processor({"answers": SAMPLES[3]})
    assert out["answers_scores"][VOCAB.index("dog")].item() == pytest.approx(0.9)
    assert out["answers_scores"][VOCAB.index("don't")].item() == pytest.approx(0.6)


def test_processor_accepts_official_annotation_dicts(processor):
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(SAMPLES[0])]
    out = processor({"answers": answers, "question_id": 7})
    expected = processor({"answers": SAMPLES[0]})["answers_scores"]
    assert torch.equal(out["answers_scores"], expected)
    # MMF's .npy imdbs may hold the answers as numpy arrays
    assert torch.equal(processor({"answers": np.array(SAMPLES[0])})["answers_scores"], expected)


def test_processor_mmf_interface(processor, vocab_file):
    assert processor.get_vocab_size() == processor.get_true_vocab_size() == len(VOCAB)
    assert processor.idx2word(3) == "dog"
    assert processor.word2idx("The Dog.") == 3
    with pytest.raises(KeyError, match=r"'zebra'.*answers\.txt"):
        processor.word2idx("zebra")
    with pytest.raises(IndexError, match="outside the vocabulary"):
        processor.idx2word(len(VOCAB))
    assert registry.get_processor_class("vqa_official_answer") is VQAOfficialAnswerProcessor
    # As MMF's datasets build it: Processor wrapper, OmegaConf params, data_dir, a relative vocab_file.
    config = OmegaConf.create({"type": "vqa_official_answer", "params": {"vocab_file": vocab_file.name}})
    wrapped = Processor(config, data_dir=str(vocab_file.parent))
    assert wrapped.get_vocab_size() == len(VOCAB)
    assert wrapped({"answers": ["yes"] * 10})["answers_scores"][0].item() == 1.0


def test_unk_entry_is_reserved(tmp_path):
    path = tmp_path / "with_unk.txt"
    path.write_text("<unk>\nyes\nunk\n", encoding="utf-8")
    proc = VQAOfficialAnswerProcessor({"vocab_file": str(path)})
    out = proc({"answers": ["unk"] * 5 + ["yes"] * 5})
    assert out["answers_scores"].tolist() == [0.0, 1.0, 1.0]  # "<unk>" would normalise to "unk" too
    plain = VQAOfficialAnswerProcessor({"vocab_file": str(path), "unk_token": None})
    assert plain({"answers": ["unk"] * 5 + ["yes"] * 5})["answers_scores"].tolist() == [1.0, 1.0, 1.0]


def test_out_of_vocabulary_policies(vocab_file, caplog):
    answers_some = ["yes"] * 6 + ["zebra"] * 4
    answers_none = ["zebra"] * 6 + ["giraffe"] * 4
    proc = VQAOfficialAnswerProcessor({"vocab_file": str(vocab_file)})
    out = proc({"answers": answers_some})
    assert out["answers_scores"].sum().item() == pytest.approx(1.0)  # OOV humans still count as humans
    with caplog.at_level(logging.WARNING):
        out = proc({"answers": answers_none, "question_id": 42})
    assert out["answers_scores"].sum().item() == 0.0
    assert out["answers_indices"].tolist() == [-1] * 10
    assert (proc.num_samples, proc.num_oov_answers, proc.num_all_oov) == (2, 14, 1)
    assert "question_id 42 has no answer in the answer vocabulary" in caplog.text

    strict_all = VQAOfficialAnswerProcessor({"vocab_file": str(vocab_file), "oov": "error_if_all"})
    strict_all({"answers": answers_some})
    message = r"question_id 42: none of its answers is in the answer vocabulary .*answers\.txt: 'zebra'"
    with pytest.raises(ValueError, match=message):
        strict_all({"answers": answers_none, "question_id": 42})
    strict = VQAOfficialAnswerProcessor({"vocab_file": str(vocab_file), "oov": "error"})
    with pytest.raises(ValueError, match=r"a question: answers not in the answer vocabulary .*'zebra', 'zebra'"):
        strict({"answers": answers_some})


@pytest.mark.parametrize(
    "item, error, message",
    [
        ({"answers": ["yes"] * 9}, ValueError, r"field 'answers' \(question_id 5\) has 9 answers, expected 10"),
        ({"answers": ["yes"] * 11}, ValueError, "has 11 answers, expected 10"),
        ({"answers": "yes"}, TypeError, "must be a list of 10 answers"),
        ({"answers": ["yes"] * 9 + [3]}, TypeError, r"'answers'\[9\].*must be a string"),
        ({"answers": ["yes"] * 9 + [{"id": 1}]}, TypeError, r"'answers'\[9\]"),
        ({"question": "what?"}, KeyError, "expects a dict with an 'answers' list"),
    ],
)
def test_processor_input_errors(processor, item, error, message):
    if isinstance(item.get("answers"), list) and len(item["answers"]) == 9:
        item = dict(item, question_id=5)
    with pytest.raises(error, match=message):
        processor(item)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty: expected one answer per line"),
        ("\n\n", "is empty"),
        ("yes\nno\nyes\n", r"line 3: duplicate entry 'yes' \(first on line 1\)"),
        ("yes\n\nno\n", "line 2: blank line"),
        (b"yes\n\xff\n", "line 2: not valid UTF-8"),
    ],
)
def test_vocabulary_file_errors(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as info:
        VQAOfficialAnswerProcessor({"vocab_file": str(path)})
    assert str(path) in str(info.value)


def test_configuration_errors(tmp_path, vocab_file):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        VQAOfficialAnswerProcessor({"vocab_file": str(tmp_path / "nope.txt")})
    with pytest.raises(FileNotFoundError, match=r"'nope.txt' \(looked for .*data/nope.txt"):
        VQAOfficialAnswerProcessor({"vocab_file": "nope.txt"}, data_dir=str(tmp_path / "data"))
    with pytest.raises(ValueError, match="'vocab_file' is required"):
        VQAOfficialAnswerProcessor({})
    with pytest.raises(ValueError, match="'oov' must be one of ignore, error_if_all, error"):
        VQAOfficialAnswerProcessor({"vocab_file": str(vocab_file), "oov": "skip"})
    with pytest.raises(ValueError, match="'num_answers' must be >= 1"):
        VQAOfficialAnswerProcessor({"vocab_file": str(vocab_file), "num_answers": 0})


def test_vocabulary_entries_that_normalise_alike_share_targets(tmp_path, caplog):
    path = tmp_path / "collide.txt"
    path.write_text("2\nTwo\nno\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        proc = VQAOfficialAnswerProcessor({"vocab_file": str(path)})
    assert "normalise to the same answer" in caplog.text
    scores = proc({"answers": ["two"] * 2 + ["no"] * 8})["answers_scores"].tolist()
    assert scores == pytest.approx([0.6, 0.6, 1.0])


# ------------------------------------------------------------------------------------------------
# The registered metrics
# ------------------------------------------------------------------------------------------------


def test_official_metric_on_a_sample_list(processor, registered):
    name = registered("vqa_eval_test", processor)
    outputs = [processor({"answers": answers}) for answers in SAMPLES]
    predictions = ["2", "yes", "yes", "dog", "1000", "red white"]
    expected = [vqa_official_accuracy(p, a) for p, a in zip(predictions, SAMPLES)]
    assert expected == pytest.approx([1.0, 1.0, 0.0, 0.9, 0.9, 0.9])
    sample_list = batch(outputs, name)
    scores = one_hot_scores([VOCAB.index(p) for p in predictions], len(VOCAB))

    metric = VQAOfficialAccuracy()
    value = metric(sample_list, {"scores": scores})
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(sum(expected) / len(expected), abs=1e-12)

    # The raw strings give the same value when the keys are absent.
    del sample_list["answers_keys"]
    assert metric(sample_list, {"scores": scores}).item() == pytest.approx(value.item(), abs=1e-12)

    # The soft-score shortcut agrees up to float32 targets.
    soft = VQASoftScoreAccuracy()(batch(outputs, name), {"scores": scores})
    assert soft.item() == pytest.approx(value.item(), abs=1e-6)


def test_official_metric_every_prediction_every_sample(processor, registered):
    name = registered("vqa_eval_exhaustive", processor)
    outputs = [processor({"answers": answers}) for answers in SAMPLES]
    metric = VQAOfficialAccuracy()
    for index, word in enumerate(VOCAB):
        for row, answers in enumerate(SAMPLES):
            value = metric(batch([outputs[row]], name), {"scores": one_hot_scores([index], len(VOCAB))})
            assert value.item() == vqa_official_accuracy(word, answers), (word, answers)


def test_official_metric_through_mmf_evaluation_accumulation(processor, registered):
    """MMF's evaluation loop concatenates only tensor fields across batches; answers_keys survives it."""
    name = registered("vqa_eval_accumulate", processor)
    metrics = Metrics(["vqa_official_accuracy", "vqa_soft_score_accuracy"])
    assert {"scores", "answers_keys", "targets"} <= set(metrics.required_params)
    predictions = ["2", "yes", "yes", "dog", "1000", "red white"]
    reports = []
    for start in (0, 3):
        outputs = [processor({"answers": a}) for a in SAMPLES[start : start + 3]]
        scores = one_hot_scores([VOCAB.index(p) for p in predictions[start : start + 3]], len(VOCAB))
        reports.append(Report(batch(outputs, name), {"scores": scores}))
    combined = reports[0]
    combined.accumulate_tensor_fields(reports[1], metrics.required_params)
    assert combined.answers_keys.shape == (6, 10) and len(combined.answers) == 3  # the list is not accumulated
    values = metrics(combined, combined)
    expected = sum(vqa_official_accuracy(p, a) for p, a in zip(predictions, SAMPLES)) / 6
    assert values[f"val/{name}/vqa_official_accuracy"].item() == pytest.approx(expected, abs=1e-6)
    assert values[f"val/{name}/vqa_soft_score_accuracy"].item() == pytest.approx(expected, abs=1e-6)

    # Without the keys the stale list is detected, not silently scored.
    del combined["answers_keys"]
    with pytest.raises(ValueError, match="'answers' holds 3 questions but 'scores' has 6 rows"):
        VQAOfficialAccuracy()(combined, combined)


def test_official_metric_with_mmf_answer_processor(tmp_path, registered):
    """Any MMF answer processor with idx2word works; its <unk> entry never matches."""
    path = tmp_path / "mmf_vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    config = {"vocab_file": str(path), "num_answers": 10, "preprocessor": {"type": "simple_word", "params": {}}}
    mmf_processor = VQAAnswerProcessor(OmegaConf.create(config))
    name = registered("vqa_eval_mmf_processor", mmf_processor)
    sample_list = SampleList([Sample({"answers_keys": encode_answer_keys(SAMPLES[0])})])
    sample_list.dataset_name = name
    scores = one_hot_scores([mmf_processor.word2idx("2")], mmf_processor.get_vocab_size())
    assert VQAOfficialAccuracy()(sample_list, {"scores": scores}).item() == pytest.approx(1.0)


def test_metric_errors(processor, registered):
    name = registered("vqa_eval_errors", processor)
    good = batch([processor({"answers": SAMPLES[0]})], name)
    metric = VQAOfficialAccuracy()
    with pytest.raises(ValueError, match=f"'scores' have 4 columns but the answer vocabulary has {len(VOCAB)}"):
        metric(good, {"scores": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="'answers_keys' has 1 rows but 'scores' has 2"):
        metric(good, {"scores": torch.zeros(2, len(VOCAB))})
    missing = batch([processor({"answers": SAMPLES[0]})], "no_such_dataset")
    with pytest.raises(RuntimeError, match="no answer processor registered as 'no_such_dataset_answer_processor'"):
        metric(missing, {"scores": torch.zeros(1, len(VOCAB))})
    bare = SampleList([Sample({"targets": torch.zeros(len(VOCAB))})])
    bare.dataset_name = name
    with pytest.raises(KeyError, match="needs 'answers_keys'"):
        metric(bare, {"scores": torch.zeros(1, len(VOCAB))})
    # An explicit processor key overrides the dataset's.
    assert VQAOfficialAccuracy(processor_key=f"{name}_answer_processor")(
        missing, {"scores": one_hot_scores([2], len(VOCAB))}
    ).item() == pytest.approx(1.0)
