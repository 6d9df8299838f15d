"""The registered ``mvptr`` model's pre-training forward (mmf_multilevel/methods/mvptr/model.py): every loss
recomputed independently from the network's stages, pair by pair with loops (which pairs are negatives,
which outputs MLM/MCR/WPG read), same-image pairs never negatives, the Table 4 ablations, and a few
optimisation steps on a fixed tiny batch lowering every loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from helpers import spies
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


def recorded(monkeypatch, name):
    """Wrap ``model_module.<name>``: every call's ``(args, kwargs, output)`` is kept."""
    return spies.recorded(monkeypatch, model_module, name)


def recorded_fuse_sizes(monkeypatch, model):
    """The number of pairs of every multimodal pass of ``model``, and the unwrapped ``fuse``."""
    sizes = []
    real = model.backbone.fuse
    monkeypatch.setattr(model.backbone, "fuse", lambda *args, **kwargs: sizes.append(int(args[4].numel())) or
                        real(*args, **kwargs))
    return sizes, real


def losses_of(out):
    return {key.rsplit("/", 1)[-1]: value for key, value in out["losses"].items()}


def _ce(logits, label):
    return math.log(sum(math.exp(v) for v in logits.tolist())) - float(logits[label])


def stage_one(model, batch):
    """The text and visual encoders on the batch, and ``joint(t, i)``: the multimodal pass of caption t with image i
    alone, ``(states, pooled, mask)``."""
    from mmf_multilevel.methods.batch import region_inputs

    net = model.backbone
    regions = region_inputs(batch, "mvptr", model.settings.feature_dim, "6d")
    text = net.encode_text(batch.input_ids, batch.input_mask)
    visual, vmask = net.encode_visual(batch.tag_ids, batch.tag_mask, regions.features, regions.boxes, regions.mask)

    def joint(t, i):
        states, pooled, mask = net.fuse(text[t:t + 1], batch.input_mask[t:t + 1], visual[i:i + 1], vmask[i:i + 1])
        return states[0], pooled[0], mask[0]

    return text, visual, joint


def reference(model, batch, negatives):
    """The five losses from the network's stages, one pair at a time."""
    net, heads = model.backbone, model.heads
    n, width, tags = batch.input_ids.size(0), batch.input_ids.size(1), net.num_tag_slots
    text, visual, joint = stage_one(model, batch)

    # MCR: every masked tag of every sample
    terms = [_ce(heads.mcr_logits(visual[b, k]), int(batch.mcr_label_ids[b, k]))
             for b in range(n) for k in range(tags) if batch.mcr_label_ids[b, k] != -100]
    mcr = sum(terms) / len(terms)
    # VSC
    g_t = [F.normalize(text[b, 0] @ net.txt_proj, dim=0) for b in range(n)]
    g_v = [F.normalize(visual[b, 0] @ net.vis_proj, dim=0) for b in range(n)]
    scale = math.exp(min(float(net.logit_scale), model.settings.pretraining.vsc_max_logit_scale))
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


def _phrase_region_score(batch, b, width, text_states, joint_states, joint_mask):
    """Caption ``b``'s phrases (read from ``text_states``) against the real regions of a multimodal pass."""
    phrases = [F.normalize(text_states[k], dim=0) for k in range(width) if batch.phrase_slots[b, k]]
    regions = [F.normalize(joint_states[width + k], dim=0) for k in range(joint_states.size(0) - width)
               if joint_mask[width + k]]
    if not phrases:
        return 0.0, False
    return sum(max(float(p @ r) for r in regions) for p in phrases) / len(phrases), True


def wpg_reference(batch, joint, partner, n, width, margin=0.2, negative="hard"):
    """Eq. 2's hinge, caption by caption. ``hard``: (caption b, image ``partner[b]``) in one multimodal pass;
    ``random``: caption b's phrases from its matched pass against the regions of sample ``partner[b]``'s."""
    hinges = []
    for b in range(n):
        states, _, mask = joint(b, b)
        positive, has = _phrase_region_score(batch, b, width, states, states, mask)
        if not has or partner[b] < 0:
            continue
        p = int(partner[b])
        other_states, _, other_mask = joint(b, p) if negative == "hard" else joint(p, p)
        phrase_states = other_states if negative == "hard" else states
        score, _ = _phrase_region_score(batch, b, width, phrase_states, other_states, other_mask)
        hinges.append(max(0.0, margin + score - positive))
    return sum(hinges) / len(hinges) if hinges else 0.0


