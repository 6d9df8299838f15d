"""μ-VLA pre-training datasets (R-T, R-P, I-S) on a weak corpus written in the weak-corpus builder's
exact record format: inputs, targets, masking rates over many samples, bad records."""
import json
import os

import mmf  # noqa: F401  (applies the compatibility layer, registers our components)
import pytest
import torch
from mmf.common.registry import registry
from mmf.common.sample import SampleList
from omegaconf import OmegaConf

from helpers.stats import assert_rate
from mmf_multilevel.datasets import generate as gen
from mmf_multilevel.datasets.annotations import AnnotationError
from mmf_multilevel.features import FeatureCacheReader
from mmf_multilevel.methods.muvla.data import ImageSentenceDataset, RegionPhraseDataset, RegionTagDataset
from mmf_multilevel.methods.muvla.network import TASK_IDS
from mmf_multilevel.modules.visual import normalize_boxes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "mmf_multilevel", "methods", "muvla", "configs")
DIM, MAXF = 16, 6

CAPTIONS = [
    ("a red circle and a blue square on a plain background.", ["a red circle", "a blue square", "a plain background"]),
    ("there are two shapes.", ["two shapes"]),
    ("a green triangle and a white diamond.", ["a green triangle", "a white diamond"]),
]
SCORE = {"circle": 2.0, "square": 1.5, "triangle": 1.2, "diamond": 1.8}


def weak_record(image_id, objects, object_ids, captions):
    """A record as the weak-corpus builder writes it; tag o links to the caption phrase that contains it."""
    cs, arg = [], []
    for tag in objects:
        row_s, row_a = [], []
        for _, phrases in captions:
            k = next((i for i, p in enumerate(phrases) if tag in p.split()), -1)
            row_s.append(SCORE[tag] if k >= 0 else 0.0)
            row_a.append(k)
        cs.append(row_s)
        arg.append(row_a)
    return {"image_id": image_id, "captions": [c for c, _ in captions], "caption_ids": list(range(len(captions))),
            "retrieval_scores": [0.9] * len(captions), "query": " ".join(sorted(set(objects))), "objects": objects,
            "objects_ids": object_ids, "noun_phrases": [p for _, p in captions], "objects_cs": cs, "objects_cs_arg": arg}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("muvla_data") / "demo"
    gen.generate(out, num_images=12, feature_dim=DIM, seed=5, progress=False, images=False)
    reader = FeatureCacheReader(str(out / "features" / "regions.lmdb"))
    ids = sorted({json.loads(line)["image_id"] for line in open(out / "annotations" / "captions_train.jsonl")})
    for name, captions in (("weak.jsonl", CAPTIONS), ("weak_k1.jsonl", CAPTIONS[:1])):
        with open(out / name, "w") as f:
            for image_id in ids:
                stored = reader.get(image_id)
                classes = [int(c) for c in stored["objects"]]
                objects = [gen.SHAPES[c] for c in classes]
                f.write(json.dumps(weak_record(image_id, objects, classes, captions)) + "\n")
    return out


def make(cls, name, demo, annotations="weak.jsonl", **overrides):
    config = OmegaConf.load(os.path.join(CONFIGS, f"{name}.yaml")).dataset_config[name]
    config.data_dir = str(demo)
    config.annotations = {"train": annotations, "val": annotations, "test": annotations}
    config.feature_dim, config.max_features = DIM, MAXF
    config.processors.text_processor.params.tokenizer_config.type = str(demo / "vocab")
    config.processors.text_processor.params.max_seq_length = 20
    for dotted, value in overrides.items():
        OmegaConf.update(config, dotted, value, merge=False)
    for key in config.processors:
        registry.unregister(f"{name}_{key}")
    dataset = cls(name, config, "train")
    dataset.init_processors()
    return dataset


def tokens(dataset, ids):
    return dataset.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


