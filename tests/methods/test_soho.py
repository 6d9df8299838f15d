"""SOHO (mmf_multilevel/methods/soho/): the grid encoder, the visual dictionary (assignment,
straight-through gradient, Eq. 4 and its order, the distributed update), MVM masking, the pair
layout, the losses against independent computations, the freeze schedule, the optimizer and the
fine-tuning bypass, on tiny random configs (CPU)."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import BertConfig

from helpers import spies
from helpers.heads import assert_bert_transform
from mmf_multilevel.methods.progress import TrainingProgress
from mmf_multilevel.methods.soho import testing as tiny
from mmf_multilevel.methods.soho.data import CONFIG_DIR
from mmf_multilevel.methods.soho.model import SOHO
from mmf_multilevel.methods.soho.network import GridEncoder, SOHONetwork, VisualDictionary, sine_position_embedding
from mmf_multilevel.methods.soho.pretraining import (
    SOHOPretrainingHeads,
    compose_itm_pairs,
    draw_mvm_mask,
    mvm_labels,
    pretraining_losses,
    unmasked_text,
)
from mmf_multilevel.modules.masking import IGNORE_INDEX
from mmf_multilevel.modules.text import BertTextEncoder

pytestmark = pytest.mark.usefixtures("mmf_global_config")

HIDDEN, K = 32, 16


def tiny_text():
    config = BertConfig(vocab_size=40, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertTextEncoder.from_config(config)


def tiny_network(seed=0, **kw):
    torch.manual_seed(seed)
    return SOHONetwork(tiny_text(), backbone="resnet10t", pretrained_backbone=False, vd_size=K, mask_token_id=tiny.MASK,
                       **kw)


def build(head_type="pretraining", seed=0, **overrides):
    config = OmegaConf.merge(OmegaConf.load(SOHO.config_path()).model_config.soho, tiny.tiny_config(head_type),
                             overrides)
    torch.manual_seed(seed)
    model = SOHO(config)
    model.build()
    model.init_losses()
    return model


def spy_joint(model):
    """Every ``backbone.joint`` call's ``input_ids``, ``visual``, ``masked`` and ``segment_ids``."""
    calls = []
    original = model.backbone.joint

    def spy(input_ids, text_mask, visual, visual_mask, grid, masked=None, segment_ids=None):
        calls.append({"input_ids": input_ids, "visual": visual, "masked": masked, "segment_ids": segment_ids})
        return original(input_ids, text_mask, visual, visual_mask, grid, masked=masked, segment_ids=segment_ids)

    model.backbone.joint = spy
    return calls


def recorded_mvm_draws(monkeypatch):
    """Every ``draw_mvm_mask`` call of the model: ``(args, kwargs, mask)``."""
    import mmf_multilevel.methods.soho.model as soho_model

    return spies.recorded(monkeypatch, soho_model, "draw_mvm_mask")


def update(model, batch, optimizer, progress, seed=0):
    """One optimizer update as the mmf_multilevel trainer runs it."""
    model.on_update_start(progress)
    torch.manual_seed(seed)
    losses = model(batch)["losses"]
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    model.synchronize(1)
    optimizer.step()
    return losses


# ---------------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("size", [(600, 1000), (600, 800), (65, 129), (64, 64), (130, 200)])
def test_grid_has_ceil_h_over_64_times_ceil_w_over_64_cells(size):
    torch.manual_seed(0)
    encoder = GridEncoder("resnet10t", HIDDEN, pretrained=False).eval()
    with torch.no_grad():
        grid, cells = encoder(torch.randn(1, 3, *size))
    expected = (math.ceil(size[0] / 64), math.ceil(size[1] / 64))
    assert tuple(grid.shape) == (1, HIDDEN, *expected) and tuple(cells.shape) == (1, *expected)
    if size == (600, 1000):
        assert expected[0] * expected[1] == 160  # the paper's §4.5 count


def test_channels_last_encoder_computes_what_the_nchw_one_does_and_loads_its_weights():
    torch.manual_seed(0)
    nchw = GridEncoder("resnet10t", HIDDEN, pretrained=False, channels_last=False)
    nhwc = GridEncoder("resnet10t", HIDDEN, pretrained=False)  # the default
    nhwc.load_state_dict(nchw.state_dict())
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(w.is_contiguous() for w in convs if w.shape[-1] > 1)  # (a 1x1 kernel is both)
    assert all(m.weight.is_contiguous() for m in nchw.modules() if isinstance(m, torch.nn.Conv2d))
    pixels = torch.randn(2, 3, 130, 200)
    grids = []
    for encoder in (nchw, nhwc):
        grid, cells = encoder(pixels)
        grid.square().sum().backward()
        grids.append((grid, cells, encoder.proj.weight.grad, encoder.resnet.conv1[0].weight.grad))
    assert grids[1][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(*grids):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # the cells read by the transformer are the same row-major sequence in either layout
    network = tiny_network(channels_last=False).eval()
    other = tiny_network(channels_last=True).eval()
    other.load_state_dict(network.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other.encode_image(pixels)["features"], network.encode_image(pixels)["features"],
                                   rtol=1e-4, atol=1e-4)


def test_padding_cells_are_masked_and_never_attended():
    network = tiny_network().eval()
    pixels, sizes = tiny.images(2, torch.Generator().manual_seed(0), height=200, width=320,
                                sizes=[[200, 320], [130, 190]])
    rows = torch.arange(200).view(1, 200, 1) < sizes[:, 0].view(2, 1, 1)
    cols = torch.arange(320).view(1, 1, 320) < sizes[:, 1].view(2, 1, 1)
    image = network.encode_image(pixels, rows & cols)
    assert image["grid"] == (4, 5)
    assert image["mask"].sum(1).tolist() == [4 * 5, 3 * 3]  # ⌈130/64⌉ x ⌈190/64⌉ real cells
    ids, text_mask = tiny.texts(2, torch.Generator().manual_seed(1))
    visual = torch.randn(2, 20, HIDDEN)
    base = network.joint(ids, text_mask, visual, image["mask"], image["grid"])
    perturbed = visual.clone()
    perturbed[~image["mask"]] += 100 * torch.randn_like(perturbed[~image["mask"]])
    other = network.joint(ids, text_mask, perturbed, image["mask"], image["grid"])
    torch.testing.assert_close(other["text"], base["text"])
    torch.testing.assert_close(other["visual"][image["mask"]], base["visual"][image["mask"]])
    torch.testing.assert_close(other["pooled"], base["pooled"])


# ---------------------------------------------------------------------------------------------- dictionary
def test_nearest_entry_matches_cdist_and_returns_the_entry_exactly():
    torch.manual_seed(0)
    vd = VisualDictionary(K, HIDDEN).eval()
    v = torch.randn(3, 7, HIDDEN)
    q, ids = vd(v)
    assert torch.equal(ids, torch.cdist(v.reshape(-1, HIDDEN), vd.embedding).argmin(1).view(3, 7))
    assert torch.equal(q, vd.embedding[ids])


def test_straight_through_gradient_reaches_every_trainable_cnn_parameter():
    network = tiny_network().train()
    network.dictionary.updating = False
    assert "dictionary.embedding" not in dict(network.named_parameters())
    assert "dictionary.embedding" in dict(network.named_buffers())
    v = torch.randn(2, 5, HIDDEN, requires_grad=True)
    q, _ = network.dictionary(v)
    r = torch.randn_like(q)
    (q * r).sum().backward()
    assert torch.equal(v.grad, r)  # d f(v) / d v = identity (Eq. 5)
    assert network.dictionary.embedding.grad is None and not network.dictionary.embedding.requires_grad
    pixels, sizes = tiny.images(2, torch.Generator().manual_seed(0))
    image = network.encode_image(pixels)
    (image["quantised"] * torch.randn_like(image["quantised"])).sum().backward()
    trainable = [(n, p) for n, p in network.encoder.named_parameters() if p.requires_grad]
    assert trainable and any(n.startswith("proj.") for n, _ in trainable)
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def eq4(old, v, ids, gamma):
    """Eq. 4 written out entry by entry."""
    new = old.clone()
    for j in range(old.size(0)):
        chosen = v[ids == j]
        if len(chosen):
            new[j] = gamma * old[j] + (1 - gamma) * chosen.double().mean(0).float()
    return new


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.99, 1.0])
def test_eq4_moves_used_entries_to_the_cluster_mean_and_leaves_the_rest(gamma):
    torch.manual_seed(0)
    vd = VisualDictionary(K, HIDDEN, momentum=gamma).train()
    old = vd.embedding.clone()
    v = torch.randn(2, 9, HIDDEN) + old[:3].repeat(6, 1).view(2, 9, HIDDEN)  # features near entries 0-2
    _, ids = vd(v)
    assert torch.equal(vd.embedding, old), "the forward pass must not move the dictionary"
    vd.step()
    used = torch.bincount(ids.view(-1), minlength=K) > 0
    assert 0 < used.sum() < K
    assert torch.equal(vd.embedding[~used], old[~used])  # bit-identical
    torch.testing.assert_close(vd.embedding, eq4(old, v.view(-1, HIDDEN), ids.view(-1), gamma), atol=1e-6, rtol=0)
    if gamma == 1.0:
        assert torch.equal(vd.embedding, old)
    assert vd.embedding.grad_fn is None and not vd.embedding.requires_grad


