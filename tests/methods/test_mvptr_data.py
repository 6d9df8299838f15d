"""MVPTR's pre-training dataset (mmf_multilevel.methods.mvptr.data) on a region cache and concept
annotations written here: the [CLS] words phrases [SEP] layout, chain masking, tags from the cache
header, MCR masking rates, untagged images counted, bad input named."""
import json
import os
import warnings

import mmf  # noqa: F401  (applies the compatibility layer, registers our components)
import numpy as np
import pytest
import torch
from mmf.common.registry import registry
from mmf.common.sample import Sample
from omegaconf import OmegaConf

from helpers.stats import assert_rate
from mmf_multilevel.features import FeatureCacheWriter
from mmf_multilevel.methods.mvptr.data import CONFIG_DIR, MVPTRCaptionsDataset, chain_mask_phrases, tag_names
from mmf_multilevel.modules.masking import IGNORE_INDEX

pytestmark = pytest.mark.filterwarnings("ignore:.*have no detected object")

DIM = 8
NAMES = ["man", "horse", "beach", "red car", "dog"]  # class id k = NAMES[k]; "red car" is two word-pieces
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "man", "riding", "horse", "on", "the", "beach", "red", "car", "dog", "grass", "##s", "sits", "."]
# a caption's word-pieces: a man riding a horse on the beach . -> positions 1..9 ([CLS] = 0)
CAPTION = ["a", "man", "riding", "a", "horse", "on", "the", "beach", "."]
CONCEPTS = {"1": ["man"], "100": ["man", "ride", "horse"], "101": ["horse", "on", "beach"], "102": ["beach"],
            "103": ["dog"], "104": ["car", "red"]}
# phrase -> the word-piece positions it was built from
PHRASES = [(6, [2]), (100, [2, 3, 5]), (101, [5, 6, 8]), (102, [8])]  # 6 = "man" reuses its word id


