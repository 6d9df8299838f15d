"""Downstream-task datasets (NLVR2, SNLI-VE, GQA, VG-QA, retrieval, RefCOCO+) and their metrics."""
import json
import os
import shutil

import mmf  # noqa: F401
import pytest
import torch
import torch.multiprocessing as mp
from mmf.common.registry import registry
from mmf.common.sample import SampleList
from omegaconf import OmegaConf

from mmf_multilevel.datasets import generate as gen
from mmf_multilevel.datasets.annotations import AnnotationError
from mmf_multilevel.datasets.base import MissingFeaturesError
from mmf_multilevel.datasets.gqa import SingleAnswerQADataset
from mmf_multilevel.datasets.nlvr2 import NLVR2Dataset
from mmf_multilevel.datasets.refcoco import RefCOCODataset
from mmf_multilevel.datasets.retrieval import RetrievalDataset
from mmf_multilevel.datasets.snli_ve import LABELS, SNLIVEDataset
from mmf_multilevel.evaluation import retrieval as R
from mmf_multilevel.evaluation.grounding import box_iou, grounding_hits, pairwise_iou, xywh_to_xyxy
from mmf_multilevel.features import FeatureCacheReader

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "datasets")
DIM = 16
SPECS = {
    "nlvr2": ("nlvr2/defaults.yaml", NLVR2Dataset, "nlvr2"),
    "snli_ve": ("snli_ve/defaults.yaml", SNLIVEDataset, "snli_ve"),
    "gqa": ("gqa/defaults.yaml", SingleAnswerQADataset, "gqa"),
    "vgqa": ("gqa/vgqa.yaml", SingleAnswerQADataset, "vgqa"),
    "coco_retrieval": ("retrieval/coco_retrieval.yaml", RetrievalDataset, "retrieval"),
    "refcoco_plus": ("refcoco_plus/defaults.yaml", RefCOCODataset, "refcoco+"),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks") / "demo"
    gen.generate(out, num_images=40, feature_dim=DIM, seed=11, progress=False, images=False)
    return out


def make(name, data_dir, split="train", annotation=None, **overrides):
    path, cls, prefix = SPECS[name]
    config = OmegaConf.load(os.path.join(CONFIGS, path)).dataset_config[name]
    config.data_dir = str(data_dir)
    config.feature_dim = DIM
    config.max_features = 6
    suffix = {"refcoco_plus": {"test": "testA"}}.get(name, {}).get(split, split)
    config.annotations[split] = annotation or f"annotations/{prefix}_{suffix}.jsonl"
    config.processors.text_processor.params.tokenizer_config.type = os.path.join(str(data_dir), "vocab")
    if "answer_processor" in config.processors:
        config.processors.answer_processor.params.vocab_file = "answers_gqa.txt"
    for dotted, value in overrides.items():
        OmegaConf.update(config, dotted, value, merge=False)
    for key in config.processors:
        registry.unregister(f"{name}_{key}")
    dataset = cls(name, config, split)
    dataset.init_processors()
    return dataset


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- NLVR2
def test_nlvr2_paired_layout(demo):
    dataset = make("nlvr2", demo)
    records = dataset.records
    reader = FeatureCacheReader(str(demo / "features" / "regions.lmdb"))
    sample = dataset[0]
    left = reader.get(records[0]["left_image"])
    n = left["num_boxes"]
    torch.testing.assert_close(sample.img0.image_feature_0[:n], torch.from_numpy(left["features"]).float())
    assert int(sample.img1.image_info_0.max_features) == reader.get(records[0]["right_image"])["num_boxes"]
    assert int(sample.targets) == int(records[0]["label"])
    batch = SampleList([dataset[i] for i in range(4)])
    assert batch.img0.image_feature_0.shape == (4, 6, DIM) and batch.img1.image_info_0.max_features.shape == (4,)
    labels = [r["label"] for r in records]
    assert 0 < sum(labels) < len(labels)


def test_nlvr2_concatenated_layout(demo):
    dataset = make("nlvr2", demo, input_layout="concatenated")
    sample = dataset[0]
    n0 = int(make("nlvr2", demo)[0].img0.image_info_0.max_features)
    assert sample.image_feature_0.shape == (12, DIM)
    assert sample.image_segment_ids.tolist() == [0] * 6 + [1] * 6
    assert int(sample.image_mask[:6].sum()) == n0 and sample.image_mask[n0:6].sum() == 0


def test_nlvr2_official_labels_and_ids(tmp_path, demo):
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    path = target / "annotations" / "nlvr2_train.jsonl"
    records = lines(path)
    records[0]["label"] = "True"
    del records[1]["left_image"], records[1]["right_image"]
    records[1]["identifier"] = "train-7-1-0"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(MissingFeaturesError, match=r"'train-7-1-img0', 'train-7-1-img1'"):
        make("nlvr2", target)
    records[0]["label"] = "maybe"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(AnnotationError, match=r"nlvr2_train\.jsonl:1: field 'label' must be true/false"):
        make("nlvr2", target)


def test_nlvr2_pair_with_a_missing_image(tmp_path, demo):
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    path = target / "annotations" / "nlvr2_val.jsonl"
    records = lines(path)
    records[2]["right_image"] = "gone"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(MissingFeaturesError, match=r"'gone'"):
        make("nlvr2", target, "val")
    with pytest.warns(UserWarning, match="dropped their 1 of"):
        dataset = make("nlvr2", target, "val", skip_missing_features=True)
    assert dataset.num_dropped == 1


# --------------------------------------------------------------------------- SNLI-VE
def test_snli_ve_labels_and_official_names(tmp_path, demo):
    dataset = make("snli_ve", demo)
    assert [int(dataset[i].targets) for i in range(3)] == [LABELS.index(r["label"]) for r in dataset.records[:3]]
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    path = target / "annotations" / "snli_ve_val.jsonl"
    official = [{"Flickr30K_ID": r["image_id"], "sentence2": r["hypothesis"], "gold_label": r["label"]} for r in lines(path)]
    path.write_text("\n".join(json.dumps(r) for r in official) + "\n")
    assert int(make("snli_ve", target, "val")[0].targets) == LABELS.index(official[0]["gold_label"])
    official[3]["gold_label"] = "-"
    path.write_text("\n".join(json.dumps(r) for r in official) + "\n")
    with pytest.raises(AnnotationError, match=r"snli_ve_val\.jsonl:4: field 'label' must be one of"):
        make("snli_ve", target, "val")


# --------------------------------------------------------------------------- GQA
def test_gqa_targets_and_out_of_vocabulary_answers(demo):
    dataset = make("gqa", demo)
    vocab = gen.gqa_answer_vocabulary()
    oov = [i for i, r in enumerate(dataset.records) if r["answer"] not in vocab]
    inv = [i for i, r in enumerate(dataset.records) if r["answer"] in vocab]
    assert oov and inv  # "diamond" is outside the demo's GQA vocabulary on purpose
    good, bad = dataset[inv[0]], dataset[oov[0]]
    assert int(good.answer_index) == vocab.index(dataset.records[inv[0]]["answer"]) and good.targets.sum() == 1
    assert int(bad.answer_index) == -1 and bad.targets.sum() == 0


def test_gqa_accuracy_counts_oov_wrong_where_mmf_accuracy_does_not():
    """A naive accuracy on one-hot targets counts an out-of-vocabulary answer right when class 0 wins."""
    metric = registry.get_metric_class("gqa_accuracy")()
    mmf_accuracy = registry.get_metric_class("accuracy")()
    scores = torch.tensor([[5.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    targets = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # first answer: not in the vocabulary
    sample = SampleList({"targets": targets, "answer_index": torch.tensor([-1, 1])})
    assert float(metric.calculate(sample, {"scores": scores})) == 0.5
    assert float(mmf_accuracy.calculate(sample, {"scores": scores})) == 1.0


def test_vgqa_normalises_answers(demo):
    dataset = make("vgqa", demo)
    processor = registry.get("vgqa_answer_processor")
    assert processor.normalize is True
    assert int(processor({"answer": "Red."})["answer_index"]) == gen.gqa_answer_vocabulary().index("red")
    gqa = make("gqa", demo)
    assert int(registry.get("gqa_answer_processor")({"answer": "Red."})["answer_index"]) == -1
    assert len(dataset) and len(gqa)


# --------------------------------------------------------------------------- retrieval
def test_retrieval_train_and_gallery(demo):
    train = make("coco_retrieval", demo)
    assert len(train) == train.num_texts == 2 * train.num_images
    import random

    random.seed(1)
    matches = [int(train[i].targets) for i in range(40)]
    assert 0 < sum(matches) < 40
    for i in range(10):
        s = train[i]
        assert int(s.targets) == int(train.texts[int(s.text_index)][0] == int(s.image_index))
    val = make("coco_retrieval", demo, "val")
    assert len(val) == val.num_images * val.num_texts
    s = val[val.num_texts + 3]  # image 1, caption 3
    assert int(s.pair_image_index) == 1 and int(s.pair_text_index) == 3 and int(s.targets) == int(val.texts[3][0] == 1)
    assert sum(int(val[i].targets) for i in range(len(val))) == val.num_texts


def test_ranks_and_ties():
    gt = torch.eye(3, dtype=torch.bool)
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.4, 0.5], [0.1, 0.2, 0.8]])
    i2t, t2i = R.ranks(scores, gt)
    assert i2t.tolist() == [0, 1, 0] and t2i.tolist() == [0, 0, 0]
    # a constant model: argsort-based code would put every match first (index order); here: last
    constant = torch.zeros(3, 3)
    i2t, t2i = R.ranks(constant, gt)
    naive = [int((torch.argsort(-constant[i], stable=True) == i).nonzero()) for i in range(3)]
    assert naive == [0, 1, 2] and i2t.tolist() == [2, 2, 2]
    assert R.ranks(constant, gt, ties="optimistic")[0].tolist() == [0, 0, 0]
    # several captions per image: the best-scoring one counts
    gt2 = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    s2 = torch.tensor([[0.1, 0.7, 0.9, 0.2], [0.5, 0.0, 0.2, 0.6]])
    i2t, t2i = R.ranks(s2, gt2)
    assert i2t.tolist() == [1, 0] and t2i.tolist() == [1, 0, 1, 0]
    m = R.retrieval_metrics(i2t, t2i)
    assert m["tr_r1"] == 50 and m["tr_r5"] == 100 and m["ir_r1"] == 50 and m["rsum"] == 50 + 100 + 100 + 50 + 100 + 100
    with pytest.raises(ValueError, match="empty"):
        R.recall_at(torch.zeros(0))


def test_all_pairs_in_chunks_and_two_stage():
    torch.manual_seed(0)
    img, txt = torch.randn(7, 5), torch.randn(11, 5)
    calls = []

    def match(i, t):
        calls.append(len(i))
        return (img[i] * txt[t]).sum(-1)

    full = R.all_pair_scores(7, 11, match, chunk_size=10)
    assert max(calls) <= 10 and sum(calls) == 77
    torch.testing.assert_close(full, img @ txt.t())
    shard = R.all_pair_scores(7, 11, match, chunk_size=10, image_rows=[2, 3])
    torch.testing.assert_close(shard, (img @ txt.t())[2:4])
    # two-stage with k = gallery size equals all-pairs scoring
    i2t, t2i = R.two_stage_scores(img, txt, match, k=11)
    torch.testing.assert_close(i2t, img @ txt.t())
    torch.testing.assert_close(t2i, img @ txt.t())
    # small k: only each query's top-k by embedding similarity are re-scored
    i2t, _ = R.two_stage_scores(img, txt, lambda i, t: torch.ones(len(i)), k=3)
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    top = sim.topk(3, dim=1).indices
    expected = torch.full((7, 11), float("-inf")).scatter(1, top, 1.0)
    torch.testing.assert_close(i2t, expected)
    # k texts per image and k_t2i images per text (MVPTR: 128 / 64); a pair in both candidate sets scored once
    seen = []

    def counting(i, t):
        seen.extend(zip(i.tolist(), t.tolist()))
        return (img[i] * txt[t]).sum(-1)

    i2t, t2i = R.two_stage_scores(img, txt, counting, k=4, k_t2i=2, chunk_size=5)
    assert len(seen) == len(set(seen))
    want_i2t = {(i, int(t)) for i in range(7) for t in sim.topk(4, dim=1).indices[i]}
    want_t2i = {(int(i), t) for t in range(11) for i in sim.t().topk(2, dim=1).indices[t]}
    assert set(seen) == want_i2t | want_t2i
    assert {tuple(p) for p in torch.isfinite(i2t).nonzero().tolist()} == want_i2t
    assert {tuple(p) for p in torch.isfinite(t2i).nonzero().tolist()} == want_t2i
    torch.testing.assert_close(t2i[torch.isfinite(t2i)], (img @ txt.t())[torch.isfinite(t2i)])
    with pytest.raises(ValueError, match="empty retrieval gallery"):
        R.all_pair_scores(0, 3, match)


def _distributed_worker(rank, world, init, scores, gt, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rows = R.shard_rows(scores.shape[0], rank, world)
    i2t, t2i = R.distributed_ranks(scores[rows], gt[rows])
    torch.save({"rows": rows, "i2t": i2t, "t2i": t2i}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_distributed_ranks_equal_single_process(tmp_path):
    torch.manual_seed(3)
    scores = torch.randn(5, 10).round(decimals=1)  # rounded: ties happen
    gt = torch.zeros(5, 10, dtype=torch.bool)
    gt[torch.arange(10) // 2, torch.arange(10)] = True
    mp.spawn(_distributed_worker, args=(2, f"file://{tmp_path / 'init'}", scores, gt, str(tmp_path / "out")), nprocs=2)
    parts = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    ref_i2t, ref_t2i = R.ranks(scores, gt)
    assert torch.cat([p["i2t"] for p in parts]).tolist() == ref_i2t.tolist()
    for p in parts:
        assert p["t2i"].tolist() == ref_t2i.tolist()


def test_retrieval_metric_from_accumulated_pairs():
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.4, 0.5], [0.1, 0.2, 0.8]])
    image, text = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    logits = torch.stack([torch.zeros(9), scores.reshape(-1)], dim=1)
    sample = SampleList({
        "pair_image_index": image.reshape(-1), "pair_text_index": text.reshape(-1),
        "targets": (image == text).long().reshape(-1),
    })
    output = {"scores": logits}
    values = {k: float(registry.get_metric_class(f"retrieval_{k}")().calculate(sample, output)) for k in ("tr_r1", "ir_r1", "rsum")}
    assert values["tr_r1"] == pytest.approx(200 / 3) and values["ir_r1"] == 100 and values["rsum"] == pytest.approx(200 / 3 + 500)
    with pytest.raises(ValueError, match="were not scored"):
        short = SampleList({k: v[:-1] for k, v in sample.items()})
        registry.get_metric_class("retrieval_rsum")().calculate(short, {"scores": logits[:-1].clone()})


def test_empty_retrieval_gallery(tmp_path, demo):
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    (target / "annotations" / "retrieval_val.jsonl").write_text("\n")
    with pytest.raises(AnnotationError, match=r"retrieval_val\.jsonl: no records"):
        make("coco_retrieval", target, "val")


# --------------------------------------------------------------------------- RefCOCO+
def test_iou_and_grounding_hits():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1.0, 50 / 150, 0.0]))
    assert pairwise_iou(a[:1], b).shape == (1, 3)
    torch.testing.assert_close(xywh_to_xyxy([1, 2, 3, 4]), torch.tensor([1.0, 2, 4, 6]))
    proposals = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]] * 2)
    gold = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    # the padding proposal scores highest but is never chosen; IoU exactly 0.5 is not a hit
    scores = torch.tensor([[1.0, 0.0, 9.0], [0.0, 1.0, 9.0]])
    assert grounding_hits(scores, proposals, torch.tensor([2, 2]), gold).tolist() == [True, True]
    half = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 20]])
    assert grounding_hits(torch.tensor([[1.0]]), half[0].unsqueeze(0), torch.tensor([1]), half[1]).tolist() == [False]
    assert grounding_hits(scores, proposals, torch.tensor([0, 2]), gold).tolist() == [False, True]


