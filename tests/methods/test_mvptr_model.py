"""The registered ``mvptr`` model's pre-training forward (mmf_multilevel/methods/mvptr/model.py): every loss
recomputed independently from the network's stages, pair by pair with loops (which pairs are negatives,
which outputs MLM/MCR/WPG read), same-image pairs never negatives, the Table 4 ablations, and a few
optimisation steps on a fixed tiny batch lowering every loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mmf_multilevel.methods.mvptr import model as model_module
from mmf_multilevel.methods.mvptr.testing import tiny_batch, tiny_config
from mmf_multilevel.methods.progress import TrainingProgress

pytestmark = pytest.mark.usefixtures("mmf_global_config")


def build(seed=0, **pretraining):
    from mmf.common.registry import registry

    cls = registry.get_model_class("mvptr")
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.mvptr, tiny_config("pretraining"),
                             {"pretraining": pretraining})
    torch.manual_seed(seed)
    model = cls(config)
    model.build()
    model.init_losses()
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    return model.eval()


def recorded_split(monkeypatch):
    calls = []
    real = model_module.split_negatives

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(model_module, "split_negatives", record)
    return calls


def losses_of(out):
    return {key.rsplit("/", 1)[-1]: value for key, value in out["losses"].items()}


def _ce(logits, label):
    return math.log(sum(math.exp(v) for v in logits.tolist())) - float(logits[label])


def reference(model, batch, negatives):
    """The five losses from the network's stages, one pair at a time."""
    net, heads = model.backbone, model.heads
    from mmf_multilevel.methods.batch import region_inputs

    regions = region_inputs(batch, "mvptr", model.settings.feature_dim, "6d")
    n, width, tags = batch.input_ids.size(0), batch.input_ids.size(1), net.num_tag_slots
    text = net.encode_text(batch.input_ids, batch.input_mask)
    visual, vmask = net.encode_visual(batch.tag_ids, batch.tag_mask, regions.features, regions.boxes, regions.mask)

    def joint(t, i):
        states, pooled, mask = net.fuse(text[t:t + 1], batch.input_mask[t:t + 1], visual[i:i + 1], vmask[i:i + 1])
        return states[0], pooled[0], mask[0]

    # MCR: every masked tag of every sample
    terms = [_ce(heads.mcr_logits(visual[b, k]), int(batch.mcr_label_ids[b, k]))
             for b in range(n) for k in range(tags) if batch.mcr_label_ids[b, k] != -100]
    mcr = sum(terms) / len(terms)
    # VSC
    g_t = [F.normalize(text[b, 0] @ net.txt_proj, dim=0) for b in range(n)]
    g_v = [F.normalize(visual[b, 0] @ net.vis_proj, dim=0) for b in range(n)]
    scale = math.exp(min(float(net.logit_scale), math.log(100)))
    vsc = 0.0
    for b in range(n):
        row = [scale * float(g_t[b] @ g_v[k]) for k in range(n)]
        col = [scale * float(g_t[k] @ g_v[b]) for k in range(n)]
        vsc += (math.log(sum(map(math.exp, row))) - row[b] + math.log(sum(map(math.exp, col))) - col[b]) / (2 * n)
    # ITM over matched pairs and the recorded negatives; MLM over the matched pairs only
    neg_text, neg_image, _ = negatives
    pairs = [(b, b, 1) for b in range(n)] + [(int(t), int(i), 0) for t, i in zip(neg_text, neg_image)]
    itm = sum(_ce(heads.itm_logits(joint(t, i)[1]), y) for t, i, y in pairs) / len(pairs)
    terms = []
    for b in range(n):
        states = joint(b, b)[0]
        for k in range(width):
            if batch.lm_label_ids[b, k] != -100:
                terms.append(_ce(heads.mlm_logits(states[k]), int(batch.lm_label_ids[b, k])))
    mlm = sum(terms) / len(terms)
    return dict(mcr=mcr, vsc=vsc, itm=itm, mlm=mlm), joint


def wpg_reference(batch, joint, hard_image, n, width):
    def score(states, mask, b):
        phrases = [F.normalize(states[k], dim=0) for k in range(width) if batch.phrase_slots[b, k]]
        regions = [F.normalize(states[width + k], dim=0) for k in range(states.size(0) - width) if mask[width + k]]
        if not phrases:
            return 0.0, False
        return sum(max(float(p @ r) for r in regions) for p in phrases) / len(phrases), True

    hinges = []
    for b in range(n):
        states, _, mask = joint(b, b)
        positive, has = score(states, mask, b)
        if not has:
            continue
        states, _, mask = joint(b, int(hard_image[b]))
        negative, _ = score(states, mask, b)
        hinges.append(max(0.0, 0.2 + negative - positive))
    return sum(hinges) / len(hinges)