def test_padding_cells_do_not_move_the_dictionary():
    torch.manual_seed(0)
    v = torch.randn(2, 6, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    results = []
    for pad_value in (0.0, 50.0):
        vd = VisualDictionary(K, HIDDEN, momentum=0.5).train()
        vd.embedding.copy_(torch.randn(K, HIDDEN, generator=torch.Generator().manual_seed(1)))
        features = v.clone()
        features[~mask] = pad_value + torch.randn_like(features[~mask])
        _, ids = vd(features, mask)
        old = vd.embedding.clone()
        vd.step()
        torch.testing.assert_close(vd.embedding, eq4(old, v[mask], ids[mask], 0.5), atol=1e-6, rtol=0)
        results.append(vd.embedding.clone())
    assert torch.equal(results[0], results[1])


def test_no_update_in_eval_mode_or_when_not_updating():
    torch.manual_seed(0)
    vd = VisualDictionary(K, HIDDEN, momentum=0.0)
    old = vd.embedding.clone()
    vd.eval()(torch.randn(4, HIDDEN))
    assert not vd.step() and torch.equal(vd.embedding, old)
    vd.train().updating = False
    vd(torch.randn(4, HIDDEN))
    assert not vd.step() and torch.equal(vd.embedding, old)


def test_assignment_under_autocast_is_the_float32_one():
    """Features almost half-way between two entries: a distance in bf16 picks the wrong one."""
    torch.manual_seed(0)
    vd = VisualDictionary(K, HIDDEN).eval()
    a, b = vd.embedding[torch.randint(K, (200,))], vd.embedding[torch.randint(K, (200,))]
    offset = (torch.rand(200, 1) * 2e-3 + 1e-4) * torch.where(torch.rand(200, 1) < 0.5, -1.0, 1.0)
    v = (a + b) / 2 + offset * (b - a)
    exact = torch.cdist(v.double(), vd.embedding.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, ids = vd(v)
    assert torch.equal(ids, exact) and vd.embedding.dtype == torch.float32
    assert torch.equal(q, vd.embedding[exact])


def test_loss_of_an_update_uses_the_dictionary_before_its_update():
    """Update order: the forward assigns with D, the loss sees D[ids], and only synchronize moves D (the
    one-time draw of vd_init: feature_statistics, before the first assignment, has its own test)."""
    model = build(vd_momentum=0.0, vd_init="standard_normal").train()
    batch = tiny.tiny_batch("pretraining")
    seen = {}
    original = model.backbone.dictionary.forward

    def spy(v, mask=None):
        seen["before"] = model.backbone.dictionary.embedding.clone()
        q, ids = original(v, mask)
        seen["q"], seen["ids"], seen["mask"] = q.detach().clone(), ids, mask
        return q, ids

    model.backbone.dictionary.forward = spy
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    model(batch)
    assert torch.equal(seen["q"], seen["before"][seen["ids"]])
    assert torch.equal(model.backbone.dictionary.embedding, seen["before"])
    model.synchronize(1)
    moved = model.backbone.dictionary.embedding
    assert not torch.equal(moved, seen["before"])
    used = torch.bincount(seen["ids"][seen["mask"]], minlength=K) > 0
    assert torch.equal(moved[~used], seen["before"][~used])


def _dictionary_rank(rank, world, init, v, mask, out, idle_rank=-1):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    vd = VisualDictionary(K, HIDDEN, momentum=0.9).train()
    half = v.size(0) // world
    for micro in range(2 if rank != idle_rank else 0):  # two forward passes of one update (gradient accumulation)
        rows = slice(rank * half + micro * half // 2, rank * half + (micro + 1) * half // 2)
        vd(v[rows], mask[rows])
    vd.step()
    torch.save({"embedding": vd.embedding, "usage": vd.usage}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("idle_rank", [-1, 1], ids=["both ranks", "rank 1 without statistics"])
def test_two_gloo_ranks_update_the_dictionary_as_one_process(tmp_path, idle_rank):
    torch.manual_seed(0)
    reference = VisualDictionary(K, HIDDEN, momentum=0.9).train()
    v = torch.randn(8, 6, HIDDEN) + reference.embedding[:6].unsqueeze(0)
    mask = torch.rand(8, 6) > 0.3
    used = slice(0, 4) if idle_rank == 1 else slice(0, 8)  # an idle rank contributes zeros to the all-reduce
    reference(v[used], mask[used])
    reference.step()
    # spawned ranks: a forked rank can deadlock in the OpenMP pool the parent has already used
    mp.spawn(_dictionary_rank, args=(2, f"file://{tmp_path / 'init'}", v, mask, str(tmp_path / "out"), idle_rank),
             nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["embedding"], ranks[1]["embedding"])
    torch.testing.assert_close(ranks[0]["embedding"], reference.embedding, atol=1e-6, rtol=0)
    assert torch.equal(ranks[0]["usage"], reference.usage)


def test_usage_statistics():
    vd = VisualDictionary(4, 2, momentum=0.5).train()
    vd.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    vd(torch.tensor([[0.1, 0.0], [9.9, 0.0], [0.0, 9.8], [0.2, 0.1]]))
    vd.step()
    summary = vd.usage_summary()
    assert summary["distinct"] == 3 and summary["never_used"] == 1
    p = torch.tensor([0.5, 0.25, 0.25])
    assert summary["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


# ---------------------------------------------------------------------------------------------- positions
def test_sine_position_embedding():
    small = torch.ones(1, 2, 3, dtype=torch.bool)
    large = torch.ones(1, 4, 5, dtype=torch.bool)
    pos = sine_position_embedding(small, HIDDEN)
    assert pos.shape == (1, 2, 3, HIDDEN) and torch.equal(pos, sine_position_embedding(small, HIDDEN))
    flat = pos.view(6, HIDDEN)
    assert torch.cdist(flat, flat).add(torch.eye(6)).min() > 0  # distinct cells, distinct embeddings
    raw_small = sine_position_embedding(small, HIDDEN, normalize=False)
    raw_large = sine_position_embedding(large, HIDDEN, normalize=False)
    assert torch.equal(raw_small[0], raw_large[0, :2, :3])  # same cell, same embedding across sizes
    # normalized: positions are fractions of each image's extent, so the same cell differs across sizes
    assert not torch.equal(pos[0, 0, 0], sine_position_embedding(large, HIDDEN)[0, 0, 0])


# ---------------------------------------------------------------------------------------------- MVM
def test_mvm_masks_whole_ids_and_only_real_cells():
    ids = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 3, 3, 3],
                        [5, 5, 5, 6, 6, 7, 7, 7, 7, 5]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 8:] = False  # padding cells: one shares id 5 with real cells
    generator = torch.Generator().manual_seed(0)
    for mode in ("ratio", "single_id"):
        for _ in range(50):
            masked = draw_mvm_mask(ids, valid, mode, 0.15, 0.5, generator)
            assert not (masked & ~valid).any()
            assert masked.any(1).all()
            for row in range(2):
                for j in ids[row][valid[row]].unique():
                    cells = masked[row][(ids[row] == j) & valid[row]]
                    assert cells.all() or not cells.any(), (mode, row, int(j))
            labels = mvm_labels(ids, masked)
            assert torch.equal(labels[masked], ids[masked]) and (labels[~masked] == IGNORE_INDEX).all()


def test_mvm_shares_and_id_counts():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (400, 40), generator=generator)
    valid = torch.rand(400, 40, generator=generator) > 0.2
    single = draw_mvm_mask(ids, valid, "single_id", 0.15, 0.5, generator)
    ratio = draw_mvm_mask(ids, valid, "ratio", 0.15, 0.5, generator)
    for row in range(400):
        assert ids[row][single[row]].unique().numel() == 1
        share = ratio[row].sum().item() / valid[row].sum().item()
        assert 0.15 <= share <= 0.5 + 1e-9 and ids[row][ratio[row]].unique().numel() >= 1
    # an id over the cap (12 of 20 cells > 50 %) is never chosen while another id fits
    dominant = torch.tensor([[0] * 12 + list(range(1, 9))])
    real = torch.ones(1, 20, dtype=torch.bool)
    for mode in ("ratio", "single_id"):
        for _ in range(30):
            assert not draw_mvm_mask(dominant, real, mode, 0.15, 0.5, generator)[0, :12].any()
    # one id covering the whole image: still one id masked (the only one), over the cap
    whole = draw_mvm_mask(torch.full((1, 10), 3), torch.ones(1, 10, dtype=torch.bool), "ratio", 0.15, 0.5)
    assert whole.all()


def test_mvm_masked_cells_read_the_mask_word_embedding_plus_position_and_type():
    network = tiny_network().eval()
    visual = torch.randn(1, 6, HIDDEN)
    mask = torch.ones(1, 6, dtype=torch.bool)
    masked = torch.tensor([[False, True, False, False, True, False]])
    out = network.visual_embeddings(visual, mask, (2, 3), masked)
    text = network.text
    pos = sine_position_embedding(mask.view(1, 2, 3), HIDDEN).view(1, 6, HIDDEN)
    inputs = torch.where(masked[..., None], text.word_embeddings.weight[tiny.MASK].expand(1, 6, HIDDEN), visual)
    expected = F.layer_norm(inputs + pos + text.token_type_embeddings.weight[1], (HIDDEN,),
                            network.visual_norm.weight, network.visual_norm.bias, network.visual_norm.eps)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------- pairs
def test_each_image_gets_two_own_captions_and_two_of_other_images():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        pairs = compose_itm_pairs(5, 3, generator=generator)
        image, text, label = pairs["pair_image_index"], pairs["pair_text_index"], pairs["is_correct"]
        assert len(image) == 20
        for i in range(5):
            rows = image == i
            assert rows.sum() == 4 and label[rows].tolist() == [1, 1, 0, 0]
            own, other = text[rows][:2], text[rows][2:]
            assert (own // 3 == i).all() and own[0] != own[1]
            assert (other // 3 != i).all()
    with pytest.raises(ValueError, match="at least 2 images"):
        compose_itm_pairs(1, 2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from mmf_multilevel.datasets import generate as gen

    root = tmp_path_factory.mktemp("soho_demo") / "demo"
    gen.generate(root, num_images=8, progress=False)
    return root


def test_corpus_gives_each_image_two_own_and_two_other_captions(demo):
    import json

    import mmf  # noqa: F401  (registers the builders)
    from mmf.common.registry import registry
    from mmf.utils.build import build_processors

    name = "soho_coco_captions"
    builder = registry.get_builder_class(name)
    config = OmegaConf.load(builder.config_path()).dataset_config[name]
    config.data_dir = str(demo)
    config.processors.text_processor.params.tokenizer_config.type = str(demo / "vocab")
    config.processors.image_processor.params.train = {"size": 64, "max_size": 96, "pad_to": None}
    dataset = builder().load(config, "train")
    dataset.init_processors = lambda: None
    for key, processor in build_processors(config.processors).items():
        setattr(dataset, key, processor)
    captions = {}
    for line in open(demo / "annotations" / "captions_train.jsonl"):
        record = json.loads(line)
        captions.setdefault(str(record["image_id"]), []).append(record["caption"])
    assert len(dataset) == len(captions)  # one sample per image
    samples = [dataset[i] for i in range(4)]
    batch = dataset.collate_fn(samples)
    assert batch.image.shape[0] == 4 and "input_ids" not in batch
    pairs = batch.pairs
    assert pairs.input_ids.shape[0] == 16 and pairs.lm_label_ids.shape == pairs.input_ids.shape
    vocab = [line.strip() for line in open(demo / "vocab" / "vocab.txt")]
    clean = unmasked_text(pairs.input_ids, pairs.lm_label_ids)

    def norm(text):
        return "".join(ch for ch in text.lower() if ch.isalnum())

    def words(row):
        return norm("".join(vocab[i] for i in clean[row].tolist() if i > 4))

    rows = {image: (pairs.pair_image_index == image).nonzero().view(-1).tolist() for image in range(4)}
    drawn = {image: {words(r) for r in rows[image][:2]} for image in range(4)}
    for image in range(4):
        assert pairs.is_correct[rows[image]].tolist() == [1, 1, 0, 0]
        own = {norm(c) for c in captions[samples[image].image_id]}
        assert drawn[image] <= own and len(drawn[image]) == 2  # two different captions of its own
        others = set().union(*(drawn[j] for j in range(4) if j != image))
        assert all(words(r) in others for r in rows[image][2:])  # captions drawn for other images


def test_corpus_yamls_list_the_image_keys_with_the_mixins_defaults():
    import glob

    from mmf_multilevel.datasets.images import IMAGE_DEFAULTS

    paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
    assert [os.path.basename(p) for p in paths] == ["soho_captions.yaml", "soho_coco_captions.yaml", "soho_vg_captions.yaml"]
    for path in paths:
        for name, node in OmegaConf.load(path).dataset_config.items():
            given = OmegaConf.to_container(node, resolve=False)
            for key, default in IMAGE_DEFAULTS.items():
                assert given.get(key, "missing") == default, f"{path}: {name}.{key}"
            assert (given["captions_per_image"], given["num_positive"], given["num_negative"]) == (2, 2, 2)


def test_mlm_masking_of_the_corpus_text_processor_follows_bert(demo):
    """MLM's masking is the dataset's masked_token processor (the configured one, with the demo vocabulary):
    15 % of the words selected, 80 / 10 / 10 among them, never [CLS] / [SEP] / padding. Tolerances are 4
    standard errors over ~10^5 words."""
    import json
    import math
    import random

    import mmf  # noqa: F401
    from mmf.utils.build import build_processors

    from mmf_multilevel.datasets.base import text_fields

    config = OmegaConf.load(os.path.join(CONFIG_DIR, "soho_coco_captions.yaml")).dataset_config.soho_coco_captions
    config.processors.text_processor.params.tokenizer_config.type = str(demo / "vocab")
    config.processors.text_processor.params.max_seq_length = 40
    processor = build_processors({"text_processor": config.processors.text_processor})["text_processor"]
    captions = [json.loads(line)["caption"] for line in open(demo / "annotations" / "captions_train.jsonl")]
    random.seed(0)
    selected = words = masked = kept = 0
    while words < 100_000:
        out = text_fields(processor, random.choice(captions))  # as the corpus calls it
        ids, labels, mask = out["input_ids"], out["lm_label_ids"], out["input_mask"].bool()
        real = int(mask.sum())
        assert labels[0] == -1 and labels[real - 1] == -1 and (labels[~mask] == -1).all()  # [CLS], [SEP], padding
        chosen = labels != -1
        words += real - 2
        selected += int(chosen.sum())
        masked += int((ids[chosen] == tiny.MASK).sum())
        kept += int((ids[chosen] == labels[chosen]).sum())
    rate = selected / words
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / words), rate
    for share, p in ((masked / selected, 0.8), (kept / selected, 0.1), ((selected - masked - kept) / selected, 0.1)):
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / selected) + 0.01, (share, p)  # + random = original/[MASK]


def test_cnn_runs_once_per_image():
    model = build().train()
    calls = []
    model.backbone.encoder.resnet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    batch = tiny.tiny_batch("pretraining")
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    model(batch)
    assert calls == [2] and batch.pairs.input_ids.size(0) == 8


def test_the_matching_pass_reads_no_mask_and_the_masked_pass_only_matched_pairs():
    model = build().train()
    batch = tiny.tiny_batch("pretraining")
    pairs = batch.pairs
    assert (pairs.input_ids == tiny.MASK).any()
    calls = spy_joint(model)
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    model(batch)
    (itm_ids, itm_masked), (mlm_ids, mlm_masked) = [(call["input_ids"], call["masked"]) for call in calls]
    assert itm_masked is None and not (itm_ids == tiny.MASK).any()
    assert torch.equal(itm_ids, unmasked_text(pairs.input_ids, pairs.lm_label_ids))
    matched = pairs.is_correct == 1
    assert torch.equal(mlm_ids, pairs.input_ids[matched]) and mlm_masked.shape[0] == int(matched.sum())
    assert mlm_masked.any(1).all()


@pytest.mark.parametrize("separate", [True, False])
def test_mlm_and_mvm_do_not_depend_on_mismatched_pairs(separate):
    model = build(pretraining={"itm_separate_pass": separate}).train()
    model.backbone.dictionary.updating = False
    batch = tiny.tiny_batch("pretraining")
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    torch.manual_seed(5)
    base = model(batch)["losses"]
    negatives = batch.pairs.is_correct == 0
    batch.pairs.input_ids[negatives, 1:4] = torch.randint(5, 40, (int(negatives.sum()), 3))
    torch.manual_seed(5)
    other = model(batch)["losses"]
    for name in ("mlm", "mvm"):
        key = f"train/soho_contract/{name}"
        torch.testing.assert_close(other[key], base[key])
    assert not torch.equal(other["train/soho_contract/itm"], base["train/soho_contract/itm"])


def test_losses_equal_an_independent_computation():
    torch.manual_seed(0)
    network = tiny_network()
    heads = SOHOPretrainingHeads(network, K)
    pairs, length, cells = 4, 6, 5
    is_matched = torch.tensor([1, 0, 1, 0])
    rows = torch.tensor([0, 1, 2, 3])
    out = {"text": torch.randn(pairs, length, HIDDEN), "visual": torch.randn(pairs, cells, HIDDEN)}
    itm_logits = torch.randn(pairs, 2)
    mlm = torch.full((pairs, length), IGNORE_INDEX)
    mlm[0, 2], mlm[1, 3], mlm[2, 1], mlm[2, 4] = 7, 8, 9, 10
    mvm = torch.full((pairs, cells), IGNORE_INDEX)
    mvm[0, 0], mvm[1, 1], mvm[2, 3] = 3, 4, 5
    losses = pretraining_losses(heads, itm_logits, is_matched, out, rows, mlm, mvm)

    def ce(logits, target):
        return -torch.log_softmax(logits, -1)[target]

    word_logits = out["text"] @ network.text.word_embeddings.weight.t()
    word_logits = heads.mlm(out["text"])
    expected_mlm = (ce(word_logits[0, 2], 7) + ce(word_logits[2, 1], 9) + ce(word_logits[2, 4], 10)) / 3
    cell_logits = heads.mvm.decoder(heads.mvm.transform(out["visual"]))
    expected_mvm = (ce(cell_logits[0, 0], 3) + ce(cell_logits[2, 3], 5)) / 2
    expected_itm = sum(ce(itm_logits[i], int(is_matched[i])) for i in range(pairs)) / pairs
    torch.testing.assert_close(losses["mlm"], expected_mlm)
    torch.testing.assert_close(losses["mvm"], expected_mvm)
    torch.testing.assert_close(losses["itm"], expected_itm)
    # without masked_rows the masked pass is one row per pair, in order
    unrowed = pretraining_losses(heads, itm_logits, is_matched, out, None, mlm, mvm)
    assert set(unrowed) == set(losses) and all(torch.equal(unrowed[k], losses[k]) for k in losses)
    # the MLM decoder is the word-embedding table (tied), plus the head's bias
    transformed = heads.mlm.transform(out["text"][0, 2])
    torch.testing.assert_close(word_logits[0, 2], transformed @ network.text.word_embeddings.weight.t() + heads.mlm.bias)


def test_total_is_the_sum_of_three_finite_losses_with_their_shapes():
    model = build().train()
    batch = tiny.tiny_batch("pretraining")
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    out = model(batch)
    losses = out["losses"]
    assert set(losses) == {f"train/soho_contract/{n}" for n in ("mlm", "mvm", "itm")}
    assert all(torch.isfinite(v) for v in losses.values())
    assert out["scores"].shape == (8, 2)
    vqa = build("vqa").eval()
    assert vqa(tiny.tiny_batch("vqa"))["scores"].shape == (2, tiny.ANSWERS)


def test_pretraining_head_shapes(monkeypatch):
    """Spec §8 item 19, the pre-training heads: MVM logits (n_masked, k) over the masked cells of the matched
    pairs, ITM logits (B_pairs, 2); the task heads' shapes are checked in the test below."""
    draws = recorded_mvm_draws(monkeypatch)
    model = build().train()
    shapes = {}
    for name in ("mvm", "itm"):
        getattr(model.heads, name).register_forward_hook(
            lambda module, args, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    batch = tiny.tiny_batch("pretraining")
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    model(batch)
    pairs = batch.pairs.input_ids.size(0)
    ((_, _, mask),) = draws  # one masked pass, over the matched pairs
    assert mask.size(0) == int(batch.pairs.is_correct.sum()) and int(mask.sum()) > 0
    assert shapes == {"mvm": (int(mask.sum()), K), "itm": (pairs, 2)}


def test_task_heads_and_nlvr2_reads_both_images():
    for head_type, classes in (("vqa", tiny.ANSWERS), ("nlvr2", 2), ("snli_ve", 3), ("retrieval", 2)):
        model = build(head_type).eval()
        batch = tiny.tiny_batch(head_type)
        scores = model(batch)["scores"]
        assert scores.shape == (2, classes), head_type
        if head_type == "nlvr2":
            batch.img1.image = batch.img1.image.flip(-1)
            assert not torch.allclose(model(batch)["scores"], scores)


def test_retrieval_inherits_the_pretrained_matching_head():
    from types import SimpleNamespace

    from mmf_multilevel.trainers.checkpoint import MultilevelCheckpoint

    source = build("pretraining", seed=1)
    target = build("retrieval", seed=2)
    config = OmegaConf.create({"checkpoint": {"pretrained_state_mapping": {"backbone": "backbone",
                                                                           "itm_head": "heads.itm"}}})
    writer = SimpleNamespace(write=lambda *args, **kwargs: None)
    stub = SimpleNamespace(trainer=SimpleNamespace(model=target, config=config, writer=writer))
    MultilevelCheckpoint._load_pretrained(stub, source.state_dict())
    for name, value in source.heads.itm.state_dict().items():
        assert torch.equal(target.itm_head.state_dict()[name], value), name
    assert torch.equal(target.backbone.dictionary.embedding, source.backbone.dictionary.embedding)


def test_one_text_per_image_layout_of_a_caption_corpus():
    model = build().train()
    batch = tiny.one_text_batch(num_images=3)
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    out = model(batch)
    assert out["scores"].shape == (3, 2)
    assert set(out["losses"]) == {f"train/soho_contract/{n}" for n in ("mlm", "mvm", "itm")}


def test_without_dictionary_no_mvm_and_the_features_are_read():
    model = build(use_vd=False).train()
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    losses = model(tiny.tiny_batch("pretraining"))["losses"]
    assert set(losses) == {"train/soho_contract/mlm", "train/soho_contract/itm"}
    assert not model.backbone.dictionary.pending


def test_a_few_steps_lower_the_pretraining_loss():
    model = build(vd_momentum=1.0).train()
    batch = tiny.tiny_batch("pretraining")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    totals = [float(sum(v.detach() for v in update(model, batch, optimizer, TrainingProgress(update=u, epoch=1)).values()))
              for u in range(6)]
    assert totals[-1] < totals[0], totals


# ---------------------------------------------------------------------------------------------- hooks
def test_resnet_is_frozen_for_the_first_updates_then_trains():
    model = build(freeze_resnet_updates=2).train()
    optimizer = model.configure_optimizer(None)
    batch = tiny.tiny_batch("pretraining")
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}

    def moved(prefix):
        return any(not torch.equal(p, snapshot[n]) for n, p in model.named_parameters() if n.startswith(prefix))

    for u in range(2):
        update(model, batch, optimizer, TrainingProgress(update=u, epoch=1))
    assert not moved("backbone.encoder.resnet.")
    assert moved("backbone.encoder.proj.") and moved("backbone.text.") and moved("heads.")
    update(model, batch, optimizer, TrainingProgress(update=2, epoch=1))
    assert moved("backbone.encoder.resnet.")


def test_freeze_is_derived_from_the_progress():
    model = build(freeze_resnet_epochs=10)
    for epoch, frozen in ((1, True), (10, True), (11, False)):
        model.on_update_start(TrainingProgress(update=5, epoch=epoch))
        assert model.backbone.encoder.resnet_frozen is frozen
    resumed = build(freeze_resnet_epochs=10)  # a resumed run: only the pushed progress decides
    resumed.on_update_start(TrainingProgress(update=999, epoch=12))
    assert resumed.backbone.encoder.resnet_frozen is False
    assert build("vqa", freeze_resnet_epochs=10).resnet_frozen_at(TrainingProgress(0, 1)) is False


def test_optimizer_partition_and_schedule():
    model = build()
    optimizer = model.configure_optimizer(None)
    sgd, adamw = optimizer.parts["cnn"], optimizer.parts["transformer"]
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    group_of = {}
    for name, part in optimizer.parts.items():
        for group in part.param_groups:
            for p in group["params"]:
                assert id(p) not in group_of
                group_of[id(p)] = (name, group["lr"], group["weight_decay"])
    for name, p in model.named_parameters():
        if name.startswith("backbone.encoder."):
            assert group_of[id(p)] == ("cnn", 1e-2, 5e-4), name
        else:
            assert group_of[id(p)] == ("transformer", 1e-4, 1e-2), name
    assert len(group_of) == len(list(model.parameters()))
    assert id(model.backbone.dictionary.embedding) not in {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_both_learning_rates_step_down_at_lr_steps_from_the_pushed_update():
    model = build(optimization={"lr_steps": [3, 5], "lr_ratio": 0.1})
    optimizer = model.configure_optimizer(None)
    for update_index, factor in ((0, 1.0), (2, 1.0), (3, 0.1), (4, 0.1), (5, 0.01), (9, 0.01), (1, 1.0)):
        model.on_update_start(TrainingProgress(update=update_index, epoch=1))  # also a resume at any update
        assert [g["lr"] for g in optimizer.parts["cnn"].param_groups] == pytest.approx([1e-2 * factor])
        assert [g["lr"] for g in optimizer.parts["transformer"].param_groups] == pytest.approx([1e-4 * factor])
    constant = build()
    constant_optimizer = constant.configure_optimizer(None)
    constant.on_update_start(TrainingProgress(update=10_000, epoch=40))
    assert [g["lr"] for g in constant_optimizer.param_groups] == pytest.approx([1e-2, 1e-4])


@pytest.mark.parametrize("use_vd_in_finetune", [False, True])
def test_fine_tuning_reads_the_features_and_leaves_the_dictionary(use_vd_in_finetune):
    model = build("vqa", use_vd_in_finetune=use_vd_in_finetune).train()
    batch = tiny.tiny_batch("vqa")
    calls = spy_joint(model)
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    model(batch)
    (seen,) = calls
    image = model.backbone.encode_image(*_pixels(batch))
    read, other = ("quantised", "features") if use_vd_in_finetune else ("features", "quantised")
    assert torch.equal(seen["visual"], image[read]) and not torch.equal(seen["visual"], image[other])
    before = model.backbone.dictionary.embedding.clone()
    update(model, batch, model.configure_optimizer(None), TrainingProgress(update=0, epoch=1))
    assert torch.equal(model.backbone.dictionary.embedding, before) and not model.backbone.dictionary.pending
    # the transformer's visual input moves with the features (no dictionary snapping in between)
    v = torch.randn(1, 4, HIDDEN)
    a = model.backbone.visual_embeddings(v, torch.ones(1, 4, dtype=torch.bool), (2, 2))
    b = model.backbone.visual_embeddings(v + 1e-3, torch.ones(1, 4, dtype=torch.bool), (2, 2))
    assert not torch.equal(a, b)


def _pixels(batch):
    from mmf_multilevel.methods.batch import pixel_inputs

    inputs = pixel_inputs(batch, "soho")
    return inputs.pixels, inputs.mask


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model_config.soho.backbone"):
        GridEncoder("vit_tiny_patch16_224", HIDDEN, pretrained=False)
    with pytest.raises(ValueError, match="model_config.soho.vd_momentum"):
        VisualDictionary(4, 4, momentum=1.5)
    with pytest.raises(ValueError, match="mvm_mode"):
        draw_mvm_mask(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), "all")
    model = build().train()
    batch = tiny.tiny_batch("pretraining")
    del batch.pairs["lm_label_ids"]
    with pytest.raises(KeyError, match="masked_token"):
        model(batch)


# ---------------------------------------------------------------------------------------------- dictionary init
def _distinct_after_one_update(vd_init):
    model = build("pretraining", vd_init=vd_init, vd_size=64)
    batch = tiny.pretraining_batch(num_images=4, seed=5, height=256, width=384)  # 4 distinct images, 96 cells
    optimizer = model.configure_optimizer(None)
    update(model, batch, optimizer, TrainingProgress(update=0, epoch=1))
    first = model.backbone.dictionary.usage_summary()["distinct"]
    with torch.no_grad():
        image = model.backbone.encode_image(batch["image"], batch["image_mask"] if "image_mask" in batch else None,
                                            quantise=False)
        ids = model.backbone.dictionary.assign(image["features"])[image["mask"]]
    return first, len(set(ids.tolist())), ids.numel()


def test_a_fresh_dictionary_on_a_random_resnet_uses_many_entries():
    """vd_init feature_statistics (default): entries drawn at the features' per-channel scale before the
    first assignment, so a random ResNet's features spread over the dictionary; the N(0, 1) entries of
    construction (standard_normal) put almost every cell on one or two entries (the collapse the demo logged)."""
    assert build("pretraining").backbone.dictionary.init == "feature_statistics"  # the default
    first, after, cells = _distinct_after_one_update("feature_statistics")
    assert cells >= 40
    assert first >= 8 and after >= 8, (first, after, cells)
    first_n, after_n, _ = _distinct_after_one_update("standard_normal")
    assert first_n <= 2 and after_n <= 2, (first_n, after_n)


def test_feature_statistics_init_runs_once_and_a_loaded_dictionary_is_kept():
    model = build("pretraining", vd_init="feature_statistics")
    dictionary = model.backbone.dictionary
    assert not bool(dictionary.initialised)
    features = torch.randn(2, 6, HIDDEN) * 3 + 5
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    padded = features.clone()
    padded[1, 3:] = 1e6  # padding cells take no part in the statistics
    dictionary.train()
    dictionary(padded, mask)
    assert bool(dictionary.initialised)
    real = features[mask].double()
    z = torch.randn(dictionary.size, HIDDEN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = real.mean(0) + real.std(0, unbiased=False) * z
    torch.testing.assert_close(dictionary.embedding, expected.float(), rtol=1e-5, atol=1e-5)
    drawn = dictionary.embedding.clone()
    dictionary(torch.randn(2, 6, HIDDEN), mask)  # never redrawn
    assert torch.equal(dictionary.embedding, drawn)
    # a checkpoint's dictionary without the flag (older soho checkpoints, converted official ones) is kept
    fresh = build("pretraining", vd_init="feature_statistics")
    state = {k: v for k, v in model.state_dict().items() if k != "backbone.dictionary.initialised"}
    fresh.load_state_dict(state)
    assert bool(fresh.backbone.dictionary.initialised)
    # and a fine-tuning model never draws (the dictionary does not update there)
    tuned = build("vqa", vd_init="feature_statistics")
    before = tuned.backbone.dictionary.embedding.clone()
    tuned.train()
    tuned(tiny.tiny_batch("vqa"))
    assert torch.equal(tuned.backbone.dictionary.embedding, before)


# ---------------------------------------------------------------------------------------------- retrieval batch
def _retrieval_batch(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = tiny._sample_list()
    batch.image, batch.image_size = tiny.images(count, generator)
    batch.input_ids, batch.input_mask = tiny.texts(count, generator)
    batch.segment_ids = torch.zeros_like(batch.input_ids)
    batch.targets = torch.ones(count, dtype=torch.long)
    batch.dataset_name, batch.dataset_type = "coco_retrieval_images", "train"
    return batch


def _pairwise_logits(model, batch, count=3):
    """The matching head's logits ``(count, count, 2)`` of each (image i, caption j) as its own one-pair batch
    through the fine-tuning path (``encode``)."""
    logits = torch.zeros(count, count, 2)
    with torch.no_grad():
        for i in range(count):
            for j in range(count):
                single = tiny._sample_list()
                single.image, single.image_size = batch.image[i:i + 1], batch.image_size[i:i + 1]
                single.input_ids, single.input_mask = batch.input_ids[j:j + 1], batch.input_mask[j:j + 1]
                single.segment_ids = batch.segment_ids[j:j + 1]
                logits[i, j] = model.itm_head(model.encode(single)["pooled"])[0]
    return logits


def test_in_batch_retrieval_scores_every_image_with_every_caption():
    """§4.2.1: t aligned pairs -> t² (image, caption) pairs, aligned on the diagonal, binary CE over all."""
    model = build("retrieval", retrieval_in_batch=True).train()
    batch = _retrieval_batch()
    out = model(batch)
    (name, loss), = out["losses"].items()
    assert name == "train/coco_retrieval_images/itm" and out["scores"].shape == (3, 2)
    logits = _pairwise_logits(model, batch)  # independently: each (image i, caption j) on its own
    labels = torch.eye(3, dtype=torch.long).view(-1)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 2), labels), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["scores"], logits.diagonal(dim1=0, dim2=1).transpose(0, 1), rtol=1e-4, atol=1e-5)
    # two captions of one image in the batch: both its pairs are aligned
    batch.image_index = torch.tensor([4, 4, 9])
    twin = model(batch)["losses"]["train/coco_retrieval_images/itm"]
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]]).view(-1)
    torch.testing.assert_close(twin, F.cross_entropy(logits.view(-1, 2), same), rtol=1e-4, atol=1e-5)


