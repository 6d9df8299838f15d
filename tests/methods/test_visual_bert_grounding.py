"""visual_bert_grounding on the adapter base: the same scores and losses as the MMF ``VisualBERT``
subclass it replaces (kept here, unregistered, only as the reference), checkpoints of that layout,
MMF ``visual_bert`` pre-trained weights through the projects' ``pretrained_state_mapping``, the
optimizer's parameter groups, the padding masks, VisualBERT's options and the project configs."""
import os
from types import SimpleNamespace

import pytest
import torch
from mmf.models.visual_bert import VisualBERT
from mmf.utils.build import build_optimizer
from mmf.utils.checkpoint import Checkpoint
from mmf.utils.configuration import load_yaml
from omegaconf import OmegaConf

from helpers.mmf import ROOT
from mmf_multilevel.methods.testing import TINY_BERT
from mmf_multilevel.methods.visual_bert_grounding import testing
from mmf_multilevel.methods.visual_bert_grounding.model import VisualBERTGrounding
from mmf_multilevel.modules.task_heads import RegionScoringHead
from mmf_multilevel.trainers.checkpoint import MultilevelCheckpoint

pytestmark = pytest.mark.usefixtures("mmf_global_config")

NAME = "visual_bert_grounding"
PROJECTS = os.path.join(ROOT, "projects", "visual_bert")


class VisualBERTSubclass(VisualBERT):
    """The model before the adapter base (verbatim but its head-type check): MMF's ``VisualBERT`` (its classification model's
    encoder, ``model.bert``) plus ``region_scorer``, its inputs through VisualBERT's flatten helpers."""

    def build(self):
        super().build()
        bert_config = self.model.bert.config
        self.region_scorer = RegionScoringHead(bert_config.hidden_size, getattr(bert_config, "layer_norm_eps", 1e-12))

    def forward(self, sample_list):
        sample_list = self.update_sample_list_based_on_head(sample_list)
        sample_list = self.add_custom_params(sample_list)
        sample_list = self.flatten_for_bert(sample_list)
        sequence, _, _ = self.model.bert(
            sample_list.input_ids,
            sample_list.attention_mask,
            sample_list.token_type_ids,
            sample_list.visual_embeddings,
            sample_list.position_embeddings_visual,
            sample_list.visual_embeddings_type,
            sample_list.image_text_alignment,
        )
        text_length = sample_list.input_ids.size(1)
        return {"scores": self.region_scorer(sequence[:, text_length:], sample_list.image_mask)}


def config(**overrides):
    defaults = OmegaConf.load(VisualBERTGrounding.config_path()).model_config[NAME]
    return OmegaConf.merge(defaults, testing.tiny_config("classification"), overrides)