def test_every_loss_equals_an_independent_pair_by_pair_computation(monkeypatch):
    model = build(itm_negatives="hardest")
    batch = tiny_batch("pretraining", batch=4)
    calls = recorded_split(monkeypatch)
    fused = []
    real_fuse = model.backbone.fuse

    def fuse(*args, **kwargs):
        fused.append(int(args[4].numel()))
        return real_fuse(*args, **kwargs)

    monkeypatch.setattr(model.backbone, "fuse", fuse)
    with torch.no_grad():
        got = losses_of(model(batch))
    monkeypatch.setattr(model.backbone, "fuse", real_fuse)
    with torch.no_grad():
        want, joint = reference(model, batch, calls[0])
        # the hardest image of each caption, recomputed from the VSC similarities
        net = model.backbone
        text = net.encode_text(batch.input_ids, batch.input_mask)
        from mmf_multilevel.methods.batch import region_inputs

        regions = region_inputs(batch, "mvptr", model.settings.feature_dim, "6d")
        visual, _ = net.encode_visual(batch.tag_ids, batch.tag_mask, regions.features, regions.boxes, regions.mask)
        g_t, g_v = net.global_embeddings(text, visual)
        sim = g_t @ g_v.t()
        hard_image = [max((k for k in range(4) if k != b), key=lambda k: float(sim[b, k])) for b in range(4)]
        want["wpg"] = wpg_reference(batch, joint, hard_image, 4, batch.input_ids.size(1))
    assert set(got) == {"mcr", "vsc", "itm", "mlm", "wpg"}
    for key in want:
        assert got[key].item() == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    neg_text, neg_image, anchored = calls[0]
    assert neg_text.numel() == 4  # n negatives: half (caption, hard image), half (hard caption, image)
    # one multimodal pass: the 4 matched pairs, the 4 negatives, and (caption, hard image) for the 2 captions
    # the ITM half did not pair with their hard image (WPG's negatives), nothing twice
    assert fused == [4 + 4 + 2]
    assert [int(neg_image[j]) for j in range(4) if anchored[j]] == [hard_image[int(neg_text[j])] for j in range(4)
                                                                    if anchored[j]]


def test_same_image_captions_are_never_negatives(monkeypatch):
    model = build(itm_negatives="sampled", wpg_negative="random")
    calls = recorded_split(monkeypatch)
    for seed in range(8):
        batch = tiny_batch("pretraining", seed=seed, batch=4)
        batch.image_index = torch.tensor([5, 5, 6, 7])  # captions 0 and 1 show the same image
        with torch.no_grad():
            model(batch)
        neg_text, neg_image, _ = calls[-1]
        for t, i in zip(neg_text.tolist(), neg_image.tolist()):
            assert int(batch.image_index[t]) != int(batch.image_index[i]), (t, i)


def test_one_image_batch_has_no_negative_but_every_loss_is_finite():
    model = build()
    batch = tiny_batch("pretraining", batch=3)
    batch.image_index = torch.zeros(3, dtype=torch.long)
    out = model(batch)
    assert out["scores"].shape == (3, 2)
    assert all(torch.isfinite(v) for v in out["losses"].values())


def test_ablations_drop_their_losses_and_inputs():
    batch = tiny_batch("pretraining")
    assert set(losses_of(build(mcr=False)(batch))) == {"vsc", "itm", "mlm", "wpg"}
    del batch["phrase_slots"]
    with pytest.raises(KeyError, match="phrase_slots"):
        build()(batch)
    del batch["mcr_label_ids"]
    assert set(losses_of(build(mcr=False, wpg=False)(batch))) == {"vsc", "itm", "mlm"}


@pytest.mark.parametrize("options", [dict(), dict(wpg_negative="random", wpg_aggregation="rand_top3",
                                                  itm_negatives="hardest")])