def test_in_batch_retrieval_refuses_swapped_captions_and_evaluates_pairwise():
    model = build("retrieval", retrieval_in_batch=True).train()
    batch = _retrieval_batch()
    batch.targets = torch.tensor([1, 0, 1])
    with pytest.raises(ValueError, match="itm_probability: 0"):
        model(batch)
    model.eval()
    with torch.no_grad():
        assert model(_retrieval_batch())["scores"].shape == (3, 2)  # evaluation scores the dataset's pairs


def test_mvm_settings_boundaries_and_draws_that_follow_the_generator():
    """The masking's settings are checked by key at their boundaries; its defaults are the paper's
    ratio 0.15 under a 0.5 cap; an id exactly at the cap may be masked, one cell over it may not; the ratio
    is reached exactly; rows without real cells (or with one) are handled; the draws follow the given
    generator alone; the mask is boolean whatever the dtype of ``valid``."""
    ids, valid = torch.arange(20).view(1, 20), torch.ones(1, 20, dtype=torch.bool)
    for ratio, max_ratio in ((1.0, 1.0), (0.3, 0.3), (1e-3, 1.0)):
        draw_mvm_mask(ids, valid, "ratio", ratio, max_ratio)
    for ratio, max_ratio, key in ((0.0, 0.5, "mvm_mask_ratio"), (1.5, 1.5, "mvm_mask_ratio"),
                                  (0.3, 0.2, "mvm_max_ratio"), (0.3, 1.5, "mvm_max_ratio")):
        with pytest.raises(ValueError, match=f"model_config.soho.pretraining.{key} must lie in"):
            draw_mvm_mask(ids, valid, "ratio", ratio, max_ratio)
    with pytest.raises(ValueError, match="model_config.soho.pretraining.mvm_mode must be one of"):
        draw_mvm_mask(ids, valid, "bogus")
    with pytest.raises(ValueError, match=r"must both be \(rows, cells\)"):
        draw_mvm_mask(ids.view(-1), valid.view(-1))
    torch.manual_seed(3)
    default = draw_mvm_mask(ids, valid)
    torch.manual_seed(3)
    assert torch.equal(default, draw_mvm_mask(ids, valid, "ratio", 0.15, 0.5))
    # all 20 ids distinct: 0.15 of 20 is reached with exactly 3 cells
    assert int(default.sum()) == 3
    generator = torch.Generator()
    # 5 of 10 cells is exactly the 0.5 cap: allowed, and drawn a third of the time
    at_cap = torch.tensor([[0] * 5 + [1] * 3 + [2] * 2])
    chosen = {int(at_cap[draw_mvm_mask(at_cap, torch.ones_like(at_cap, dtype=torch.bool), "single_id", 0.15, 0.5,
                                        generator)][0]) for _ in range(40)}
    assert chosen == {0, 1, 2}
    # 11 of 20 cells is one over the cap: never drawn; in ratio mode the other ids still reach the ratio
    over = torch.tensor([[0] * 11 + list(range(1, 10))])
    for _ in range(40):
        masked = draw_mvm_mask(over, torch.ones(1, 20, dtype=torch.bool), "ratio", 0.15, 0.5, generator)
        assert not masked[0, :11].any() and int(masked.sum()) == 3
    # a row with no real cell stays unmasked and the next row is still drawn; a single real cell is masked
    rows = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    real = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 0]])
    masked = draw_mvm_mask(rows, real, "single_id", 0.15, 0.5, generator)
    assert masked.dtype == torch.bool
    assert masked[0].sum() == 0 and masked[1].sum() == 1 and masked[2].tolist() == [False, True, False]
    # the generator alone decides
    big = torch.randint(0, 30, (50, 40), generator=torch.Generator().manual_seed(1))
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        draws.append(draw_mvm_mask(big, torch.ones_like(big, dtype=torch.bool), "ratio", 0.15, 0.5,
                                   torch.Generator().manual_seed(7)))
    assert torch.equal(*draws)