# ----------------------------------------------------------------------------------------- R-T
def test_region_tag_sample_carries_tags_with_their_region_boxes_and_mrc_labels(demo):
    ds = make(RegionTagDataset, "muvla_region_tag", demo, mlm_probability=0.0, region_mask_probability=0.0)
    sample, record = ds[0], ds.records[0]
    count = int(sample.image_info_0.max_features)
    pieces = [p for tag in record["objects"][:count] for p in ds.tokenizer.tokenize(tag)]
    assert tokens(ds, sample.input_ids[: len(pieces) + 2]) == ["[CLS]"] + pieces + ["[SEP]"]
    assert sample.input_mask.sum().item() == len(pieces) + 2
    info = sample.image_info_0
    boxes = normalize_boxes(info.bbox[:count], int(info.image_width), int(info.image_height), "5d")
    row = 1
    for i, tag in enumerate(record["objects"][:count]):
        for _ in ds.tokenizer.tokenize(tag):
            torch.testing.assert_close(sample.tag_boxes[row], boxes[i])
            row += 1
    assert sample.tag_boxes[0].abs().sum() == 0 and sample.tag_boxes[row:].abs().sum() == 0
    assert sample.mrc_labels[:count].tolist() == record["objects_ids"][:count]
    assert (sample.mrc_labels[count:] == -1).all()
    assert int(sample.muvla_task) == TASK_IDS["region_tag"]
    assert (sample.lm_label_ids < 0).all() and not sample.region_selected.any()


def test_region_tag_masking_rates_over_many_samples(demo):
    ds = make(RegionTagDataset, "muvla_region_tag", demo)
    torch.manual_seed(0)
    tok_sel = tok_all = reg_sel = reg_all = zeroed = 0
    for _ in range(25):
        for i in range(len(ds)):
            s = ds[i]
            real = s.input_mask.bool().clone()
            real[0] = False
            real[int(s.input_mask.sum()) - 1] = False
            tok_all += int(real.sum())
            tok_sel += int((s.lm_label_ids >= 0).sum())
            count = int(s.image_info_0.max_features)
            assert not s.region_selected[count:].any()
            reg_all += count
            reg_sel += int(s.region_selected.sum())
            zeroed += int(s.region_zeroed.sum())
            assert not (s.region_zeroed & ~s.region_selected).any()
    assert_rate(tok_sel / tok_all, 0.15, tok_all, what="tag word-pieces masked")
    assert_rate(reg_sel / reg_all, 0.15, reg_all, what="regions selected")
    assert_rate(zeroed / reg_sel, 0.9, reg_sel, what="selected regions zeroed")


# ----------------------------------------------------------------------------------------- R-P
def phrase_spans(ds, record):
    """{word-piece position in the sample: phrase index} of caption 0's linked phrases."""
    pieces = ds.tokenizer.tokenize(record["captions"][0])
    spans, start = {}, 0
    for k, phrase in enumerate(record["noun_phrases"][0]):
        p = ds.tokenizer.tokenize(phrase)
        for s in range(start, len(pieces) - len(p) + 1):
            if pieces[s: s + len(p)] == p:
                spans.update({1 + s + t: k for t in range(len(p))})
                start = s + len(p)
                break
    return spans