def build(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls(config(**overrides))
    model.build()
    model.init_losses()
    return model.eval()


def batch(seed=0):
    """The contract's batch (text and region padding in samples 2 and 3) with a second segment."""
    sample_list = testing.tiny_batch("classification", seed=seed)
    sample_list.segment_ids = (torch.arange(sample_list.input_ids.size(1)) >= 4).long().expand_as(
        sample_list.input_ids) * sample_list.input_mask
    return sample_list


def run(model, seed=0, batch_seed=0):
    torch.manual_seed(seed)  # the same dropout draws for both models in train mode
    return model(batch(batch_seed))


def old_with_new_weights(new, old):
    """``new`` given ``old``'s weights through the key map (the old layout, loaded strictly)."""
    result = new.load_state_dict(old.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return new


# ------------------------------------------------------------------ the same predictions
@pytest.mark.parametrize("options", [
    {},
    {"special_visual_initialize": False},
    {"output_hidden_states": True},
    {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "train": True},
], ids=["defaults", "no_special_visual_init", "hidden_states", "train_with_dropout"])
def test_scores_and_loss_equal_the_visual_bert_subclass_for_the_same_weights(options):
    options = dict(options)
    train = options.pop("train", False)
    old = build(VisualBERTSubclass, seed=0, **options).train(train)
    new = old_with_new_weights(build(VisualBERTGrounding, seed=1, **options), old).train(train)
    expected, got = run(old), run(new)
    assert got["scores"].shape == (3, testing.REGIONS)
    assert torch.equal(got["scores"], expected["scores"])
    assert got["losses"].keys() == expected["losses"].keys() == {f"train/{batch().dataset_name}/cross_entropy"}
    for key, value in expected["losses"].items():
        assert torch.equal(got["losses"][key], value), key
    if options.get("output_hidden_states"):
        assert got["sequence_output"].shape == (3, batch().input_ids.size(1) + testing.REGIONS, TINY_BERT["hidden_size"])
        assert got["pooled_output"].shape == (3, TINY_BERT["hidden_size"])


def test_scores_equal_a_hand_computation_through_mmfs_visual_bert_base():
    """The batch contract hands VisualBERTBase what VisualBERT's helpers did: ids, segments,
    ``[text mask ; region mask]``, the raw features and visual token type 0; the head sees the region states."""
    model = build(VisualBERTGrounding)
    sample_list = batch()
    info = sample_list.image_info_0
    num = sample_list.image_feature_0.size(1)
    region_mask = (torch.arange(num).view(1, -1) < info.max_features.view(-1, 1)).long()
    sequence, _, _ = model.backbone(sample_list.input_ids, torch.cat([sample_list.input_mask, region_mask], -1),
                                    sample_list.segment_ids, sample_list.image_feature_0, None,
                                    torch.zeros_like(region_mask), None)
    expected = model.classifier(sequence[:, sample_list.input_ids.size(1):], region_mask)
    assert torch.equal(model(sample_list)["scores"], expected)


def test_padding_regions_and_tokens_change_no_real_region_score():
    model = build(VisualBERTGrounding)
    clean, noisy = batch(), batch()
    info, text_mask = noisy.image_info_0, noisy.input_mask
    padding = torch.arange(testing.REGIONS).view(1, -1) >= info.max_features.view(-1, 1)
    assert padding.any() and (text_mask == 0).any()
    noisy.image_feature_0 = noisy.image_feature_0.masked_fill(padding.unsqueeze(-1), 7.0)
    noisy.input_ids = noisy.input_ids.masked_fill(text_mask == 0, 9)
    expected, got = model(clean)["scores"], model(noisy)["scores"]
    torch.testing.assert_close(got[~padding], expected[~padding], rtol=0, atol=1e-6)
    assert (got[padding] == -1e4).all()


# ------------------------------------------------------------------ checkpoints
def test_a_checkpoint_written_before_the_change_loads_with_identical_outputs(tmp_path):
    """A ``.pth`` of the old model (``model.bert.*``, ``region_scorer.*`` and VisualBERT's unused
    ``model.classifier.*``), read as MMF's resume does (``load_state_dict(strict=False)``)."""
    old = build(VisualBERTSubclass, seed=0)
    path = tmp_path / "visual_bert_grounding_final.pth"
    torch.save(old.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert {key.split(".")[0] + "." + key.split(".")[1] for key in state if key.startswith("model.")} == {
        "model.bert", "model.classifier"}
    new = build(VisualBERTGrounding, seed=1)
    result = new.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    dropped = {key for key in state if key.startswith("model.classifier.")}
    assert len(new.state_dict()) == len(state) - len(dropped)
    assert torch.equal(run(new)["scores"], run(old)["scores"])


def _load_pretrained(loader, model, checkpoint, mapping):
    config = OmegaConf.create({"checkpoint": {"pretrained_state_mapping": mapping}})
    stub = SimpleNamespace(trainer=SimpleNamespace(model=model, config=config, writer=SimpleNamespace(write=lambda *a, **k: None)))
    loader(stub, checkpoint)


def test_the_projects_pretrained_state_mapping_loads_mmf_visual_bert_weights_as_before():
    """``projects/visual_bert/refcoco_plus.yaml`` maps ``model.bert: model.bert`` from an MMF
    ``visual_bert`` pre-training checkpoint (``model.bert.*``, ``model.cls.*``): the new model takes
    the encoder (key map) and nothing else, and scores as the old model loaded by MMF's own loader."""
    from mmf.common.registry import registry

    mapping = OmegaConf.to_container(OmegaConf.load(os.path.join(PROJECTS, "refcoco_plus.yaml")).checkpoint.pretrained_state_mapping)
    assert mapping == {"model.bert": "model.bert"}
    cls = registry.get_model_class("visual_bert")
    visual_bert_config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config.visual_bert,
                                         testing.tiny_config("pretraining"))
    torch.manual_seed(4)
    pretrained = cls(visual_bert_config)
    pretrained.build()
    checkpoint = pretrained.state_dict()
    assert any(key.startswith("model.cls.") for key in checkpoint)

    new = build(VisualBERTGrounding, seed=1)
    head_before = {k: v.clone() for k, v in new.classifier.state_dict().items()}
    _load_pretrained(MultilevelCheckpoint._load_pretrained, new, checkpoint, mapping)
    encoder = {k[len("model.bert."):]: v for k, v in checkpoint.items() if k.startswith("model.bert.")}
    assert new.backbone.state_dict().keys() == encoder.keys()
    assert all(torch.equal(v, encoder[k]) for k, v in new.backbone.state_dict().items())
    assert all(torch.equal(v, head_before[k]) for k, v in new.classifier.state_dict().items())

    old = build(VisualBERTSubclass, seed=2)
    _load_pretrained(Checkpoint._load_pretrained, old, checkpoint, mapping)  # rc10's loader, before the change
    new.classifier.load_state_dict(old.region_scorer.state_dict())
    assert torch.equal(run(new)["scores"], run(old)["scores"])


# ------------------------------------------------------------------ VisualBERT's options
def test_optimizer_groups_are_visual_berts_and_include_the_region_scorer():
    """As VisualBERT's ``get_optimizer_parameters``: no decay on biases and LayerNorms, the encoder at
    lr x ``finetune_lr_multiplier``; the region scorer is a group at lr (the model before the change
    handed VisualBERT's unused ``model.classifier`` to the optimizer instead, so its scorer never trained)."""
    model = build(VisualBERTGrounding, finetune_lr_multiplier=0.1)
    run_config = OmegaConf.create({"model": NAME, "model_config": {NAME: model.config},
                                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.5}}})
    optimizer = build_optimizer(model, run_config)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert set(group_of) == {id(p) for p in names.values()}
    for name, parameter in names.items():
        group = group_of[id(parameter)]
        lr = 1e-3 if name.startswith("classifier.") else 1e-4
        decay = 0.0 if ("bias" in name or "LayerNorm" in name) else 0.01
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == decay, name