def test_pair_settings_boundaries_and_draws_that_follow_the_generator():
    """One caption per image (positives drawn with replacement), no positives or no negatives, and one image
    without negatives are accepted; negative counts, no captions, and negatives with one image are refused;
    the pairs follow the given generator alone; the unmasked text keeps the ids' dtype."""
    one = compose_itm_pairs(3, 1, generator=torch.Generator().manual_seed(0))
    assert one["pair_text_index"].view(3, 4)[:, :2].tolist() == [[0, 0], [1, 1], [2, 2]]
    assert compose_itm_pairs(3, 2, num_positive=0)["is_correct"].tolist() == [0, 0] * 3
    assert compose_itm_pairs(1, 2, num_negative=0)["is_correct"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="at least 2 images"):
        compose_itm_pairs(1, 2, num_negative=1)
    for args in ((3, 0), (3, 2, -1, 2), (3, 2, 2, -1)):
        with pytest.raises(ValueError, match="captions_per_image must be positive"):
            compose_itm_pairs(*args)
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        for captions, positives in ((5, 2), (2, 3)):  # without, then with replacement
            draws.append(compose_itm_pairs(6, captions, positives, generator=torch.Generator().manual_seed(7))[
                "pair_text_index"])
    assert torch.equal(draws[0], draws[2]) and torch.equal(draws[1], draws[3])
    ids = torch.tensor([[1, 3, 9]], dtype=torch.int32)
    restored = unmasked_text(ids, torch.tensor([[-1, 5, -1]]))
    assert restored.dtype == torch.int32 and restored.tolist() == [[1, 5, 9]]