def write_vocab(folder, tokens=SPECIALS + WORDS):
    """A BERT word-piece vocabulary folder (``vocab.txt``, lower-casing tokenizer config) the text processor loads."""
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvptr_data")
    write_vocab(root / "vocab")
    ids = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    rng = np.random.default_rng(0)
    detections = {"img0": [0, 1, 2, 1, 0], "img1": [4, 3], "img2": [], "img3": [3, 3]}
    with FeatureCacheWriter(str(root / "regions.lmdb"), detector="test", feature_dim=DIM,
                            info={"object_names": NAMES}) as writer:
        for image_id, objects in detections.items():
            n = max(len(objects), 2)
            record = {"features": rng.normal(size=(n, DIM)).astype(np.float32),
                      "boxes": np.tile(np.array([[1.0, 2.0, 30.0, 40.0]], np.float32), (n, 1)), "image_w": 64, "image_h": 48}
            if objects:
                record["objects"] = np.array(objects + [objects[0]] * (n - len(objects)), np.int64)
            writer.write(image_id, record)
    with FeatureCacheWriter(str(root / "no_names.lmdb"), detector="test", feature_dim=DIM) as writer:
        writer.write("img0", {"features": np.zeros((2, DIM), np.float32), "boxes": np.zeros((2, 4), np.float32),
                              "objects": np.array([0, 1]), "image_w": 10, "image_h": 10})
    caption_ids = [ids["[CLS]"]] + [ids[w] for w in CAPTION] + [ids["[SEP]"]]
    records = [{"id": f"c{i}", "image_id": f"img{i % 4}", "text": " ".join(CAPTION), "input_ids": caption_ids,
                "phrase_ids": [p for p, _ in PHRASES], "phrase_positions": [q for _, q in PHRASES]} for i in range(8)]
    records.append({"id": "plain", "image_id": "img1", "caption": "a dog sits on the grass ."})
    with open(root / "captions.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    (root / "id2phrase.json").write_text(json.dumps(CONCEPTS))
    (root / "names.txt").write_text("\n".join(["x" + n.replace(" ", "") for n in NAMES]) + "\n")
    return root


def make(data, annotations="captions.jsonl", **overrides):
    config = OmegaConf.load(os.path.join(CONFIG_DIR, "mvptr_captions.yaml")).dataset_config.mvptr_captions
    config.data_dir = str(data)
    config.annotations = {"train": annotations}
    config.features = {"train": "regions.lmdb"}
    config.concepts = "id2phrase.json"
    config.feature_dim, config.max_features = DIM, 4
    config.max_tokens, config.max_phrases, config.max_tags = 12, 3, 6
    config.processors.text_processor.params.tokenizer_config.type = str(data / "vocab")
    for dotted, value in overrides.items():
        OmegaConf.update(config, dotted, value, merge=False)
    for key in config.processors:
        registry.unregister(f"mvptr_captions_{key}")
    dataset = MVPTRCaptionsDataset("mvptr_captions", config, "train")
    dataset.init_processors()
    return dataset


def words(dataset, ids):
    return dataset.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


@pytest.fixture
def one_record(data):
    with open(data / "captions.jsonl") as f, open(data / "one.jsonl", "w") as out:
        out.write(f.readline())


def unmasked(data, **overrides):
    return make(data, mlm_probability=0.0, phrase_mask_probability=0.0, mcr_mask_probability=0.0, **overrides)


def test_text_layout_words_then_phrases_then_sep(data):
    ds = unmasked(data)
    sample = ds[0]
    n, phrases = len(CAPTION), [p for p, _ in PHRASES][:3]  # max_phrases = 3: truncated from the end
    assert words(ds, sample.input_ids[: n + 1]) == ["[CLS]"] + CAPTION
    assert sample.input_ids[1 + n: 1 + n + 3].tolist() == phrases
    assert int(sample.input_ids[1 + n + 3]) == ds.tokenizer.sep_token_id
    slots = 12 + 3
    assert sample.input_ids.shape == (slots,) and sample.input_mask.tolist() == [1] * (n + 5) + [0] * (slots - n - 5)
    assert sample.phrase_slots.tolist() == [0] * (1 + n) + [1] * 3 + [0] * (slots - n - 4)
    assert sample.segment_ids.tolist() == [0] * slots
    assert (sample.lm_label_ids == IGNORE_INDEX).all()  # nothing masked at probability 0


def test_long_captions_are_cut_and_spare_slots_take_more_phrases(data, tmp_path):
    ds = unmasked(data, max_tokens=6)  # 4 word-pieces fit
    sample = ds[0]
    assert words(ds, sample.input_ids[:5]) == ["[CLS]"] + CAPTION[:4] and sample.phrase_slots.sum() == 3
    # the official budget: phrases may also use the word slots the caption leaves free (12 - 2 - 9 = 1 here)
    spare = unmasked(data, phrase_spare_slots=True)[0]
    assert spare.phrase_slots.sum() == 4 and spare.input_ids[10:14].tolist() == [p for p, _ in PHRASES]


def test_plain_caption_is_tokenised_and_has_no_phrase(data):
    ds = unmasked(data)
    sample = ds[len(ds) - 1]
    assert words(ds, sample.input_ids[:9]) == ["[CLS]", "a", "dog", "sits", "on", "the", "grass", ".", "[SEP]"]
    assert sample.phrase_slots.sum() == 0


def test_tags_are_unique_sorted_names_of_all_detections(data):
    ds = unmasked(data, max_features=2)  # tags come from every detection, not only the regions kept
    sample = ds[0]  # img0: man, horse, beach, horse, man -> beach horse man
    assert words(ds, sample.tag_ids[:5]) == ["[CLS]", "beach", "horse", "man", "[SEP]"]
    assert sample.tag_mask.tolist() == [1] * 5 + [0]
    assert int(sample.image_info_0.max_features) == 2
    tags = words(ds, ds[1].tag_ids[:5])  # img1: dog, "red car" (two pieces) -> dog red car
    assert tags == ["[CLS]", "dog", "red", "car", "[SEP]"]
    assert tag_names([1, 0, 1], NAMES) == ["horse", "man"]
    assert tag_names([4, 3, 2, 1, 0, 2], NAMES) == ["beach", "dog", "horse", "man", "red car"]  # sorted, once each
    with pytest.raises(IndexError, match="outside the 5 object names"):
        tag_names([7], NAMES)


def test_tag_slots_are_cut(data):
    ds = unmasked(data, max_tags=4)
    assert words(ds, ds[0].tag_ids) == ["[CLS]", "beach", "horse", "[SEP]"]


def test_images_without_a_detection_have_empty_tags_and_are_counted(data):
    with pytest.warns(UserWarning, match="1 of 4 images .* have no detected object.*'img2'"):
        ds = unmasked(data)
    assert ds.untagged_images == 1
    sample = ds[2]
    assert words(ds, sample.tag_ids[:2]) == ["[CLS]", "[SEP]"] and sample.tag_mask.sum() == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unmasked(data, count_untagged=False).untagged_images is None


def test_ablation_inputs_without_phrases_or_tags(data, one_record):
    no_phrases = unmasked(data, use_phrases=False, concepts=None)[0]
    assert no_phrases.phrase_slots.sum() == 0 and int(no_phrases.input_ids[1 + len(CAPTION)]) == 3  # [SEP]
    no_tags = unmasked(data, use_tags=False, features={"train": "no_names.lmdb"}, annotations="one.jsonl")
    assert no_tags[0].tag_mask.sum() == 2


def test_tag_names_from_a_file_when_the_header_has_none(data, one_record):
    with pytest.raises(KeyError, match="no info.object_names.*tag_vocab"):
        unmasked(data, features={"train": "no_names.lmdb"}, annotations="one.jsonl")
    ds = unmasked(data, features={"train": "no_names.lmdb"}, annotations="one.jsonl", tag_vocab="names.txt")
    assert words(ds, ds[0].tag_ids[:2]) == ["[CLS]", "[UNK]"]  # xman / xhorse are not in the vocab


def test_bad_input_is_named(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="mvptr_captions.concepts.*use_phrases: false"):
        make(data, concepts="missing.json", phrase_mask_probability=0.15)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image_id": "img0", "input_ids": [5, 6], "phrase_ids": []}) + "\n")
    ds = unmasked(data, annotations=str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="bad.jsonl: image 'img0': input_ids must start with \\[CLS\\]"):
        ds[0]
    with pytest.raises(ValueError, match="mcr_mask_probability must lie in"):
        make(data, mcr_mask_probability=1.5)


def test_chain_masking_masks_every_phrase_built_from_a_selected_word(data):
    ds = make(data, mlm_probability=0.3, phrase_mask_probability=0.0, mcr_mask_probability=0.0)
    mask_id, n = ds.tokenizer.mask_token_id, len(CAPTION)
    chained = 0
    for i in range(400):
        sample = ds[i % 8]
        selected = (sample.lm_label_ids != IGNORE_INDEX).nonzero().view(-1).tolist()
        for j, (phrase, positions) in enumerate(PHRASES[:3]):
            got = int(sample.input_ids[1 + n + j])
            if set(positions) & set(selected):
                assert got == mask_id, (i, phrase, selected)
                chained += 1
            else:
                assert got == phrase, (i, phrase, selected)
        assert (sample.lm_label_ids[sample.phrase_slots.bool()] == IGNORE_INDEX).all()  # phrases never predicted
        assert all(1 <= p <= n for p in selected)  # only word-pieces are selected
    assert chained > 100


def test_unchained_phrases_are_masked_80_10_10(data):
    ds = make(data, mlm_probability=0.0, phrase_mask_probability=0.5, mcr_mask_probability=0.0)
    n, mask_id, trials = len(CAPTION), ds.tokenizer.mask_token_id, 0
    outcomes = {"mask": 0, "random": 0, "same": 0}
    for i in range(1200):
        sample = ds[i % 8]
        for j, (phrase, _) in enumerate(PHRASES[:3]):
            got, trials = int(sample.input_ids[1 + n + j]), trials + 1
            if got == mask_id:
                outcomes["mask"] += 1
            elif got != phrase:
                assert str(got) in CONCEPTS  # a random concept of the vocabulary
                outcomes["random"] += 1
            else:
                outcomes["same"] += 1
    # P(random draw is the phrase itself) = 1/6 for the concept ids here
    assert_rate(outcomes["mask"] / trials, 0.5 * 0.8, trials, what="phrase -> [MASK]")
    assert_rate(outcomes["random"] / trials, 0.5 * 0.1 * 5 / 6, trials, what="phrase -> random concept")


def test_mcr_masks_tag_pieces_at_its_rate_with_word_piece_targets(data):
    ds = make(data, mlm_probability=0.0, phrase_mask_probability=0.0, mcr_mask_probability=0.25)
    clean = unmasked(data)
    selected = total = 0
    for i in range(800):
        sample, reference = ds[i % 8], clean[i % 8]
        real = reference.tag_mask.bool().clone()
        real[0] = False
        real[int(reference.tag_mask.sum()) - 1] = False  # [CLS] and [SEP] are never selected
        labels = sample.mcr_label_ids
        assert (labels[~real] == IGNORE_INDEX).all()
        picked = labels != IGNORE_INDEX
        assert torch.equal(labels[picked], reference.tag_ids[picked])  # the original word-piece
        selected, total = selected + int(picked.sum()), total + int(real.sum())
    assert_rate(selected / total, 0.25, total, what="MCR selection")


def test_chain_mask_function_against_hand_cases():
    gen = torch.Generator().manual_seed(0)
    selected = torch.tensor([False, False, True, False, False])
    out, chained = chain_mask_phrases([7, 8, 9], [[2], [1, 3], [2, 4]], selected, mask_token_id=4, concept_ids=[7, 8, 9],
                                      prob=0.0, generator=gen)
    assert out.tolist() == [4, 8, 4] and chained.tolist() == [True, False, True]
    out, _ = chain_mask_phrases([7, 8], [[9], []], selected, mask_token_id=4, concept_ids=[7], prob=0.0, generator=gen)
    assert out.tolist() == [7, 8]  # a position past the cut never chains


# --------------------------------------------------------------------------- downstream phrases
CAPTION_TEXT = " ".join(CAPTION)
OTHER_TEXT = "a dog sits on the grass ."


def tool_line(cid, image_id, text=CAPTION_TEXT, phrases=PHRASES):
    """A line of the concept tool's captions.jsonl (the text's word-pieces - every word here is one - and phrases)."""
    ids = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    return {"id": cid, "image_id": image_id, "text": text, "input_ids": [2] + [ids[w] for w in text.split()] + [3],
            "phrase_ids": [p for p, _ in phrases], "phrase_positions": [q for _, q in phrases]}


def write_lines(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


@pytest.fixture
def tasks(data, tmp_path):
    """VQA and SNLI-VE annotations over the region cache, and the tool's lines for them keyed by their ids."""
    write_lines(tmp_path / "vqa.jsonl", [
        {"question_id": 7, "image_id": "img0", "question": CAPTION_TEXT, "answers": ["yes"] * 10},
        {"question_id": 8, "image_id": "img1", "question": OTHER_TEXT, "answers": ["no"] * 10}])
    write_lines(tmp_path / "vqa_phrases.jsonl", [tool_line("7", "img0")])  # question 8: no line (the tool skipped it)
    (tmp_path / "answers.txt").write_text("yes\nno\n")
    write_lines(tmp_path / "ve.jsonl", [
        {"pair_id": "p0", "image_id": "img0", "hypothesis": CAPTION_TEXT, "label": "entailment"},
        {"pairID": "p1", "Flickr30K_ID": "img1", "sentence2": OTHER_TEXT, "gold_label": "neutral"}])
    write_lines(tmp_path / "ve_phrases.jsonl", [tool_line("p0", "img0"), tool_line("p1", "img1", OTHER_TEXT, [])])
    return tmp_path


def make_task(name, data, root, annotations, phrases=None, **overrides):
    """The registered task dataset ``name`` over ``data``'s region cache and vocab, its annotations and phrases in ``root``."""
    config = OmegaConf.load(os.path.join(CONFIG_DIR, f"{name}.yaml")).dataset_config[name]
    config.data_dir = str(root)
    config.annotations = {"train": annotations}
    config.features = {"train": str(data / "regions.lmdb")}
    config.phrases = {"train": phrases, "val": None, "test": None}
    config.feature_dim, config.max_features = DIM, 4
    config.max_tokens, config.max_tags = 12, 6
    config.processors.text_processor.params.tokenizer_config.type = str(data / "vocab")
    config.processors.text_processor.params.max_seq_length = 12
    if "answer_processor" in config.processors:
        config.processors.answer_processor.params.vocab_file = str(root / "answers.txt")
    for dotted, value in overrides.items():
        OmegaConf.update(config, dotted, value, merge=False)
    for key in config.processors:
        registry.unregister(f"{name}_{key}")
    dataset = registry.get_builder_class(name).dataset_class(name, config, "train")
    dataset.init_processors()
    return dataset


TEXT_FIELDS = ("input_ids", "input_mask", "segment_ids", "lm_label_ids", "phrase_slots")


def text_of(sample):
    return {key: sample[key].tolist() for key in TEXT_FIELDS}


@pytest.mark.filterwarnings("ignore:.*have no line in")
@pytest.mark.parametrize("name,annotations,phrases", [("mvptr_vqa2", "vqa.jsonl", "vqa_phrases.jsonl"),
                                                      ("mvptr_snli_ve", "ve.jsonl", "ve_phrases.jsonl")])
@pytest.mark.parametrize("budget", [{"max_phrases": 3}, {"max_phrases": 3, "phrase_spare_slots": True},
                                    {"max_phrases": 2, "max_tokens": 6}])
def test_task_text_with_phrases_follows_the_retrieval_layout(data, tasks, name, annotations, phrases, budget):
    """A question / hypothesis with its tool line: [CLS] words phrases [SEP] exactly as a caption of the same line
    (the layout rule of retrieval and pre-training: words cut to max_tokens - 2, then the phrases within their
    budget, spare word slots when phrase_spare_slots)."""
    ds = make_task(name, data, tasks, annotations, phrases, **budget)
    reference = unmasked(data, **budget)  # the captions dataset over the same tool line, unmasked
    assert text_of(ds[0]) == text_of(reference[0])
    tokens, phrase_count = min(len(CAPTION), budget.get("max_tokens", 12) - 2), budget["max_phrases"]
    if budget.get("phrase_spare_slots"):
        phrase_count = min(len(PHRASES), phrase_count + 12 - 2 - len(CAPTION))
    ids = ds[0].input_ids.tolist()
    assert words(ds, ids[1:1 + tokens]) == CAPTION[:tokens]
    assert ids[1 + tokens:1 + tokens + phrase_count] == [p for p, _ in PHRASES][:phrase_count]
    assert ids[1 + tokens + phrase_count] == ds.tokenizer.sep_token_id
    assert ds[0].phrase_slots.sum() == phrase_count and len(ids) == budget.get("max_tokens", 12) + budget["max_phrases"]


def today_layout(ds, text, slots):
    """The task text before phrases: [CLS] word-pieces [SEP] pad over max_tokens + max_phrases slots, nothing else."""
    tok = ds.tokenizer
    pieces = tok.convert_tokens_to_ids(tok.tokenize(text))[: ds.max_tokens - 2]
    ids = [tok.cls_token_id] + pieces + [tok.sep_token_id]
    return {"input_ids": ids + [0] * (slots - len(ids)), "input_mask": [1] * len(ids) + [0] * (slots - len(ids)),
            "segment_ids": [0] * slots, "lm_label_ids": [IGNORE_INDEX] * slots, "phrase_slots": [0] * slots}


def test_task_text_without_phrases_is_unchanged(data, tasks):
    for name, annotations, phrases in (("mvptr_vqa2", "vqa.jsonl", "vqa_phrases.jsonl"),
                                       ("mvptr_snli_ve", "ve.jsonl", "ve_phrases.jsonl")):
        plain = make_task(name, data, tasks, annotations, None)  # phrases: null, the dataset's max_phrases 0
        assert plain.max_phrases == 0 and plain.texts_without_phrases is None
        for index, text in enumerate((CAPTION_TEXT, OTHER_TEXT)):
            assert text_of(plain[index]) == today_layout(plain, text, 12)
        off = make_task(name, data, tasks, annotations, phrases, max_phrases=3, use_phrases=False)
        assert text_of(off[0]) == today_layout(off, CAPTION_TEXT, 15)
    # VQA's question 8 has no line in the file: no phrases, counted, warned about once (when the dataset opens)
    with pytest.warns(UserWarning, match=r"mvptr_vqa2 \(train\): 1 of 2 questions have no line in .*vqa_phrases.jsonl"):
        ds = make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "vqa_phrases.jsonl", max_phrases=3)
    assert ds.texts_without_phrases == 1
    assert text_of(ds[1]) == today_layout(ds, OTHER_TEXT, 15) and ds[0].phrase_slots.sum() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SNLI-VE: every hypothesis has its line (the official field names too)
        ve = make_task("mvptr_snli_ve", data, tasks, "ve.jsonl", "ve_phrases.jsonl", max_phrases=3)
    assert ve.texts_without_phrases == 0 and text_of(ve[1]) == today_layout(ve, OTHER_TEXT, 15)


def test_task_phrases_bad_input_is_named(data, tasks):
    with pytest.raises(FileNotFoundError, match=r"dataset_config.mvptr_vqa2.phrases.train: .*missing.jsonl does not exist"):
        make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "missing.jsonl", max_phrases=3)
    with pytest.raises(ValueError, match=r"phrases.train is set but dataset_config.mvptr_vqa2.max_phrases is 0"):
        make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "vqa_phrases.jsonl")
    # a file keyed by something else than the question id (here the line number: "1" is question 8's line's id
    # under --id-field id) holds another text under the id: named with its file and line
    write_lines(tasks / "by_line.jsonl", [tool_line("8", "img0")])
    with pytest.raises(ValueError, match=r"by_line.jsonl:1: id '8' holds the text 'a man riding.*vqa.jsonl has "
                                         r"'a dog sits.*another --id-field"):
        make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "by_line.jsonl", max_phrases=3)
    write_lines(tasks / "broken.jsonl", [tool_line("7", "img0"), "{not json"])
    with pytest.raises(ValueError, match=r"broken.jsonl:2: expected a line of the concept tool's captions.jsonl"):
        make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "broken.jsonl", max_phrases=3)
    write_lines(tasks / "ve_noid.jsonl", [{"image_id": "img0", "hypothesis": CAPTION_TEXT, "label": "entailment"}])
    with pytest.raises(ValueError, match=r"ve_noid.jsonl: the record of hypothesis 'a man.* has no string or integer "
                                         r"'pair_id'.*mvptr_snli_ve.phrases"):
        make_task("mvptr_snli_ve", data, tasks, "ve_noid.jsonl", "ve_phrases.jsonl", max_phrases=3)