def test_every_loss_equals_an_independent_pair_by_pair_computation(monkeypatch):
    model = build(itm_negatives="hardest")
    batch = tiny_batch("pretraining", batch=4)
    calls = recorded(monkeypatch, "split_negatives")
    fused, real_fuse = recorded_fuse_sizes(monkeypatch, model)
    with torch.no_grad():
        got = losses_of(model(batch))
    monkeypatch.setattr(model.backbone, "fuse", real_fuse)
    with torch.no_grad():
        want, joint = reference(model, batch, calls[0][2])
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
    neg_text, neg_image, anchored = calls[0][2]
    assert neg_text.numel() == 4  # n negatives: half (caption, hard image), half (hard caption, image)
    # one multimodal pass: the 4 matched pairs, the 4 negatives, and (caption, hard image) for the 2 captions
    # the ITM half did not pair with their hard image (WPG's negatives), nothing twice
    assert fused == [4 + 4 + 2]
    assert [int(neg_image[j]) for j in range(4) if anchored[j]] == [hard_image[int(neg_text[j])] for j in range(4)
                                                                    if anchored[j]]


def test_same_image_captions_are_never_negatives(monkeypatch):
    model = build(itm_negatives="sampled", wpg_negative="random")
    calls = recorded(monkeypatch, "split_negatives")
    for seed in range(8):
        batch = tiny_batch("pretraining", seed=seed, batch=4)
        batch.image_index = torch.tensor([5, 5, 6, 7])  # captions 0 and 1 show the same image
        with torch.no_grad():
            model(batch)
        neg_text, neg_image, _ = calls[-1][2]
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
    with pytest.raises(KeyError, match=r"needs 'phrase_slots' in the batch \(the phrase positions WPG reads; "
                                       "pretraining.wpg: false trains without WPG;"):
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
    calls = recorded(monkeypatch, "hard_negatives")
    with torch.no_grad():
        model(tiny_batch("retrieval", batch=4))
    # one draw, sampled at exp(min(5, 1))
    assert [(args[1], float(kwargs["scale"])) for args, kwargs, _ in calls] == [("sampled", pytest.approx(math.e))]


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
                       img_layer_norm=True, pretraining={"init_heads_from_bert": True}, num_embeddings=48)
    table = model.backbone.word_embeddings.weight.detach()
    bert_words = bert.bert.embeddings.word_embeddings.weight.detach()
    assert table.shape[0] == 44  # the largest concept id + 1: the concepts decide, not num_embeddings
    plain = build_head("pretraining", bert_model_name=str(folder), num_embeddings=48)  # no concepts: 48 rows
    assert plain.backbone.word_embeddings.weight.shape[0] == 48
    torch.testing.assert_close(plain.backbone.word_embeddings.weight[:40], bert_words)
    with pytest.raises(FileNotFoundError, match="model_config.mvptr.concepts: no id2phrase.json at "):
        build_head("pretraining", bert_model_name=str(folder), concepts=str(tmp_path / "missing.json"))
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


def test_random_wpg_negatives_are_samples_of_other_images_scored_at_the_margin(monkeypatch):
    """``wpg_negative: random`` (Eq. 2): caption b's phrases against the regions of a uniformly drawn sample of
    another image - its own matched pass - at ``wpg_margin``; a caption without phrases is left out. Captions
    0-2 show one image, so 3 is their only other sample; sample 0 is a valid draw for caption 3."""
    model = build(itm_negatives="hardest", wpg_negative="random", wpg_margin=0.7)
    draws = recorded(monkeypatch, "_random_other_image")
    drew_zero = False
    for seed in range(8):
        batch = tiny_batch("pretraining", seed=seed, batch=4)  # caption 1 has no phrase
        batch.image_index = torch.tensor([5, 5, 5, 7])
        with torch.no_grad():
            got = losses_of(model(batch))["wpg"]
            other = draws[-1][2]
            assert other[:3].tolist() == [3, 3, 3] and int(other[3]) in (0, 1, 2)
            drew_zero |= int(other[3]) == 0
            _, _, joint = stage_one(model, batch)
            want = wpg_reference(batch, joint, other, 4, batch.input_ids.size(1), 0.7, negative="random")
        assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6), seed
    assert drew_zero


def test_hard_wpg_negatives_include_image_0_and_the_margin(monkeypatch):
    """Every caption's hard image is image 0 (caption 0's is image 1): the captions the ITM half did not pair with
    their hard image get an extra (caption, image 0) pass, and WPG reads it at ``wpg_margin``."""
    model = build(wpg_margin=0.9)
    hard_image, hard_text = torch.tensor([1, 0, 0, 0]), torch.tensor([1, 0, 0, 0])
    monkeypatch.setattr(model_module, "hard_negatives", lambda *args, **kwargs: (hard_image, hard_text))
    batch = tiny_batch("pretraining", batch=4)
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            got = losses_of(model(batch))["wpg"]
            _, _, joint = stage_one(model, batch)
            want = wpg_reference(batch, joint, hard_image, 4, batch.input_ids.size(1), margin=0.9)
        assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6), seed