def test_pretraining_heads_follow_the_bert_settings():
    config = BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, hidden_act="relu", layer_norm_eps=1e-6, initializer_range=0.5)
    torch.manual_seed(0)
    network = SOHONetwork(BertTextEncoder.from_config(config), backbone="resnet10t", pretrained_backbone=False,
                          vd_size=K, mask_token_id=tiny.MASK)
    heads = SOHOPretrainingHeads(network, K)
    assert heads.vd_size == K and heads.mvm.decoder.out_features == K and heads.itm.classifier.out_features == 2
    assert_bert_transform(heads.mvm.transform, torch.nn.ReLU, eps=1e-6, std=0.5, rel=0.2)
    assert heads.itm.classifier.weight.std().item() == pytest.approx(0.5, rel=0.35)


def signature_defaults(cls):
    import inspect

    return {name: p.default for name, p in inspect.signature(cls).parameters.items()}


@pytest.fixture
def timm_calls(monkeypatch):
    """The keyword arguments of every ``timm.create_model`` call; the model is built with random weights."""
    import timm

    calls = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model",
                        lambda name, **kw: calls.append(kw) or create(name, **dict(kw, pretrained=False)))
    return calls


def test_network_defaults_settings_and_what_forward_and_joint_hand_on(timm_calls):
    """The paper's defaults; BERT's LayerNorm ε, the dictionary momentum, channels-last and pretrained
    weights reach their modules; the [MASK] id is checked against the vocabulary; ``forward`` reads the
    features by default, pairs each text with ``pair_image_index``'s image, hands on the token types and
    returns the image; ``joint`` applies the MVM mask and pools [CLS]."""
    defaults = signature_defaults(SOHONetwork)
    assert defaults == dict(defaults, backbone="resnet101", pretrained_backbone=True, frozen_batch_norm=True,
                            vd_size=2048, vd_momentum=0.99, mask_token_id=103, pool_before_conv=False,
                            channels_last=True)
    config = BertConfig(vocab_size=40, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, layer_norm_eps=1e-6)
    network = SOHONetwork(BertTextEncoder.from_config(config), backbone="resnet10t", vd_size=K, mask_token_id=39,
                          vd_momentum=0.5, channels_last=False)
    assert timm_calls[-1]["pretrained"] is True and network.encoder.channels_last is False
    assert network.visual_norm.eps == 1e-6 and network.dictionary.momentum == 0.5
    assert SOHONetwork(BertTextEncoder.from_config(config), backbone="resnet10t", pretrained_backbone=False,
                       vd_size=K, mask_token_id=3).encoder.channels_last is True
    for token in (0, 39):
        SOHONetwork(BertTextEncoder.from_config(config), backbone="resnet10t", pretrained_backbone=False, vd_size=K,
                    mask_token_id=token)
    with pytest.raises(ValueError, match="mask_token_id"):
        SOHONetwork(BertTextEncoder.from_config(config), backbone="resnet10t", pretrained_backbone=False, vd_size=K,
                    mask_token_id=40)

    network = tiny_network().eval()
    pixels, _ = tiny.images(2, torch.Generator().manual_seed(0), height=128, width=128)
    ids, text_mask = tiny.texts(2, torch.Generator().manual_seed(1))
    plain = network(ids, text_mask, pixels)
    torch.testing.assert_close(plain["pooled"], network(ids, text_mask, pixels, source="features")["pooled"])
    image = plain["image"]
    assert set(image) >= {"visual", "mask", "grid"}
    swapped = network(ids, text_mask, pixels, pair_image_index=torch.tensor([1, 0]))
    expected = network.joint(ids, text_mask, image["visual"][[1, 0]], image["mask"][[1, 0]], image["grid"])
    torch.testing.assert_close(swapped["pooled"], expected["pooled"])
    types = torch.ones_like(ids)
    typed = network(ids, text_mask, pixels, segment_ids=types)
    torch.testing.assert_close(
        typed["pooled"], network.joint(ids, text_mask, image["visual"], image["mask"], image["grid"],
                                       segment_ids=types)["pooled"])
    assert not torch.allclose(typed["pooled"], plain["pooled"])
    masked = torch.zeros_like(image["mask"])
    masked[:, 0] = True
    joint = network.joint(ids, text_mask, image["visual"], image["mask"], image["grid"], masked)
    cells = network.visual_embeddings(image["visual"], image["mask"], image["grid"], masked)
    words = network.text.embed(ids)
    attention = torch.cat([text_mask.long(), image["mask"].long()], 1)
    sequence = network.text.encode(torch.cat([words, cells], 1), attention_mask=attention)
    torch.testing.assert_close(joint["sequence"], sequence)
    assert torch.equal(joint["attention_mask"], attention)
    torch.testing.assert_close(joint["pooled"], network.text.pool(sequence, 0))
    assert not torch.allclose(joint["pooled"], plain["pooled"])