def test_a_few_steps_on_a_fixed_batch_lower_every_loss(options):
    model = build(**options).train()
    batch = tiny_batch("pretraining", batch=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first, last = {}, {}
    for step in range(40):
        torch.manual_seed(0)  # the same draws (negatives, permutation) while the similarities allow
        losses = losses_of(model(batch))
        for key, value in losses.items():
            first.setdefault(key, value.item())
            last[key] = value.item()
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for key in first:
        assert last[key] < first[key], (key, first[key], last[key])


def test_bad_settings_name_the_key():
    for key in ("itm_negatives", "wpg_negative", "wpg_aggregation"):
        with pytest.raises(ValueError, match=f"model_config.mvptr.pretraining.{key} must be one of"):
            build(**{key: "nearest"})


def test_model_config_paths_interpolate_against_the_run_config(tmp_path):
    """``model_config.mvptr.concepts: ${env.data_dir}/...`` (the projects' form) resolves against the whole run
    config, and the concept table sizes the word table."""
    from mmf_multilevel.methods.config import read_config
    from mmf_multilevel.methods.mvptr.config import MVPTRConfig

    (tmp_path / "id2phrase.json").write_text('{"45": ["w1", "w2"], "41": ["w3"]}')
    run = OmegaConf.create({"env": {"data_dir": str(tmp_path)},
                            "model_config": {"mvptr": {**tiny_config("pretraining"), "num_embeddings": None,
                                                       "concepts": "${env.data_dir}/id2phrase.json"}}})
    settings = read_config(MVPTRConfig, run.model_config.mvptr, "mvptr")
    assert settings.concepts == str(tmp_path / "id2phrase.json")
    from mmf.common.registry import registry

    model = registry.get_model_class("mvptr")(run.model_config.mvptr)
    model.build()
    assert model.backbone.word_embeddings.weight.size(0) == 46


def _refcoco_model(**refcoco):
    from mmf.common.registry import registry

    cls = registry.get_model_class("mvptr")
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.mvptr, tiny_config("refcoco"),
                             {"num_hidden_layers": 4, "refcoco": refcoco})
    torch.manual_seed(0)
    model = cls(config)
    model.build()
    return model.eval()


@pytest.mark.parametrize("loss", ["mse_iou", "cross_entropy"])
def test_refcoco_scores_and_loss_against_an_independent_computation(loss):
    """Each proposal's score is the cosine of the text [CLS] and its region output after ``layer`` multimodal
    layers (here 1 of 2); mse_iou regresses them onto the IoU with the gold box, over real proposals only."""
    from mmf_multilevel.evaluation.grounding import pairwise_iou
    from mmf_multilevel.methods.batch import region_inputs

    model = _refcoco_model(layer=1, loss=loss)
    batch = tiny_batch("refcoco")
    batch.gold_box = batch.image_info_0.bbox[:, 1] + torch.tensor([5.0, -5.0, 20.0, 10.0])
    batch.targets = torch.tensor([1, 0, 2])
    out = model(batch)
    net = model.backbone
    regions = region_inputs(batch, "mvptr", 16, "6d")
    with torch.no_grad():
        text = net.encode_text(batch.input_ids, batch.input_mask)
        visual, vmask = net.encode_visual(batch.tag_ids, batch.tag_mask, regions.features, regions.boxes, regions.mask)
        joint = torch.cat([text, visual[:, net.num_tag_slots:]], 1)
        mask = torch.cat([batch.input_mask, regions.mask], 1)
        from mmf_multilevel.modules.text import extended_attention_mask

        hidden = net.multimodal_layers[0](joint, attention_mask=extended_attention_mask(mask, joint.dtype))[0]
    width = text.size(1)
    terms, ce = [], []
    for b in range(3):
        real = int(regions.mask[b].sum())
        cos = [F.cosine_similarity(hidden[b, 0], hidden[b, width + k], dim=0).item() for k in range(real)]
        for k in range(5):
            want = cos[k] if k < real else float("-inf")
            assert out["scores"][b, k].item() == pytest.approx(want, abs=1e-5)
        iou = pairwise_iou(batch.proposal_boxes[b][:real], batch.gold_box[b].unsqueeze(0)).squeeze(1).tolist()
        terms += [(c - i) ** 2 for c, i in zip(cos, iou)]
        ce.append(math.log(sum(math.exp(c) for c in cos)) - cos[int(batch.targets[b])])
    want = sum(terms) / len(terms) if loss == "mse_iou" else sum(ce) / 3
    assert next(iter(out["losses"].values())).item() == pytest.approx(want, rel=1e-4)