@pytest.mark.parametrize("negative", ["hard", "random"])
def test_wpg_aggregation_reaches_every_score(monkeypatch, negative):
    calls = recorded(monkeypatch, "wpg_scores")
    with torch.no_grad():
        build(wpg_negative=negative, wpg_aggregation="rand_top3")(tiny_batch("pretraining", batch=4))
    assert [args[4] for args, _, _ in calls] == ["rand_top3", "rand_top3"]  # positives, negatives


def test_without_wpg_the_multimodal_pass_holds_the_itm_pairs_alone(monkeypatch):
    model = build(wpg=False, itm_negatives="hardest")
    sizes, _ = recorded_fuse_sizes(monkeypatch, model)
    with torch.no_grad():
        model(tiny_batch("pretraining", batch=4))
    assert sizes == [4 + 4]  # the matched pairs and the n negatives; no (caption, hard image) rows for WPG


def test_pretraining_vsc_and_sampled_negatives_use_the_clamped_scale_and_need_no_image_index(monkeypatch):
    """``vsc_max_logit_scale`` caps log τ⁻¹ in VSC (Eq. 1) and in the sampled negatives; without ``image_index``
    each caption is its own image's only caption."""
    model = build(itm_negatives="sampled", vsc_max_logit_scale=1.0)
    with torch.no_grad():
        model.backbone.logit_scale.fill_(5.0)
    hard = recorded(monkeypatch, "hard_negatives")
    split = recorded(monkeypatch, "split_negatives")
    batch = tiny_batch("pretraining", batch=4)
    del batch["image_index"]
    with torch.no_grad():
        got = losses_of(model(batch))["vsc"]
        text, visual, _ = stage_one(model, batch)
        g_t, g_v = model.backbone.global_embeddings(text, visual)
        logits = math.e * g_t @ g_v.t()  # exp(min(5, 1))
        want = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    torch.testing.assert_close(got, want)
    (args, kwargs, _), = hard
    assert args[1] == "sampled" and float(kwargs["scale"]) == pytest.approx(math.e) and kwargs["image_ids"] is None
    neg_text, neg_image, _ = split[0][2]
    assert (neg_text != neg_image).all()


def test_retrieval_never_pairs_two_captions_of_one_image(monkeypatch):
    """Fine-tuning's hard negatives are drawn knowing each caption's image (``image_index``)."""
    model = build_head("retrieval", retrieval={"itm_negatives": "hardest"})
    hard = recorded(monkeypatch, "hard_negatives")
    calls = recorded(monkeypatch, "split_negatives")
    batch = tiny_batch("retrieval", batch=4)
    batch.image_index = torch.tensor([0, 0, 1, 2])
    with torch.no_grad():
        model(batch)
    assert hard[0][1]["image_ids"].tolist() == [0, 0, 1, 2]
    neg_text, neg_image, _ = calls[0][2]
    assert neg_text.numel() and (batch.image_index[neg_text] != batch.image_index[neg_image]).all()
    del batch["image_index"]  # without it each caption is its own image's only caption
    with torch.no_grad():
        model(batch)
    assert hard[1][1]["image_ids"] is None
    neg_text, neg_image, _ = calls[1][2]
    assert (neg_text != neg_image).all()


def test_refcoco_without_any_real_proposal_gives_a_zero_loss_in_the_graph():
    model = _refcoco_model(layer=1, loss="mse_iou").train()
    batch = tiny_batch("refcoco")
    batch.image_info_0.max_features = torch.zeros_like(batch.image_info_0.max_features)
    out = model(batch)
    loss = next(iter(out["losses"].values()))
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.isinf(out["scores"]).all()


def test_alignment_of_a_refcoco_model_reads_its_scoring_layer():
    model = _refcoco_model(layer=1)
    with torch.no_grad():
        out = model.alignment(tiny_batch("refcoco"))
    assert "layer 1 of 2" in out["source"]
    # 4 BERT layers: 2 text, then the multimodal ones; layer 1 of those is BERT's layer index 2
    assert out["layer"] == "backbone.bert.bert.encoder.layer.2.attention.self"


def test_encode_reads_the_regions_of_a_paired_side():
    model = build()
    batch, other = tiny_batch("pretraining"), tiny_batch("pretraining", seed=1)
    from mmf.common.sample import SampleList

    batch.img0 = SampleList({"image_feature_0": other.image_feature_0, "image_info_0": other.image_info_0})
    swapped = tiny_batch("pretraining")
    swapped.image_feature_0, swapped.image_info_0 = other.image_feature_0, other.image_info_0
    with torch.no_grad():
        torch.testing.assert_close(model.encode(batch, side="img0")["visual"], model.encode(swapped)["visual"])
    with pytest.raises(KeyError, match=r"mvptr needs the paired layout \('img1' missing"):
        model.encode(batch, side="img1")


def test_a_sample_with_one_other_image_always_draws_it():
    for _ in range(10):
        assert model_module._random_other_image(2, None, "cpu").tolist() == [1, 0]
        assert model_module._random_other_image(3, torch.tensor([4, 4, 9]), "cpu")[2].item() in (0, 1)