def test_retrieval_reads_its_phrases_through_the_same_reader(data, tasks):
    """Retrieval captions keyed by (image, caption position): the caption the tool left out gets none, counted."""
    from mmf_multilevel.methods.mvptr.data import MVPTRRetrievalDataset

    write_lines(tasks / "ret.jsonl", [{"image_id": "img0", "captions": [CAPTION_TEXT, OTHER_TEXT]}])
    write_lines(tasks / "ret_phrases.jsonl", [tool_line("1.0", "img0")])
    config = OmegaConf.load(os.path.join(CONFIG_DIR, "mvptr_coco_retrieval.yaml")).dataset_config.mvptr_coco_retrieval
    config.data_dir, config.annotations, config.features = str(tasks), {"train": "ret.jsonl"}, {"train": str(data / "regions.lmdb")}
    config.phrases = {"train": "ret_phrases.jsonl"}
    config.feature_dim, config.max_features, config.max_tokens, config.max_phrases, config.max_tags = DIM, 4, 12, 3, 6
    config.processors.text_processor.params.tokenizer_config.type = str(data / "vocab")
    for key in config.processors:
        registry.unregister(f"mvptr_coco_retrieval_{key}")
    with pytest.warns(UserWarning, match=r"1 of 2 captions have no line in .*ret_phrases.jsonl"):
        ds = MVPTRRetrievalDataset("mvptr_coco_retrieval", config, "train")
    ds.init_processors()
    assert ds.texts_without_phrases == 1
    assert text_of(ds._text(0)) == text_of(unmasked(data)[0])
    assert text_of(ds._text(1)) == today_layout(ds, OTHER_TEXT, 15)