def test_refcoco_layer_is_checked():
    with pytest.raises(ValueError, match="model_config.mvptr.refcoco.layer must lie in \\[1, 2\\]"):
        _refcoco_model(layer=3)


def build_head(head_type, **overrides):
    from mmf.common.registry import registry

    cls = registry.get_model_class("mvptr")
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.mvptr, tiny_config(head_type), overrides)
    torch.manual_seed(0)
    model = cls(config)
    model.build()
    model.init_losses()
    return model.eval()


def test_optimizer_groups_decay_weights_but_no_bias_or_layer_norm_and_skip_frozen_parameters():
    """AdamW's two groups as the official code: ``optimizer.params.weight_decay`` on every weight matrix and
    embedding, 0 on biases and on every LayerNorm (found here by module type, the region LayerNorm included)."""
    from mmf.utils.build import build_optimizer

    model = build_head("pretraining", img_layer_norm=True)  # the region LayerNorm (region_embedding.norm)
    model.backbone.word_embeddings.weight.requires_grad_(False)
    run_config = OmegaConf.create({"model": "mvptr", "model_config": {"mvptr": model.config},
                                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05}}})
    groups = model.get_optimizer_parameters(run_config)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    no_decay = {id(p) for module in model.modules() if isinstance(module, torch.nn.LayerNorm)
                for p in module.parameters()}
    no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in trainable if id(p) in no_decay}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in trainable if id(p) not in no_decay}
    assert any(".norm." in name for name, _ in model.named_parameters())  # a LayerNorm not named LayerNorm
    optimizer = build_optimizer(model, run_config)
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable)
    default = OmegaConf.create({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}})
    assert model.get_optimizer_parameters(default)[0]["weight_decay"] == 0.01  # the pre-training default


def test_retrieval_encoders_for_the_heads_with_matching():
    from mmf_multilevel.methods.mvptr.retrieval import MVPTRDualEncoder

    for head, expected in (("pretraining", True), ("retrieval", True), ("vqa", False)):
        encoders = build_head(head).retrieval_encoders()
        assert isinstance(encoders, MVPTRDualEncoder) if expected else encoders is None, head


def test_vqa_reads_the_text_cls_output_and_snli_ve_the_pooler():
    for head, reads in (("vqa", "cls"), ("snli_ve", "pooled")):
        model = build_head(head)
        batch = tiny_batch(head)
        with torch.no_grad():
            out = model.encode(batch)
            states, pooled, _ = model.backbone.fuse(out["text"], out["text_mask"], out["visual"], out["visual_mask"])
            expected = model.classifier(states[:, 0] if reads == "cls" else pooled)
            torch.testing.assert_close(model(batch)["scores"], expected)


def test_retrieval_training_losses_and_gallery_scores_equal_a_recomputation():
    """Aligned pairs: VSC over the batch and ITM over the matched pairs and the hardest in-batch negatives (captions
    of one image never negatives of each other); gallery pairs: the ITM head, or with ``retrieval.uni`` the VSC
    similarity as log-odds."""
    from mmf_multilevel.methods.mvptr.losses import hard_negatives, itm_loss, split_negatives, vsc_loss, vsc_scale

    model = build_head("retrieval", retrieval={"itm_negatives": "hardest"}, pretraining={"vsc_max_logit_scale": 2.0})
    with torch.no_grad():
        model.backbone.logit_scale.fill_(5.0)  # above the clamp: the setting decides the scale
    batch = tiny_batch("retrieval", batch=4)
    batch.image_index = torch.tensor([0, 0, 1, 2])  # captions 0 and 1 describe one image
    net, max_log = model.backbone, model.settings.pretraining.vsc_max_logit_scale
    with torch.no_grad():
        out = model.encode(batch)
        g_t, g_v = net.global_embeddings(out["text"], out["visual"])
        loss_vsc, sim = vsc_loss(g_t, g_v, net.logit_scale, max_log)
        hard_image, hard_text = hard_negatives(sim, "hardest", scale=vsc_scale(net.logit_scale, max_log),
                                               image_ids=batch.image_index)
        neg_text, neg_image, _ = split_negatives(hard_image, hard_text)
        assert (batch.image_index[neg_text] != batch.image_index[neg_image]).all()
        rows = torch.arange(4)
        _, pooled, _ = net.fuse(out["text"], out["text_mask"], out["visual"], out["visual_mask"],
                                torch.cat([rows, neg_text]), torch.cat([rows, neg_image]))
        logits = model.itm_head(pooled)
        labels = torch.cat([torch.ones(4, dtype=torch.long), torch.zeros(neg_text.numel(), dtype=torch.long)])
        got = model(batch)
        assert set(got["losses"]) == {f"{batch.dataset_type}/mvptr_contract/{k}" for k in ("vsc", "itm")}
        torch.testing.assert_close(got["losses"][f"{batch.dataset_type}/mvptr_contract/vsc"], loss_vsc)
        torch.testing.assert_close(got["losses"][f"{batch.dataset_type}/mvptr_contract/itm"], itm_loss(logits, labels))
        torch.testing.assert_close(got["scores"], logits[:4])
        batch.pair_image_index = torch.arange(4)  # gallery pairs (evaluation)
        _, pooled, _ = net.fuse(out["text"], out["text_mask"], out["visual"], out["visual_mask"])
        torch.testing.assert_close(model(batch)["scores"], model.itm_head(pooled))
        uni = build_head("retrieval", retrieval={"uni": True}, pretraining={"vsc_max_logit_scale": 2.0})
        uni.backbone.logit_scale.fill_(5.0)
        out = uni.encode(batch)
        g_t, g_v = uni.backbone.global_embeddings(out["text"], out["visual"])
        similarity = (g_t * g_v).sum(-1) * vsc_scale(uni.backbone.logit_scale, max_log)
        torch.testing.assert_close(uni(batch)["scores"], torch.stack([-similarity / 2, similarity / 2], dim=-1))