def test_refcoco_samples_targets_and_metric(demo):
    dataset = make("refcoco_plus", demo)
    sample = dataset[0]
    record = dataset.records[0]
    gold = xywh_to_xyxy(record["bbox"])
    n = int(sample.num_proposals)
    iou = pairwise_iou(sample.proposal_boxes[:n], gold.unsqueeze(0)).squeeze(1)
    assert int(sample.targets) == int(iou.argmax()) and iou.max() > 0.5  # the detector found the shape
    assert sample.label_mask[:n].tolist() == (iou > 0.5).tolist()
    batch = SampleList([dataset[i] for i in range(len(dataset))])
    metric = registry.get_metric_class("refcoco_accuracy")()
    oracle = torch.nn.functional.one_hot(batch.targets, 6).float()
    assert float(metric.calculate(batch, {"scores": oracle})) == 1.0
    worst = -oracle
    assert float(metric.calculate(batch, {"scores": worst})) < 1.0
    weak = make("refcoco_plus", demo, supervision="none")
    assert "targets" not in weak[0] and int(weak[0].is_correct) == 1 and "gold_box" in weak[0]
    # image_index: one per image of the split (the expressions of an image are ITC positives of each other)
    image_of = {int(weak[i].image_index): weak.records[i]["image_id"] for i in range(len(weak))}
    assert sorted(image_of) == list(range(len({r["image_id"] for r in weak.records})))
    assert all(image_of[int(weak[i].image_index)] == weak.records[i]["image_id"] for i in range(len(weak)))
    assert len(make("refcoco_plus", demo, "test")) and len(make("refcoco_plus", demo, "test", annotation="annotations/refcoco+_testB.jsonl"))


def test_refcoco_box_outside_image(tmp_path, demo):
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    path = target / "annotations" / "refcoco+_val.jsonl"
    records = lines(path)
    records[0]["bbox"] = [10, 10, 5000, 20]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(ValueError, match=r"ref_id \d+: gold box \[10, 10, 5000, 20\] .* lies outside the \d+x\d+ image"):
        make("refcoco_plus", target, "val")[0]
    records[0]["bbox"] = [10, 10, 0, 20]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(AnnotationError, match=r"refcoco\+_val\.jsonl:1: field 'bbox' has a non-positive width"):
        make("refcoco_plus", target, "val")