def test_freeze_base_trains_the_region_scorer_only():
    model = build(VisualBERTGrounding, freeze_base=True).train()
    sum(run(model)["losses"].values()).backward()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.classifier.parameters())


@pytest.mark.parametrize("key", ["bypass_transformer", "output_attentions"])
def test_visual_bert_options_its_encoder_cannot_run_are_refused_by_name(key):
    with pytest.raises(ValueError, match=f"model_config.{NAME}.{key}: true is not supported"):
        build(VisualBERTGrounding, **{key: True})


# ------------------------------------------------------------------ the project configs
def project_model_config(path):
    defaults = OmegaConf.load(VisualBERTGrounding.config_path()).model_config[NAME]
    project = load_yaml(os.path.join(PROJECTS, path))  # resolves includes: as mmf_run reads it
    assert project.model == NAME
    return OmegaConf.merge(defaults, project.model_config[NAME])


@pytest.mark.parametrize("path", ["refcoco_plus.yaml", "demo/refcoco_plus.yaml"])
def test_the_project_configs_read_unchanged(path):
    settings = VisualBERTGrounding(project_model_config(path)).settings
    assert settings.training_head_type == "classification" and settings.visual_embedding_dim == 2048


def test_the_demo_project_builds_and_scores_its_proposals():
    model = VisualBERTGrounding(project_model_config("demo/refcoco_plus.yaml"))
    torch.manual_seed(0)
    model.build()
    model.init_losses()
    sample_list = batch()
    sample_list.image_feature_0 = torch.rand(3, testing.REGIONS, 2048)
    out = model.eval()(sample_list)
    assert out["scores"].shape == (3, testing.REGIONS) and torch.isfinite(out["losses"][f"train/{sample_list.dataset_name}/cross_entropy"])