def test_sine_positions_equal_detr_and_an_idle_dictionary_reports_nothing():
    """The sine embedding against a direct evaluation of DETR's formula (temperature 10,000, positions
    over the real extent times 2π, to 1e-6); an update without statistics moves nothing and says so; an unused
    dictionary has perplexity 0; statistics discarded before a step are not applied."""
    mask = torch.ones(1, 2, 3, dtype=torch.bool)
    mask[0, 1, 2] = False
    pos = sine_position_embedding(mask, 8)
    for y in range(2):
        for x in range(3):
            # DETR's normalisation, with its eps of 1e-6 in the denominator
            row = mask[0, : y + 1, x].sum().item() / (mask[0, :, x].sum().item() + 1e-6) * 2 * math.pi
            col = mask[0, y, : x + 1].sum().item() / (mask[0, y, :].sum().item() + 1e-6) * 2 * math.pi
            expected = []
            for value in (row, col):
                for k in range(2):
                    frequency = 10000 ** (2 * k / 4)
                    expected += [math.sin(value / frequency), math.cos(value / frequency)]
            torch.testing.assert_close(pos[0, y, x], torch.tensor(expected), atol=1e-6, rtol=0)
    vd = VisualDictionary(4, 2, momentum=0.5).train()
    before = vd.embedding.clone()
    assert vd.step() is False and torch.equal(vd.embedding, before)
    assert vd.usage_summary() == {"distinct": 0, "perplexity": 0.0, "never_used": 4}
    vd(vd.embedding[:1] + 0.1)
    vd.discard_pending()
    assert vd.step() is False and torch.equal(vd.embedding, before)
    vd(vd.embedding[:1] + 0.1)
    assert vd.step() is True and not torch.equal(vd.embedding, before)
    assert vd.usage_summary() == {"distinct": 1, "perplexity": 1.0, "never_used": 3}  # one cell: exp(0)