def test_sampled_retrieval_negatives_are_drawn_at_the_clamped_scale(monkeypatch):
    model = build_head("retrieval", retrieval={"itm_negatives": "sampled"}, pretraining={"vsc_max_logit_scale": 1.0})
    with torch.no_grad():
        model.backbone.logit_scale.fill_(5.0)
    calls = []
    original = model_module.hard_negatives

    def record(sim, mode, scale=None, image_ids=None):
        calls.append((mode, None if scale is None else float(scale)))
        return original(sim, mode, scale=scale, image_ids=image_ids)

    monkeypatch.setattr(model_module, "hard_negatives", record)
    with torch.no_grad():
        model(tiny_batch("retrieval", batch=4))
    assert calls == [("sampled", pytest.approx(math.e))]  # exp(min(5, 1))


def test_refcoco_loss_name_evaluation_without_gold_ignored_targets_and_a_fixed_scale():
    batch = tiny_batch("refcoco")
    batch.gold_box = batch.image_info_0.bbox[:, 1] + torch.tensor([5.0, -5.0, 20.0, 10.0])
    batch.targets = torch.tensor([1, -100, 2])  # the second expression has no proposal to pick
    model = _refcoco_model(layer=1, loss="cross_entropy")
    model.init_losses()  # without a loss of its own MMF adds the configured ones (none here)
    with torch.no_grad():
        out = model(batch)
        scores = out["scores"]
        want = F.cross_entropy(scores[[0, 2]], torch.tensor([1, 2]))
    assert set(out["losses"]) == {f"{batch.dataset_type}/{batch.dataset_name}/refcoco"}
    torch.testing.assert_close(next(iter(out["losses"].values())), want)
    del batch["gold_box"]  # evaluation on proposals without a gold box: the scores alone
    with torch.no_grad():
        bare = model(batch)
    assert not bare.get("losses") and torch.equal(bare["scores"], scores)  # MMF's empty loss dict at most
    assert model.classifier.scale.requires_grad
    assert not _refcoco_model(layer=1, learn_scale=False).classifier.scale.requires_grad  # the official fixed 1


def test_random_other_images_never_pick_the_same_image():
    for _ in range(20):
        other = model_module._random_other_image(3, None, "cpu")  # no image ids: every sample its own image
        assert other.dtype == torch.long and (other != torch.arange(3)).all()
        other = model_module._random_other_image(4, torch.tensor([0, 0, 1, 1]), "cpu")
        assert (torch.tensor([0, 0, 1, 1])[other] != torch.tensor([0, 0, 1, 1])).all()
    assert model_module._random_other_image(2, torch.tensor([5, 5]), "cpu").tolist() == [-1, -1]  # one image