# --------------------------------------------------------------------------- chain masking and tag names, edge cases
def test_chain_mask_draws_follow_the_given_generator_alone():
    """Selection (``prob``), the 80/10/10 outcome and the random concept are three draws of the generator, in that
    order; the result matches an independent replay of them and ignores the global RNG."""
    count, pool, prob = 80, [100, 101, 102, 103], 0.6
    ids = list(range(10, 10 + count))
    positions = [[k % 5] for k in range(count)]
    selected = torch.tensor([False, True, False, False, False])

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        return chain_mask_phrases(ids, positions, selected, mask_token_id=4, concept_ids=pool, prob=prob,
                                  generator=torch.Generator().manual_seed(seed))

    out, chained = run(5, 0)
    again, _ = run(5, 1)
    assert torch.equal(out, again)
    replay = torch.Generator().manual_seed(5)
    draw, outcome = torch.rand(count, generator=replay), torch.rand(count, generator=replay)
    expected, replaced = [], []
    for k in range(count):
        if k % 5 == 1:
            expected.append(4)  # chained
        elif draw[k] < prob and outcome[k] < 0.8:
            expected.append(4)
        elif draw[k] < prob and outcome[k] < 0.9:
            expected.append(None)
            replaced.append(k)
        else:
            expected.append(ids[k])
    picks = torch.randint(len(pool), (len(replaced),), generator=replay).tolist()
    for k, pick in zip(replaced, picks):
        expected[k] = pool[pick]
    assert replaced and any(e == ids[k] for k, e in enumerate(expected))  # the seed exercises every outcome
    assert out.tolist() == expected and out.dtype == torch.long
    assert chained.tolist() == [k % 5 == 1 for k in range(count)] and chained.dtype == torch.bool