def test_grid_encoder_and_dictionary_defaults_and_what_reaches_timm(timm_calls):
    """The paper's defaults of the grid encoder and the visual dictionary; timm is asked for the C5
    features with pretrained weights (or, when random, with the residual branches' last BatchNorm not
    zeroed); BatchNorm is frozen unless asked otherwise; sizes of 1 are accepted and 0 refused; the
    usage counters are float64."""
    assert signature_defaults(GridEncoder) == dict(backbone="resnet101", hidden_size=768, pretrained=True,
                                         frozen_batch_norm=True, pool_before_conv=False, channels_last=True)
    dictionary = signature_defaults(VisualDictionary)
    assert dictionary["size"] == 2048 and dictionary["dim"] == 768
    for pretrained in (True, False):
        encoder = GridEncoder("resnet10t", 24, pretrained=pretrained)
        assert timm_calls[-1]["pretrained"] is pretrained and timm_calls[-1]["features_only"] is True
        assert timm_calls[-1]["out_indices"] == (-1,) and timm_calls[-1].get("zero_init_last", True) is pretrained
        assert encoder.hidden_size == 24 and encoder.resnet_frozen is False
    frozen = GridEncoder("resnet10t", 24, pretrained=False)
    unfrozen = GridEncoder("resnet10t", 24, pretrained=False, frozen_batch_norm=False)
    kinds = lambda enc: {type(m).__name__ for m in enc.resnet.modules() if "BatchNorm" in type(m).__name__}
    assert kinds(frozen) == {"FrozenBatchNorm2d"} and kinds(unfrozen) == {"BatchNorm2d"}
    pixels, _ = tiny.images(1, torch.Generator().manual_seed(0), height=128, width=192)
    for pool_first in (False, True):  # the 1x1 convolution and the 2x2 max-pool do not commute
        encoder = GridEncoder("resnet10t", 24, pretrained=False, pool_before_conv=pool_first, channels_last=False)
        with torch.no_grad():
            c5 = encoder.resnet(pixels)[-1]
            expected = encoder.proj(encoder.pool(c5)) if pool_first else encoder.pool(encoder.proj(c5))
            torch.testing.assert_close(encoder(pixels)[0], expected)
    one = VisualDictionary(1, 1)
    assert one.usage.dtype == one.last_counts.dtype == torch.float64
    for size, dim in ((0, 2), (2, 0)):
        with pytest.raises(ValueError):
            VisualDictionary(size, dim)


@pytest.mark.parametrize("use_vd", [False, True])
def test_in_batch_retrieval_reads_token_types_and_the_configured_visual_source(use_vd):
    """The t² pairs keep each caption's token types, and read the grid before the dictionary or, with
    ``use_vd_in_finetune``, its quantised features - as the one-pair path (``encode``) does."""
    model = build("retrieval", retrieval_in_batch=True, use_vd=True, use_vd_in_finetune=use_vd).train()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # token types and pair scores large enough to tell apart (the tiny init is near 0)
        model.backbone.text.token_type_embeddings.weight.normal_(0.0, 1.0, generator=g)
        model.itm_head.classifier.weight.normal_(0.0, 1.0, generator=g)
    batch = _retrieval_batch()
    batch.segment_ids = (torch.arange(batch.input_ids.size(1)) >= 2).long().expand_as(batch.input_ids) * batch.input_mask
    out = model(batch)
    logits = _pairwise_logits(model, batch)
    loss = out["losses"]["train/coco_retrieval_images/itm"]
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 2), torch.eye(3, dtype=torch.long).view(-1)),
                               rtol=1e-4, atol=1e-5)


def test_the_log_line_reports_the_dictionary_usage_and_the_resnet_state():
    model = build("pretraining")
    dictionary = model.backbone.dictionary
    with torch.no_grad():
        dictionary.last_counts.zero_()
        dictionary.last_counts[:2] = torch.tensor([3.0, 1.0])
        dictionary.usage.zero_()
        dictionary.usage[:5] = 1
    perplexity = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    model.backbone.encoder.resnet_frozen = True
    line = model.log_message(TrainingProgress(update=1, epoch=1))
    assert line == (f"soho visual dictionary: last update used 2 of {model.settings.vd_size} entries (perplexity "
                    f"{perplexity:.1f}), never used so far {model.settings.vd_size - 5}; ResNet frozen")
    model.backbone.encoder.resnet_frozen = False
    assert model.log_message(TrainingProgress(update=1, epoch=1)).endswith("; ResNet training")
    assert build("retrieval").log_message(TrainingProgress(update=1, epoch=1)) is None
    assert build("pretraining", use_vd=False).log_message(TrainingProgress(update=1, epoch=1)) is None


# ---------------------------------------------------------------------------------------------- the adapter's wiring
def test_both_pretraining_passes_read_the_token_types_and_the_mvm_settings(monkeypatch):
    draws = recorded_mvm_draws(monkeypatch)
    model = build(pretraining={"mvm_mask_ratio": 0.5, "mvm_max_ratio": 0.6}).train()
    calls = spy_joint(model)
    batch = tiny.tiny_batch("pretraining")
    pairs = batch.pairs
    pairs.segment_ids = (torch.arange(pairs.input_ids.size(1)) >= 3).long().expand_as(pairs.input_ids) * pairs.input_mask
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    model(batch)
    matched = (pairs.is_correct == 1).nonzero().view(-1)
    (clean, masked) = calls
    assert torch.equal(clean["segment_ids"], pairs.segment_ids)
    assert torch.equal(masked["segment_ids"], pairs.segment_ids[matched])
    ((args, _, _),) = draws
    assert args[3:] == (0.5, 0.6)  # (ids, real cells, mode, mask ratio, max ratio)
    del pairs["segment_ids"]  # no token types: none reach either pass
    calls.clear()
    model(batch)
    assert [call["segment_ids"] for call in calls] == [None, None]


@pytest.mark.parametrize("use_vd", [True, False])
def test_the_match_logits_read_the_token_types_and_the_pretraining_visual_source(use_vd):
    model = build(use_vd=use_vd).eval()
    with torch.no_grad():
        model.backbone.text.token_type_embeddings.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    batch = tiny.tiny_batch("vqa")
    batch.segment_ids = (torch.arange(batch.input_ids.size(1)) >= 2).long().expand_as(batch.input_ids) * batch.input_mask
    pixels, mask = _pixels(batch)
    source = "dictionary" if use_vd else "features"
    with torch.no_grad():
        got = model.pretraining_match_logits(batch)
        want = model.heads.itm(model.backbone(batch.input_ids, batch.input_mask, pixels, mask, source=source,
                                              segment_ids=batch.segment_ids)["pooled"])
        other = model.heads.itm(model.backbone(batch.input_ids, batch.input_mask, pixels, mask,
                                               source="features" if use_vd else "dictionary",
                                               segment_ids=batch.segment_ids)["pooled"])
        untyped = model.heads.itm(model.backbone(batch.input_ids, batch.input_mask, pixels, mask, source=source)["pooled"])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, other) and not torch.allclose(got, untyped)
    for field in ("input_ids", "image"):
        broken = tiny.tiny_batch("vqa")
        del broken[field]
        with pytest.raises(KeyError, match=f"soho needs '{field}'"):
            model.pretraining_match_logits(broken)