def test_bert_weights_by_path_start_the_encoder_and_options_reach_it(tmp_path, monkeypatch):
    """``bert_model_name`` (a ``save_pretrained`` folder here; a hub id elsewhere) starts VisualBERT's
    encoder from those weights, as MMF's ``visual_bert`` does; ``random_initialize`` keeps BERT's init
    off; the VisualBERT options reach the encoder."""
    from transformers import BertConfig, BertModel

    settings = config()
    bert = BertModel(BertConfig(vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
                                num_hidden_layers=settings.num_hidden_layers,
                                num_attention_heads=settings.num_attention_heads,
                                intermediate_size=settings.intermediate_size,
                                max_position_embeddings=settings.max_position_embeddings))
    with torch.no_grad():
        bert.encoder.layer[0].attention.self.query.weight.normal_(0.0, 3.0)
    bert.save_pretrained(tmp_path / "bert")
    from mmf.common.registry import registry

    previous = registry.get("config", no_warning=True)
    registry.register("config", OmegaConf.create({"env": {"cache_dir": str(tmp_path / "cache")},
                                               "evaluation": {"predict": False}, "training": {"update_frequency": 1}}))
    try:  # MMF's loader reads its cache folder from the global config
        model = build(VisualBERTGrounding, bert_model_name=str(tmp_path / "bert"), output_hidden_states=True)
    finally:
        registry.register("config", previous)
    torch.testing.assert_close(model.backbone.encoder.layer[0].attention.self.query.weight,
                               bert.encoder.layer[0].attention.self.query.weight)
    assert model.backbone.output_hidden_states is True
    assert build(VisualBERTGrounding).backbone.output_hidden_states is False
    # random_initialize: false applies BERT's initialisation (std initializer_range) to the random encoder
    init = build(VisualBERTGrounding, random_initialize=False, initializer_range=0.5, seed=1)
    assert init.backbone.encoder.layer[0].attention.self.query.weight.std().item() == pytest.approx(0.5, rel=0.15)
    assert init.classifier.transform[0].weight.std().item() == pytest.approx(0.5, rel=0.15)  # the scorer too


def test_visual_bert_options_and_cache_folder_reach_the_encoder(monkeypatch):
    """The options VisualBERTBase stores on its config, and ``from_pretrained`` reading MMF's cache folder (as
    MMF's ``visual_bert`` does: ``<cache_dir>/distributed_-1``)."""
    from mmf.models.visual_bert import VisualBERTBase

    stored = build(VisualBERTGrounding).backbone.config
    assert stored.embedding_strategy == "plain" and stored.bypass_transformer is False
    assert stored.output_attentions is False and stored.output_hidden_states is False
    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        return VisualBERTBase(kwargs.pop("config"), **{k: v for k, v in kwargs.items() if k != "cache_dir"})

    monkeypatch.setattr(VisualBERTBase, "from_pretrained", from_pretrained)
    monkeypatch.setattr("mmf_multilevel.methods.visual_bert_grounding.model.get_mmf_cache_dir", lambda: "/cache/mmf")
    build(VisualBERTGrounding, bert_model_name="bert-base-uncased")
    assert seen["name"] == "bert-base-uncased" and seen["cache_dir"] == os.path.join("/cache/mmf", "distributed_-1")
    assert seen["embedding_strategy"] == "plain" and seen["bypass_transformer"] is False


def test_encode_splits_the_sequence_and_names_the_model_for_missing_regions():
    model = build(VisualBERTGrounding)
    sample_list = batch()
    out = model.encode(sample_list)
    length = sample_list.input_ids.size(1)
    torch.testing.assert_close(out["text"], out["sequence"][:, :length])
    torch.testing.assert_close(out["regions"], out["sequence"][:, length:])
    del sample_list["image_feature_0"]
    with pytest.raises(KeyError, match="visual_bert_grounding needs 'image_feature_0'"):
        model.encode(sample_list)