def test_chain_mask_positions_outside_the_words_and_extra_position_lists():
    selected = torch.tensor([False, False, True, False, True])  # position -1 would read the last (selected) one
    out, chained = chain_mask_phrases([7, 8], [[-1], [5, 9], [2]], selected, mask_token_id=4, concept_ids=[7], prob=0.0)
    assert out.tolist() == [7, 8] and chained.tolist() == [False, False]  # the third position list has no phrase
    out, chained = chain_mask_phrases(torch.tensor([7, 8, 9]), [[0, 4], [3], [1]], selected, mask_token_id=4,
                                      concept_ids=[7], prob=0.0)
    assert out.tolist() == [4, 8, 9] and chained.tolist() == [True, False, False]
    out, chained = chain_mask_phrases([], [], selected, mask_token_id=4, concept_ids=[7], prob=1.0)
    assert out.tolist() == [] and chained.tolist() == []


def test_chain_mask_at_probability_one_selects_every_unchained_phrase():
    gen = torch.Generator().manual_seed(3)
    count = 400
    out, chained = chain_mask_phrases([50] * count, [[]] * count, torch.zeros(3, dtype=torch.bool), mask_token_id=4,
                                      concept_ids=[60, 61], prob=1.0, generator=gen)
    assert not chained.any()
    masked, replaced = int((out == 4).sum()), int(((out == 60) | (out == 61)).sum())
    assert masked + replaced + int((out == 50).sum()) == count
    assert_rate(masked / count, 0.8, count, what="[MASK]")
    assert_rate(replaced / count, 0.1, count, what="random concept")


def test_tag_names_refuse_ids_outside_the_names():
    assert tag_names(np.array([4, 0], np.int64), NAMES) == ["dog", "man"]
    assert tag_names([], NAMES) == []
    for bad in (-1, 5):
        with pytest.raises(IndexError, match=f"detected class id {bad} is outside the 5 object names"):
            tag_names([0, bad], NAMES)


# --------------------------------------------------------------------------- settings and vocabularies
def test_length_bounds_are_the_smallest_layouts(data):
    ds = unmasked(data, max_tokens=3, max_phrases=0, max_tags=2)
    sample = ds[0]
    assert words(ds, sample.input_ids) == ["[CLS]", "a", "[SEP]"] and sample.phrase_slots.sum() == 0
    assert words(ds, sample.tag_ids) == ["[CLS]", "[SEP]"] and sample.tag_mask.tolist() == [1, 1]
    for bad, shown in (({"max_tokens": 2}, "2 / 0 / 2"), ({"max_phrases": -1}, "3 / -1 / 2"), ({"max_tags": 1}, "3 / 0 / 1")):
        settings = {"max_tokens": 3, "max_phrases": 0, "max_tags": 2, **bad}
        with pytest.raises(ValueError, match=f"mvptr_captions: max_tokens >= 3, max_phrases >= 0 and max_tags >= 2 are "
                                             f"needed, got {shown}"):
            unmasked(data, **settings)


@pytest.mark.parametrize("key", ["mlm_probability", "phrase_mask_probability", "mcr_mask_probability"])
def test_each_masking_rate_is_bounded_and_kept(data, key):
    rates = {"mlm_probability": 0.0, "phrase_mask_probability": 0.0, "mcr_mask_probability": 0.0}
    for value in (0.0, 1.0, 0.35):
        ds = make(data, **{**rates, key: value})
        assert getattr(ds, key) == value and isinstance(getattr(ds, key), float)
    for value in (-0.01, 1.01):
        with pytest.raises(ValueError, match=rf"dataset_config.mvptr_captions.{key} must lie in \[0, 1\], got {value}"):
            make(data, **{**rates, key: value})


def test_concepts_are_read_only_for_masked_phrases(data, tmp_path):
    assert make(data, concepts="missing.json", phrase_mask_probability=0.0).concept_ids == []
    assert make(data, concepts="missing.json", phrase_mask_probability=0.2, use_phrases=False).concept_ids == []
    assert make(data, phrase_mask_probability=0.2).concept_ids == [1, 100, 101, 102, 103, 104]
    (tmp_path / "unsorted.json").write_text(json.dumps({"30": ["dog"], "4": ["man"], "12": ["horse"]}))
    assert make(data, phrase_mask_probability=0.2, concepts=str(tmp_path / "unsorted.json")).concept_ids == [4, 12, 30]


def test_tag_vocab_file_errors_and_blank_lines(data, one_record, tmp_path):
    no_names = {"features": {"train": "no_names.lmdb"}, "annotations": "one.jsonl"}
    with pytest.raises(FileNotFoundError, match=r"dataset_config.mvptr_captions.tag_vocab: .*nope.txt does not exist"):
        unmasked(data, tag_vocab=str(tmp_path / "nope.txt"), **no_names)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"dataset_config.mvptr_captions.tag_vocab: .*blank.txt holds no class name"):
        unmasked(data, tag_vocab=str(tmp_path / "blank.txt"), **no_names)
    (tmp_path / "spaced.txt").write_text("\nman \n\n horse\n")
    ds = unmasked(data, tag_vocab=str(tmp_path / "spaced.txt"), **no_names)
    assert ds.object_names == ["man", "horse"] and words(ds, ds[0].tag_ids[:4]) == ["[CLS]", "horse", "man", "[SEP]"]
    off = unmasked(data, use_tags=False, tag_vocab=str(tmp_path / "nope.txt"), **no_names)
    assert off.object_names == [] and off.untagged_images is None  # neither read nor counted without tags


@pytest.mark.parametrize("untagged,shown", [
    (5, "'u0', 'u1', 'u2', 'u3', 'u4'"), (6, "'u0', 'u1', 'u2', 'u3', 'u4' ..."), (7, "'u0', 'u1', 'u2', 'u3', 'u4' ...")])
def test_untagged_images_are_named_five_at_most(tmp_path, untagged, shown):
    """Images without ``objects`` are untagged; an image with a single detection is not."""
    root = tmp_path
    write_vocab(root / "vocab")
    with FeatureCacheWriter(str(root / "regions.lmdb"), detector="test", feature_dim=DIM,
                            info={"object_names": NAMES}) as writer:
        for k in range(untagged + 2):
            rows = 1 if k == untagged else 2
            record = {"features": np.zeros((rows, DIM), np.float32), "boxes": np.zeros((rows, 4), np.float32),
                      "image_w": 10, "image_h": 10}
            if k >= untagged:
                record["objects"] = np.array([0] * rows)  # u<untagged>: one detection
            writer.write(f"u{k}", record)
    write_lines(root / "captions.jsonl", [{"image_id": f"u{k}", "text": "a man"} for k in range(untagged + 2)])
    with pytest.warns(UserWarning) as caught:
        ds = unmasked(root, concepts=None)
    messages = [str(w.message) for w in caught if "detected object" in str(w.message)]
    assert messages == [f"mvptr_captions: {untagged} of {untagged + 2} images in {root / 'regions.lmdb'} have no "
                        f"detected object (their tag sequence is [CLS] [SEP]): {shown}"]
    assert ds.untagged_images == untagged