def test_pretraining_without_the_dictionary_reads_the_grid_features():
    model = build(use_vd=False).train()
    calls = spy_joint(model)
    batch = tiny.tiny_batch("pretraining")
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    model(batch)
    with torch.no_grad():
        image = model.backbone.encode_image(batch.image, None, quantise=False)
    torch.testing.assert_close(calls[0]["visual"], image["features"][batch.pairs.pair_image_index])


def test_a_batch_without_matched_pairs_keeps_zero_mlm_and_mvm_losses_in_the_graph():
    model = build().train()
    batch = tiny.tiny_batch("pretraining")
    batch.pairs.is_correct = torch.zeros_like(batch.pairs.is_correct)
    with torch.no_grad():  # trained heads: their biases are not zero
        model.heads.mlm.bias.fill_(0.5)
        model.heads.mvm.decoder.bias.fill_(0.5)
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    losses = model(batch)["losses"]
    assert set(losses) == {f"train/soho_contract/{n}" for n in ("itm", "mlm", "mvm")}
    for name in ("mlm", "mvm"):
        loss = losses[f"train/soho_contract/{name}"]
        assert loss.item() == 0.0 and loss.requires_grad
    assert losses["train/soho_contract/itm"].item() > 0


def test_pair_image_index_and_missing_fields_are_checked_naming_the_dataset():
    model = build().train()
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    for index in ([0, 1, 1], [0, -1], [0, 2]):  # wrong length; negative; one past the last image
        batch = tiny.one_text_batch(num_images=2)
        batch.pair_image_index = torch.tensor(index)
        with pytest.raises(ValueError, match=r"pair_image_index must give each of the 2 texts an image in \[0, 2\)"):
            model(batch)
    batch = tiny.one_text_batch(num_images=2)
    batch.pair_image_index = torch.tensor([1, 1])  # valid: both texts on the second image
    model(batch)
    batch = tiny.one_text_batch(num_images=3)
    batch.image, batch.image_size = batch.image[:2], batch.image_size[:2]  # 3 texts, 2 images
    with pytest.raises(KeyError, match="3 texts and 2 images but no 'pair_image_index'"):
        model(batch)
    batch = tiny.one_text_batch()
    del batch["is_correct"]
    with pytest.raises(KeyError, match="from dataset_config.soho_contract"):
        model(batch)
    batch = tiny.one_text_batch()
    del batch["image"]
    with pytest.raises(KeyError, match="soho needs 'image'"):
        model(batch)


def _bert_folder(tmp_path, layers=3):
    from transformers import BertForPreTraining

    folder = tmp_path / "bert"
    torch.manual_seed(7)
    bert = BertForPreTraining(BertConfig(vocab_size=40, hidden_size=HIDDEN, num_hidden_layers=layers,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=40))
    bert.save_pretrained(str(folder))
    return folder, bert


def test_bert_num_layers_keeps_the_first_layers_of_bert_with_the_dropouts_and_its_mlm_head(tmp_path):
    """Table 7's 3-layer transformer (§4.1): the first ``bert_num_layers`` layers of ``bert_model_name``, the
    configured dropouts, and with ``init_mlm_from_bert`` BERT's ``cls.predictions`` as the MLM head."""
    folder, bert = _bert_folder(tmp_path)
    model = build(bert_model_name=str(folder), bert_num_layers=1, hidden_dropout_prob=0.3,
                  attention_probs_dropout_prob=0.2, pretraining={"init_mlm_from_bert": True})
    text = model.backbone.text
    assert text.config.num_hidden_layers == 1 and len(text.layers) == 1
    assert text.config.hidden_dropout_prob == 0.3 and text.config.attention_probs_dropout_prob == 0.2
    torch.testing.assert_close(text.layers[0].attention.self.query.weight,
                               bert.bert.encoder.layer[0].attention.self.query.weight)
    torch.testing.assert_close(model.heads.mlm.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    torch.testing.assert_close(model.heads.mlm.bias, bert.cls.predictions.bias)
    assert build(pretraining={"init_mlm_from_bert": True}).heads.mlm is not None  # no BERT named: nothing to load
    with pytest.raises(ValueError, match="bert_num_layers must be positive"):
        build(bert_model_name=str(folder), bert_num_layers=0)
    with pytest.raises(ValueError, match="bert_num_layers keeps the first layers of bert_model_name, which is null"):
        build(bert_num_layers=2)


def test_the_network_settings_reach_the_backbone(timm_calls):
    from mmf_multilevel.methods.soho.network import GridEncoder as Encoder

    model = build(backbone_pretrained=True, frozen_batch_norm=False, vd_momentum=0.5, visual_token_type=0,
                  channels_last=False, pool_before_conv=True)
    net = model.backbone
    assert timm_calls[-1]["pretrained"] is True
    assert not any(type(m).__name__.startswith("FrozenBatchNorm") for m in net.encoder.resnet.modules())
    assert net.dictionary.momentum == 0.5 and net.visual_token_type == 0 and net.encoder.channels_last is False
    assert net.encoder.pool_before_conv is True
    default = build()  # the tiny configs' backbone_pretrained: false
    assert timm_calls[-1]["pretrained"] is False
    assert any(type(m).__name__.startswith("FrozenBatchNorm") for m in default.backbone.encoder.resnet.modules())
    assert default.backbone.visual_token_type == 1 and isinstance(default.backbone.encoder, Encoder)
    assert default.backbone.encoder.channels_last is True  # the default


def test_task_heads_follow_the_bert_settings_and_one_answer_builds():
    settings = {"hidden_dropout_prob": 0.25, "layer_norm_eps": 1e-6, "initializer_range": 0.5}
    vqa = build("vqa", num_answers=1, **settings).classifier
    assert vqa.dropout.p == 0.25 and vqa.LayerNorm.eps == 1e-6 and vqa.classifier.out_features == 1
    assert vqa.dense.weight.std().item() == pytest.approx(0.5, rel=0.2)
    nlvr2 = build("nlvr2", **settings).classifier
    assert nlvr2.dropout.p == 0.25 and nlvr2.classifier[2].eps == 1e-6 and nlvr2.classifier[3].out_features == 2
    assert nlvr2.classifier[0].weight.std().item() == pytest.approx(0.5, rel=0.2)
    snli = build("snli_ve", **settings).classifier
    assert isinstance(snli[0], torch.nn.Dropout) and snli[0].p == 0.25 and snli[1].out_features == 3
    itm = build("retrieval", **settings).itm_head
    assert itm.dropout.p == 0.25 and itm.classifier.out_features == 2
    assert itm.classifier.weight.std().item() == pytest.approx(0.5, rel=0.4)
    with pytest.raises(ValueError, match="num_answers must be positive"):
        build("vqa", num_answers=0)


def test_the_optimizer_reads_every_setting_and_the_schedule_waits_for_it():
    model = build(optimization={"cnn_momentum": 0.5, "cnn_weight_decay": 1e-3, "weight_decay": 0.05,
                                "lr_steps": [1], "lr_ratio": 0.1})
    progress = TrainingProgress(update=3, epoch=1)
    model.on_update_start(progress)  # before configure_optimizer: nothing to step yet
    assert model.progress is progress
    optimizer = model.configure_optimizer(None)
    (sgd,) = optimizer.parts["cnn"].param_groups
    (adamw,) = optimizer.parts["transformer"].param_groups
    assert sgd["momentum"] == 0.5 and sgd["weight_decay"] == 1e-3 and adamw["weight_decay"] == 0.05


def test_in_batch_retrieval_without_token_types_and_its_errors_name_the_dataset():
    model = build("retrieval", retrieval_in_batch=True).train()
    batch = _retrieval_batch()
    del batch["segment_ids"]
    assert torch.isfinite(model(batch)["losses"]["train/coco_retrieval_images/itm"])
    batch.targets = torch.tensor([1, 0, 1])
    with pytest.raises(ValueError, match=r"set dataset_config.coco_retrieval_images.itm_probability: 0"):
        model(batch)
    for field, message in (("input_ids", "soho needs 'input_ids'"), ("image", "soho needs 'image'")):
        broken = _retrieval_batch()
        del broken[field]
        with pytest.raises(KeyError, match=message):
            model(broken)


def test_alignment_reads_the_last_of_three_layers_and_paired_sides_are_named():
    model = build("vqa", num_hidden_layers=3).eval()
    with torch.no_grad():
        out = model.alignment(tiny.tiny_batch("vqa"))
    assert "layer 3 of 3" in out["source"] and out["layer"].endswith("encoder.layer.2.attention.self")
    broken = tiny.tiny_batch("vqa")
    del broken["input_ids"]
    with pytest.raises(KeyError, match="soho needs 'input_ids'"):
        model.alignment(broken)
    with pytest.raises(KeyError, match=r"soho needs the paired layout \('img0' missing"):
        model.encode(tiny.tiny_batch("vqa"), side="img0")