def test_the_model_starts_from_bert_weights_by_path_with_concept_rows_and_bert_heads(tmp_path):
    """``bert_model_name`` (a ``save_pretrained`` folder): BERT's word rows, each concept row the mean of its
    words' rows (the folder's tokenizer), the MLM and MCR transforms from BERT's ``cls.predictions``, and the
    network options (``img_layer_norm``, ``num_tag_slots``)."""
    import json

    from transformers import BertConfig, BertForPreTraining, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "man", "horse", "ride"] + [f"w{i}" for i in range(32)]
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(3)
    bert = BertForPreTraining(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(str(folder))
    (tmp_path / "id2phrase.json").write_text(json.dumps({"41": ["man"], "43": ["horse", "ride"]}))
    model = build_head("pretraining", bert_model_name=str(folder), concepts=str(tmp_path / "id2phrase.json"),
                       img_layer_norm=True, pretraining={"init_heads_from_bert": True})
    table = model.backbone.word_embeddings.weight.detach()
    bert_words = bert.bert.embeddings.word_embeddings.weight.detach()
    assert table.shape[0] == 44  # the largest concept id + 1
    torch.testing.assert_close(table[:40], bert_words)
    torch.testing.assert_close(table[41], bert_words[5])
    torch.testing.assert_close(table[43], bert_words[6:8].mean(0))
    for head in (model.heads.mlm, model.heads.mcr):
        torch.testing.assert_close(head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert model.backbone.num_tag_slots == tiny_config("pretraining")["num_tag_slots"]
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.backbone.region_embedding.modules())


def test_encode_reads_token_types_and_a_batch_missing_a_field_is_named():
    model = build()
    batch = tiny_batch("pretraining")
    batch.segment_ids = (torch.arange(batch.input_ids.size(1)) >= 3).long().expand_as(batch.input_ids) * batch.input_mask
    with torch.no_grad():
        text = model.encode(batch)["text"]
        torch.testing.assert_close(text, model.backbone.encode_text(batch.input_ids, batch.input_mask, batch.segment_ids))
        assert not torch.allclose(text, model.backbone.encode_text(batch.input_ids, batch.input_mask))
    for key, why in (("tag_ids", "the object tags of the visual encoder"), ("tag_mask", "the object tags of the visual "
                     "encoder"), ("mcr_label_ids", "the MCR targets"), ("lm_label_ids", "the MLM targets")):
        broken = tiny_batch("pretraining")
        del broken[key]
        with pytest.raises(KeyError, match=rf"mvptr pre-training needs '{key}' in the batch \({why}; dataset "
                                           "mvptr_captions gives it\\)"):
            model(broken)


def test_nothing_masked_gives_zero_mlm_and_mcr_losses_in_the_graph():
    model = build().train()
    batch = tiny_batch("pretraining")
    batch.lm_label_ids = torch.full_like(batch.lm_label_ids, -100)
    batch.mcr_label_ids = torch.full_like(batch.mcr_label_ids, -100)
    losses = model(batch)["losses"]
    for name in ("mlm", "mcr"):
        loss = losses[f"{batch.dataset_type}/{batch.dataset_name}/{name}"]
        assert loss.item() == 0.0 and loss.requires_grad


def test_task_heads_follow_the_bert_settings_and_every_negative_choice_builds():
    """The official heads: VQA ``Linear(H, H) -> GELU -> LayerNorm -> Linear(H, answers)`` after dropout 0.3,
    SNLI-VE dropout + ``Linear(H, 3)``, retrieval's 2-way ITM head with BERT's dropout; one answer is a head too;
    each ``itm_negatives`` choice builds."""
    settings = {"hidden_dropout_prob": 0.25, "layer_norm_eps": 1e-6, "initializer_range": 0.5}
    vqa = build_head("vqa", num_answers=1, **settings).classifier
    assert vqa.dense.out_features == 32 and vqa.dropout.p == model_module.VQA_DROPOUT and vqa.LayerNorm.eps == 1e-6
    assert vqa.classifier.out_features == 1 and vqa.dense.weight.std().item() == pytest.approx(0.5, rel=0.2)
    snli = build_head("snli_ve", **settings).classifier
    assert isinstance(snli[0], torch.nn.Dropout) and snli[0].p == 0.25 and snli[1].out_features == 3
    retrieval = build_head("retrieval", **settings).itm_head
    assert retrieval.classifier.out_features == 2 and retrieval.dropout.p == 0.25
    assert retrieval.classifier.weight.std().item() == pytest.approx(0.5, rel=0.4)
    for choice in ("sampled", "hardest", "random"):
        build_head("retrieval", retrieval={"itm_negatives": choice})
        build_head("pretraining", pretraining={"itm_negatives": choice})