def test_a_missing_setting_is_named_with_the_dataset(data):
    with pytest.raises(KeyError, match="dataset_config.mvptr_captions.max_tags is not set"):
        make_without(data, "max_tags")


def make_without(data, key):
    config = OmegaConf.load(os.path.join(CONFIG_DIR, "mvptr_captions.yaml")).dataset_config.mvptr_captions
    config.data_dir, config.annotations, config.features = str(data), {"train": "captions.jsonl"}, {"train": "regions.lmdb"}
    config.feature_dim = DIM
    config.processors.text_processor.params.tokenizer_config.type = str(data / "vocab")
    del config[key]
    return MVPTRCaptionsDataset("mvptr_captions", config, "train")


def test_a_text_processor_without_a_tokenizer_is_named(data):
    ds = unmasked(data)
    ds.text_processor = object()
    with pytest.raises(TypeError, match="mvptr_captions.processors.text_processor must be a BERT tokenizer processor"):
        ds[0]


def test_caption_records_are_checked_and_read(data, tmp_path):
    cls, sep = 2, 3
    write_lines(tmp_path / "records.jsonl", [
        {"image_id": "img0", "input_ids": [cls]},
        {"image_id": "img0", "input_ids": [cls, 5, 6]},
        {"image_id": "img0", "input_ids": []},
        {"image_id": "img0"},
        {"image_id": "img0", "text": "a dog", "caption": "a man"},
        {"image_id": "img0", "input_ids": [cls, 5, 6, sep], "phrase_ids": [100, 101], "phrase_positions": [[1]]},
        {"image_id": "img0", "input_ids": [cls, 5, 6, sep], "phrase_ids": [100, 101]},
        {"image_id": "img0", "input_ids": [cls, sep]}])
    ds = make(data, annotations=str(tmp_path / "records.jsonl"), mlm_probability=1.0, phrase_mask_probability=0.0,
              mcr_mask_probability=0.0)
    for index in (0, 1, 2):
        with pytest.raises(ValueError, match=r"records.jsonl: image 'img0': input_ids must start with \[CLS\] \(2\) "
                                             r"and end with \[SEP\] \(3\)"):
            ds[index]
    with pytest.raises(KeyError, match="records.jsonl: image 'img0' has neither input_ids nor a text/caption field"):
        ds[3]
    assert ds[4].lm_label_ids[1:3].tolist() == ds.tokenizer.convert_tokens_to_ids(["a", "dog"])  # text before caption
    with pytest.raises(ValueError, match=r"records.jsonl: image 'img0': phrase_positions must hold one list per "
                                         r"phrase id \(2\)"):
        ds[5]
    # phrases without positions: laid out, never chained (every word is selected at mlm_probability 1)
    sample = ds[6]
    assert sample.input_ids[3:5].tolist() == [100, 101] and sample.phrase_slots.tolist()[3:6] == [1, 1, 0]
    assert int(sample.input_ids[5]) == sep and sample.input_mask.sum() == 6
    empty = ds[7]  # a caption of no word-piece: [CLS] [SEP]
    assert empty.input_ids[:2].tolist() == [cls, sep] and empty.input_mask.sum() == 2
    assert (empty.lm_label_ids == IGNORE_INDEX).all()


def test_captions_number_their_images(data):
    ds = unmasked(data)
    assert ds.image_indices == {"img0": 0, "img1": 1, "img2": 2, "img3": 3}
    for index in range(9):
        sample = ds[index]
        assert sample.image_index.dtype == torch.long and sample.image_index.dim() == 0
        assert int(sample.image_index) == (index % 4 if index < 8 else 1)  # the plain caption shows img1


# --------------------------------------------------------------------------- one query outside a dataset
def query_config(data, **overrides):
    config = OmegaConf.load(os.path.join(CONFIG_DIR, "mvptr_captions.yaml")).dataset_config.mvptr_captions
    config.data_dir, config.max_tokens, config.max_phrases, config.max_tags = str(data), 12, 3, 6
    config.concepts = "id2phrase.json"
    config.mlm_probability = config.phrase_mask_probability = config.mcr_mask_probability = 0.5
    for dotted, value in overrides.items():
        OmegaConf.update(config, dotted, value, merge=False)
    return config


def test_query_inputs_lay_out_one_text_and_its_tags_unmasked(data):
    from mmf_multilevel.methods.mvptr.data import MVPTRQueryInputs

    processor = unmasked(data).text_processor
    inputs = MVPTRQueryInputs("mvptr_captions", query_config(data), processor, object_names=lambda: NAMES)
    assert (inputs.mlm_probability, inputs.phrase_mask_probability, inputs.mcr_mask_probability) == (0.0, 0.0, 0.0)
    assert inputs.concept_ids == [] and inputs.untagged_images is None and inputs.object_names == NAMES
    assert inputs.annotation_path == "the query of mvptr_captions"
    for _ in range(20):  # never masked
        sample = inputs.text_sample("a man on the beach")
        assert words(inputs, sample.input_ids[:7]) == ["[CLS]", "a", "man", "on", "the", "beach", "[SEP]"]
        assert (sample.lm_label_ids == IGNORE_INDEX).all() and sample.phrase_slots.sum() == 0
        inputs.add_query_tags({"objects": np.array([1, 0, 1])}, sample)
        assert words(inputs, sample.tag_ids[:4]) == ["[CLS]", "horse", "man", "[SEP]"]
        assert (sample.mcr_label_ids == IGNORE_INDEX).all() and sample.tag_mask.sum() == 4
    bare = Sample()
    inputs.add_query_tags({}, bare)  # a record without detections: [CLS] [SEP]
    assert bare.tag_mask.sum() == 2
    from_file = MVPTRQueryInputs("mvptr_captions", query_config(data, tag_vocab="names.txt"), processor)
    assert from_file.object_names[0] == "xman"
    for names in (None, lambda: [], lambda: None):
        with pytest.raises(KeyError, match="the cache X names no object classes .*mvptr_captions.tag_vocab"):
            MVPTRQueryInputs("mvptr_captions", query_config(data), processor, object_names=names, source="the cache X")
    assert MVPTRQueryInputs("mvptr_captions", query_config(data, use_tags=False), processor).object_names == []


# --------------------------------------------------------------------------- downstream datasets
def test_task_ids_must_be_strings_or_integers(data, tasks):
    for bad in (True, 7.0, None, [7]):
        write_lines(tasks / "vqa_bad.jsonl", [{"question_id": bad, "image_id": "img0", "question": CAPTION_TEXT,
                                               "answers": ["yes"] * 10}])
        with pytest.raises(ValueError, match=r"vqa_bad.jsonl: the record of question 'a man riding.* has no string or "
                                             r"integer 'question_id'"):
            make_task("mvptr_vqa2", data, tasks, "vqa_bad.jsonl", "vqa_phrases.jsonl", max_phrases=3)