def test_region_phrase_paper_masks_one_modality_linked_spans_and_regions_at_rate_proportional_to_score(demo):
    ds = make(RegionPhraseDataset, "muvla_region_phrase", demo, "weak_k1.jsonl")
    torch.manual_seed(1)
    import random

    random.seed(1)
    text_samples = region_samples = 0
    region_hits = {}  # score -> [selected, total]
    token_hits = {}
    chosen = []  # the side each sample masked, as the dataset chose it
    choose = ds.choose_side
    ds.choose_side = lambda *args: chosen.append(choose(*args)) or chosen[-1]
    for _ in range(60):
        for i in range(len(ds)):
            s, record = ds[i], ds.records[i]
            text_masked = bool((s.lm_label_ids >= 0).any())
            region_masked = bool(s.region_selected.any())
            assert not (text_masked and region_masked), "paper mode masks one modality per sample"
            scores = ds.phrase_scores(record, 0)
            spans = phrase_spans(ds, record)
            linked_positions = {p for p, k in spans.items() if scores[k] > 0}
            masked_positions = set((s.lm_label_ids >= 0).nonzero().view(-1).tolist())
            assert masked_positions <= linked_positions
            count = int(s.image_info_0.max_features)
            side = chosen[-1]
            assert side in ("text", "regions") and not (side == "text" and region_masked)
            assert not (side == "regions" and text_masked)
            if side == "text":
                # rp_text_unit: phrase - a phrase's pieces are masked all together or not at all
                for k in set(spans.values()):
                    state = {p in masked_positions for p, kk in spans.items() if kk == k}
                    assert len(state) == 1, (k, spans, masked_positions)
                text_samples += 1
                for p in linked_positions:
                    hit = token_hits.setdefault(scores[spans[p]], [0, 0])
                    hit[0] += p in masked_positions
                    hit[1] += 1
                continue
            region_samples += 1
            for r in range(count):
                score = record["objects_cs"][r][0]
                hit = region_hits.setdefault(score, [0, 0])
                hit[0] += bool(s.region_selected[r])
                hit[1] += 1
                if s.region_selected[r]:
                    # p-MRTC: a word-piece of the linked noun phrase
                    phrase = record["noun_phrases"][0][record["objects_cs_arg"][r][0]]
                    assert tokens(ds, [s.mrtc_labels[r]])[0] in ds.tokenizer.tokenize(phrase)
                else:
                    assert s.mrtc_labels[r] == -100
            assert (s.mrtc_labels[count:] == -100).all()
    assert_rate(text_samples / (text_samples + region_samples), 0.5, text_samples + region_samples, what="text side")
    assert region_hits[0.0][0] == 0  # unlinked regions are never masked
    checked = []
    for hits in (region_hits, token_hits):
        for score, (selected, total) in hits.items():
            if score > 0 and total > 150:
                assert_rate(selected / total, 0.15 * score, total, what=f"masked at link score {score}")
                checked.append(score)
    assert len(checked) >= 3, (region_hits, token_hits)


def test_region_phrase_released_masks_all_tokens_and_regions_in_the_same_sample(demo):
    ds = make(RegionPhraseDataset, "muvla_region_phrase", demo, "weak_k1.jsonl", rp_mask_mode="released",
              mlm_probability=0.5)
    torch.manual_seed(2)
    both = outside = 0
    for _ in range(10):
        for i in range(len(ds)):
            s = ds[i]
            spans = phrase_spans(ds, ds.records[i])
            masked = set((s.lm_label_ids >= 0).nonzero().view(-1).tolist())
            outside += len(masked - set(spans))
            both += bool(masked) and bool(s.region_selected.any())
    assert outside > 0 and both > 0


def test_region_phrase_scores_are_the_best_link_of_each_phrase(demo):
    ds = make(RegionPhraseDataset, "muvla_region_phrase", demo)
    record = weak_record("x", ["circle", "square", "circle"], [0, 1, 0], CAPTIONS)
    assert ds.phrase_scores(record, 0) == [2.0, 1.5, 0.0]
    assert ds.phrase_scores(record, 1) == [0.0]


# ----------------------------------------------------------------------------------------- I-S
def test_image_sentence_negatives_at_half_come_from_other_images_and_carry_no_mlm(demo):
    ds = make(ImageSentenceDataset, "muvla_image_sentence", demo)
    torch.manual_seed(3)
    labels = []
    for _ in range(40):
        for i in range(len(ds)):
            s = ds[i]
            labels.append(int(s.is_correct))
            if s.is_correct == 0:
                assert (s.lm_label_ids < 0).all()
            assert int(s.muvla_task) == TASK_IDS["image_sentence"]
    assert_rate(sum(labels) / len(labels), 0.5, len(labels), what="matched pairs")