@pytest.mark.filterwarnings("ignore:.*have no line in")
def test_a_text_the_view_rewrites_loses_its_phrases(data, tasks):
    ds = make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "vqa_phrases.jsonl", max_phrases=3)
    assert ds[0].phrase_slots.sum() == 3
    ds.view_text = lambda text: text.replace("man", "horse")
    assert text_of(ds[0]) == today_layout(ds, CAPTION_TEXT.replace("man", "horse"), 15)


@pytest.mark.filterwarnings("ignore:.*have no line in")
def test_retrieval_caches_the_gallery_texts_only_and_adds_tags(data, tasks):
    from mmf_multilevel.methods.mvptr.data import MVPTRRetrievalDataset

    assert MVPTRRetrievalDataset._phrase_key({"image_id": 5, "id": "3.1.2"}) == ("5", 2)
    write_lines(tasks / "ret.jsonl", [{"image_id": "img0", "captions": [CAPTION_TEXT, OTHER_TEXT]},
                                      {"image_id": "img1", "captions": [OTHER_TEXT]}])
    write_lines(tasks / "ret_phrases.jsonl", [tool_line("1.0", "img0")])
    config = OmegaConf.load(os.path.join(CONFIG_DIR, "mvptr_coco_retrieval.yaml")).dataset_config.mvptr_coco_retrieval
    config.data_dir, config.features = str(tasks), {"train": str(data / "regions.lmdb")}
    config.annotations = {"train": "ret.jsonl", "val": "ret.jsonl"}
    config.phrases = {"train": "ret_phrases.jsonl", "val": "ret_phrases.jsonl"}
    config.feature_dim, config.max_features, config.max_tokens, config.max_phrases, config.max_tags = DIM, 4, 12, 3, 6
    config.mlm_probability = 0.5  # retrieval never masks
    config.processors.text_processor.params.tokenizer_config.type = str(data / "vocab")
    built = {}
    for split in ("train", "val"):
        for key in config.processors:
            registry.unregister(f"mvptr_coco_retrieval_{key}")
        built[split] = MVPTRRetrievalDataset("mvptr_coco_retrieval", config, split)
        built[split].init_processors()
    train, val = built["train"], built["val"]
    assert train.mlm_probability == 0.0 and train.caption_position == [0, 1, 0]
    train._text(0)
    assert train._tokens == {}
    first = val._text(0)
    assert val._text(0) is first and set(val._tokens) == {0}
    sample = val[2]  # image 0, caption 2 (img1's)
    assert words(val, sample.tag_ids[:5]) == ["[CLS]", "beach", "horse", "man", "[SEP]"]
    assert text_of(sample) == today_layout(val, OTHER_TEXT, 15) and int(sample.targets) == 0


def test_the_registered_builders_and_their_configs():
    from mmf_multilevel.methods.mvptr import data as mvptr_data

    for name, field, key in (("mvptr_vqa2", "question", "question_id"), ("mvptr_snli_ve", "hypothesis", "pair_id"),
                             ("mvptr_refcoco_plus", "expression", "ref_id")):
        builder = registry.get_builder_class(name)
        assert builder.config_path() == os.path.join(CONFIG_DIR, f"{name}.yaml") and os.path.isfile(builder.config_path())
        dataset = builder.dataset_class
        assert issubclass(dataset, mvptr_data.MVPTRTaskMixin) and dataset.__module__ == mvptr_data.__name__
        assert (dataset.text_field, dataset.id_field) == (field, key)
    for name in ("mvptr_captions", "mvptr_coco_retrieval", "mvptr_flickr30k_retrieval"):
        builder = registry.get_builder_class(name)
        assert builder().dataset_name == name
        assert builder.config_path() == os.path.join(CONFIG_DIR, f"{name}.yaml") and os.path.isfile(builder.config_path())
    assert registry.get_builder_class("mvptr_captions").dataset_class is MVPTRCaptionsDataset
    retrieval = registry.get_builder_class("mvptr_coco_retrieval")
    assert retrieval.dataset_class is mvptr_data.MVPTRRetrievalDataset and retrieval().num_outputs(None) == 2


# --------------------------------------------------------------------------- from the first mutation pass
FIELD_NAMES = ("input_ids", "input_mask", "segment_ids", "lm_label_ids", "phrase_slots", "tag_ids", "tag_mask",
               "mcr_label_ids", "image_index")


def test_every_field_is_a_long_tensor(data):
    sample = make(data, mlm_probability=0.5, phrase_mask_probability=0.5, mcr_mask_probability=0.5)[0]
    for name in FIELD_NAMES:
        assert sample[name].dtype == torch.long, name


def test_chain_masking_reads_every_position_of_the_selection():
    selected = torch.tensor([True, False, False])  # the first position (e.g. a tool's own [CLS] numbering)
    out, chained = chain_mask_phrases([7, 8], [[0], [1]], selected, mask_token_id=4, concept_ids=[7], prob=0.0)
    assert out.tolist() == [4, 8] and chained.tolist() == [True, False]


def test_padding_is_the_tokenizer_pad_id(data, tmp_path):
    """[PAD] where the tokenizer has it (id 5 in a vocabulary that puts it there), in the text and the tags."""
    vocab = write_vocab(tmp_path / "vocab", ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "[PAD]"] + WORDS)
    write_lines(tmp_path / "plain.jsonl", [{"image_id": "img0", "text": "a man"}])
    ds = unmasked(data, annotations=str(tmp_path / "plain.jsonl"),
                  **{"processors.text_processor.params.tokenizer_config.type": str(vocab)})
    assert ds.tokenizer.pad_token_id == 5
    sample = ds[0]
    assert sample.input_ids[4:].tolist() == [5] * 11 and sample.tag_ids[5:].tolist() == [5]
    zero = unmasked(data)[0]  # [PAD] = 0 in the shared vocabulary: tags padded with 0 too
    assert zero.tag_ids[5:].tolist() == [0]


def test_spare_slots_budget_counts_the_words_left_free(data, tmp_path):
    """A 3-word caption with 12 phrases, max_tokens 12, max_phrases 3: 3 + (12 - 2 - 3) = 10 phrases fit."""
    ids = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    phrases = list(range(100, 112))
    write_lines(tmp_path / "many.jsonl", [{"image_id": "img0", "input_ids": [2, ids["a"], ids["man"], ids["."], 3],
                                           "phrase_ids": phrases, "phrase_positions": [[]] * 12}])
    sample = unmasked(data, annotations=str(tmp_path / "many.jsonl"), phrase_spare_slots=True)[0]
    assert sample.phrase_slots.sum() == 10 and sample.input_ids[4:14].tolist() == phrases[:10]
    assert int(sample.input_ids[14]) == 3 and sample.input_mask.sum() == 15