def test_image_sentence_negative_caption_is_another_images(demo, tmp_path):
    path = tmp_path / "weak.jsonl"
    with open(path, "w") as f:
        for image_id, caption in (("demo_000000", "one circle"), ("demo_000001", "two squares")):
            f.write(json.dumps({"image_id": image_id, "captions": [caption], "objects": []}) + "\n")
    ds = make(ImageSentenceDataset, "muvla_image_sentence", demo, str(path), objectives=["itm"], itm_probability=1.0)
    s = ds[0]
    assert int(s.is_correct) == 0 and "lm_label_ids" not in s
    text = ds.tokenizer.decode(s.input_ids[s.input_mask.bool()][1:-1])
    assert text == "two squares"


def test_bad_weak_corpus_record_names_the_field(demo, tmp_path):
    record = weak_record("demo_000000", ["circle", "square"], [0, 1], CAPTIONS)
    record["objects_cs"] = [[1.0, 0.0]]  # one row, two regions
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(AnnotationError, match="objects_cs"):
        make(RegionPhraseDataset, "muvla_region_phrase", demo, str(path))


# ----------------------------------------------------------------------------------------- with the model
def test_batches_of_every_dataset_train_the_tiny_model(demo, mmf_global_config):
    from test_muvla_model import build

    model = build(vocab_size=len(make(RegionTagDataset, "muvla_region_tag", demo).tokenizer), feature_dim=DIM,
                  pretraining=dict(num_tags=len(gen.SHAPES), itm_weight_start_update=0)).train()
    expected = {"muvla_region_tag": {"mlm", "mrc", "mrfr"}, "muvla_region_phrase": {"mlm", "mrtc"},
                "muvla_image_sentence": {"mlm", "itm"}}
    for name, cls in (("muvla_region_tag", RegionTagDataset), ("muvla_region_phrase", RegionPhraseDataset),
                      ("muvla_image_sentence", ImageSentenceDataset)):
        ds = make(cls, name, demo)
        batch = SampleList([ds[i] for i in range(len(ds))])
        batch.dataset_type, batch.dataset_name = "train", name
        out = model(batch)
        assert {k.split("/")[-1] for k in out["losses"]} == expected[name]
        total = sum(out["losses"].values())
        assert torch.isfinite(total)
        total.backward()


def test_text_corpus_is_masked_text_without_an_image_and_the_model_trains_on_it(demo, tmp_path, mmf_global_config):
    from test_muvla_model import build

    from mmf_multilevel.methods.muvla.data import TextCorpusDataset

    path = tmp_path / "corpus.txt"
    path.write_text("a red circle and a blue square.\n\nthere are two shapes.\n")
    config = OmegaConf.load(os.path.join(CONFIGS, "muvla_text.yaml")).dataset_config.muvla_text
    config.data_dir, config.annotations = str(tmp_path), {"train": "corpus.txt"}
    config.processors.text_processor.params.tokenizer_config.type = str(demo / "vocab")
    config.mlm_probability = 0.5
    config.processors.text_processor.params.max_seq_length = 20
    registry.unregister("muvla_text_text_processor")
    ds = TextCorpusDataset("muvla_text", config, "train")
    ds.init_processors()
    assert len(ds) == 2 and "image_feature_0" not in ds[0]
    assert int(ds[0].muvla_task) == TASK_IDS["text"]
    model = build(vocab_size=len(ds.tokenizer), pretraining=dict(itm_weight_start_update=0)).train()
    torch.manual_seed(0)
    batch = SampleList([ds[0], ds[1]])
    batch.dataset_type, batch.dataset_name = "train", "muvla_text"
    out = model(batch)
    assert list(out["losses"]) == ["train/muvla_text/mlm"] and torch.isfinite(out["losses"]["train/muvla_text/mlm"])
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no non-empty 'text'"):
        TextCorpusDataset._read(str(tmp_path / "bad.jsonl"))