def test_a_tokenised_text_has_no_phrases_even_with_phrase_ids(data, tmp_path):
    write_lines(tmp_path / "text.jsonl", [{"image_id": "img0", "text": "a man", "phrase_ids": [100],
                                           "phrase_positions": [[1]]}])
    sample = unmasked(data, annotations=str(tmp_path / "text.jsonl"))[0]
    assert sample.phrase_slots.sum() == 0 and words(unmasked(data), sample.input_ids[:4]) == ["[CLS]", "a", "man",
                                                                                               "[SEP]"]


def test_plain_records_and_query_texts_name_their_image(data, tasks):
    ds = make_task("mvptr_vqa2", data, tasks, "vqa.jsonl")
    assert ds.phrase_record(("img9", 0), "img9", "a man") == {"image_id": "img9", "text": "a man"}
    from mmf_multilevel.methods.mvptr.data import MVPTRQueryInputs

    inputs = MVPTRQueryInputs("mvptr_captions", query_config(data), ds.text_processor, object_names=lambda: NAMES)
    with pytest.raises(KeyError, match="the query of mvptr_captions: image 'query' has neither input_ids nor a text"):
        inputs.text_sample(None)


def test_the_missing_concepts_error_ends_with_the_way_out(data):
    with pytest.raises(FileNotFoundError, match="; use_phrases: false trains without phrases$"):
        make(data, concepts="missing.json", phrase_mask_probability=0.15)


@pytest.mark.filterwarnings("ignore:.*have no line in")
def test_task_phrases_are_not_read_without_use_phrases_and_are_counted(data, tasks):
    off = make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "vqa_phrases.jsonl", use_phrases=False)  # max_phrases 0
    assert off.phrase_records == {} and off.texts_without_phrases is None and off.phrases_path is None
    masked = make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "vqa_phrases.jsonl", max_phrases=3, mlm_probability=0.5,
                       phrase_mask_probability=0.5, mcr_mask_probability=0.5)
    assert (masked.mlm_probability, masked.phrase_mask_probability, masked.mcr_mask_probability) == (0.0, 0.0, 0.0)
    # a blank line does not end the file; every text without a line is counted
    write_lines(tasks / "gappy.jsonl", ["", tool_line("9", "img0"), "   ", tool_line("7", "img0")])
    ds = make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "gappy.jsonl", max_phrases=3)
    assert ds.texts_without_phrases == 1 and set(ds.phrase_records) == {"7"}
    write_lines(tasks / "none.jsonl", [tool_line("9", "img0")])
    assert make_task("mvptr_vqa2", data, tasks, "vqa.jsonl", "none.jsonl", max_phrases=3).texts_without_phrases == 2
    write_lines(tasks / "ve_one.jsonl", [tool_line("p0", "img0")])
    with pytest.warns(UserWarning, match=r"mvptr_snli_ve \(train\): 1 of 2 hypotheses have no line in"):
        make_task("mvptr_snli_ve", data, tasks, "ve.jsonl", "ve_one.jsonl", max_phrases=3)


def test_a_tool_text_must_match_the_dataset_text_exactly(data, tasks):
    """The tool keeps the text's case (its line's text is the annotation's, spaces folded): another case is
    another text."""
    write_lines(tasks / "vqa_case.jsonl", [{"question_id": 7, "image_id": "img0", "question": "A  Man riding",
                                            "answers": ["yes"] * 10}])
    line = tool_line("7", "img0", "a man riding", [])
    write_lines(tasks / "case_phrases.jsonl", [{**line, "text": "A Man riding"}])
    assert make_task("mvptr_vqa2", data, tasks, "vqa_case.jsonl", "case_phrases.jsonl", max_phrases=3).phrase_records
    write_lines(tasks / "lower_phrases.jsonl", [line])
    with pytest.raises(ValueError, match="lower_phrases.jsonl:1: id '7' holds the text 'a man riding'"):
        make_task("mvptr_vqa2", data, tasks, "vqa_case.jsonl", "lower_phrases.jsonl", max_phrases=3)


@pytest.mark.filterwarnings("ignore:.*have no line in")
def test_datasets_read_the_annotation_file_of_their_index(data, tasks, one_record):
    """``index`` picks one file of a list of annotation files (MMF's multi-file datasets), in every kind."""
    captions = make(data, annotations=["one.jsonl", "captions.jsonl"], features={"train": ["regions.lmdb"] * 2})
    assert len(captions) == 1
    config = captions.config
    for key in config.processors:
        registry.unregister(f"mvptr_captions_{key}")
    second = MVPTRCaptionsDataset("mvptr_captions", config, "train", index=1)
    assert second.dataset_name == "mvptr_captions" and len(second) == 9
    write_lines(tasks / "vqa_one.jsonl", [{"question_id": 7, "image_id": "img0", "question": CAPTION_TEXT,
                                           "answers": ["yes"] * 10}])
    vqa = make_task("mvptr_vqa2", data, tasks, ["vqa_one.jsonl", "vqa.jsonl"],
                    features={"train": [str(data / "regions.lmdb")] * 2})
    assert len(vqa) == 1
    for key in vqa.config.processors:
        registry.unregister(f"mvptr_vqa2_{key}")
    assert len(registry.get_builder_class("mvptr_vqa2").dataset_class("mvptr_vqa2", vqa.config, "train", 1)) == 2


def test_retrieval_reads_the_annotation_file_of_its_index(data, tasks):
    from mmf_multilevel.methods.mvptr.data import MVPTRRetrievalDataset

    write_lines(tasks / "ret_a.jsonl", [{"image_id": "img0", "captions": [CAPTION_TEXT]}])
    write_lines(tasks / "ret_b.jsonl", [{"image_id": "img0", "captions": [CAPTION_TEXT, OTHER_TEXT]}])
    config = OmegaConf.load(os.path.join(CONFIG_DIR, "mvptr_coco_retrieval.yaml")).dataset_config.mvptr_coco_retrieval
    config.data_dir, config.annotations = str(tasks), {"train": ["ret_a.jsonl", "ret_b.jsonl"]}
    config.features = {"train": [str(data / "regions.lmdb")] * 2}
    config.feature_dim, config.max_features, config.max_tokens, config.max_phrases, config.max_tags = DIM, 4, 12, 3, 6
    config.processors.text_processor.params.tokenizer_config.type = str(data / "vocab")
    ds = MVPTRRetrievalDataset("mvptr_coco_retrieval", config, "train", 1)
    assert ds.dataset_name == "mvptr_coco_retrieval" and ds.num_texts == 2
