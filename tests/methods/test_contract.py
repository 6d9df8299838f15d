"""The contract every registered method passes, for each of its head types: a tiny build, forward,
backward, finite losses named ``<split>/<dataset>/...``, a state-dict round trip, checkpoints written
before a rename, ``pretrained_state_mapping`` loading only the backbone (also under the prefixes of
before a rename), the typed defaults equal to ``defaults.yaml``, and ``from_pretrained`` through a
user zoo. A method gets these tests by being a folder under ``mmf_multilevel/methods/`` with a
``model.py`` (on the adapter base) and a ``testing.py``.

Nothing here assumes a pre-training head: where a test needs "the method's model" it builds the first
of its ``head_types`` (the pre-training head when the method has one), and where it needs a
fine-tuning model the first head type other than ``pretraining``."""
import hashlib
import importlib
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from helpers.mmf import clean_env
from helpers.zoo import tar_bytes
from mmf_multilevel.methods import method_names
from mmf_multilevel.methods.base import MethodModel, apply_key_map
from mmf_multilevel.methods.progress import TrainingProgress

pytestmark = pytest.mark.usefixtures("mmf_global_config")


def adapter(name):
    from mmf.common.registry import registry

    return registry.get_model_class(name)


def first_head(name):
    """The method's first head type (its pre-training head when it has one)."""
    return adapter(name).head_types[0]


def task_head(name):
    """The method's first head type other than ``pretraining`` (a fine-tuning model)."""
    heads = adapter(name).head_types
    return next((head for head in heads if head != "pretraining"), heads[0])


METHODS = method_names()
CASES = [(name, head) for name in METHODS for head in adapter(name).head_types]


def tiny(name):
    return importlib.import_module(f"mmf_multilevel.methods.{name}.testing")


def build(name, head_type, seed=0):
    cls = adapter(name)
    config = OmegaConf.merge(OmegaConf.load(cls.config_path()).model_config[name], tiny(name).tiny_config(head_type))
    torch.manual_seed(seed)
    model = cls(config)
    model.build()
    model.init_losses()  # as MMF's build_model does
    return model


def run(model, batch, seed=1):
    torch.manual_seed(seed)
    return model(batch)


def test_every_method_folder_is_on_the_adapter_base_and_registered():
    assert set(method_names()) >= {"semvlp", "muvla", "visual_bert_grounding"}
    for name in METHODS:
        cls = adapter(name)
        assert issubclass(cls, MethodModel) and cls.name == name, name
        assert cls.__module__ == f"mmf_multilevel.methods.{name}.model"


@pytest.mark.parametrize("name,head_type", CASES)
def test_forward_backward_and_named_losses(name, head_type):
    model = build(name, head_type).train()
    model.on_update_start(TrainingProgress(update=0, epoch=1))
    batch = tiny(name).tiny_batch(head_type)
    losses = run(model, batch)["losses"]
    assert losses, f"{name}/{head_type}: no losses"
    for key, value in losses.items():
        assert key.startswith(f"train/{batch.dataset_name}/"), key
        assert value.numel() == 1 and torch.isfinite(value).all(), (key, value)
    sum(losses.values()).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(k.startswith("backbone.") and g.abs().sum() > 0 for k, g in grads.items()), "no gradient reached the backbone"
    head = "heads." if head_type == "pretraining" else ("classifier.", "itm_head.", "heads.itm_head.")
    assert any(k.startswith(head) and g.abs().sum() > 0 for k, g in grads.items()), "no gradient reached the head"


@pytest.mark.parametrize("name,head_type", CASES)
def test_state_dict_round_trip_gives_the_same_outputs(name, head_type):
    model = build(name, head_type, seed=0).eval()
    other = build(name, head_type, seed=1).eval()
    batch = tiny(name).tiny_batch(head_type)
    other.load_state_dict(model.state_dict(), strict=True)
    assert run(other, batch)["scores"].shape == run(model, batch)["scores"].shape
    torch.testing.assert_close(run(other, batch)["scores"], run(model, batch)["scores"])


@pytest.mark.parametrize("name", METHODS)
def test_checkpoints_written_before_a_rename_still_load(name):
    cls = adapter(name)
    model = build(name, first_head(name)).eval()
    state = model.state_dict()
    old = {}
    for key, value in state.items():  # today's keys written back in the old names of the key map
        for before, now in cls.state_key_map:
            if now is not None and key.startswith(now):
                key = before + key[len(now):]
                break
        old[key] = value
    for before, now in cls.state_key_map:
        if now is None:
            old[before.rstrip(".")] = torch.zeros(())  # an entry the model no longer has
    fresh = build(name, first_head(name), seed=3).eval()
    fresh.load_state_dict(old, strict=True)
    for key, value in state.items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    assert all(apply_key_map(k, cls.state_key_map) is None or apply_key_map(k, cls.state_key_map) in state for k in old)


class _Writer:
    def __init__(self):
        self.lines = []

    def write(self, line, *args, **kwargs):
        self.lines.append(line)


@pytest.mark.parametrize("name,head_type", [c for c in CASES if c[1] != "pretraining"])
def test_pretrained_state_mapping_loads_only_the_backbone(name, head_type):
    source = build(name, first_head(name), seed=1).state_dict()
    _assert_loads_only_the_backbone(name, head_type, source, {"backbone": "backbone"}, source)


def _assert_loads_only_the_backbone(name, head_type, checkpoint, mapping, expected):
    """``checkpoint`` loaded into a fresh ``head_type`` model with ``mapping`` as
    ``pretrained_state_mapping``: the backbone equals ``expected``'s (today's keys), the rest is untouched."""
    from types import SimpleNamespace

    from mmf_multilevel.trainers.checkpoint import MultilevelCheckpoint

    target = build(name, head_type, seed=2)
    # a model that reads a checkpoint of another layout by rule (SIMLA's NLVR2) is compared with its own reading
    expected = target.prepare_pretrained_state(dict(expected))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    config = OmegaConf.create({"checkpoint": {"pretrained_state_mapping": mapping}})
    stub = SimpleNamespace(trainer=SimpleNamespace(model=target, config=config, writer=_Writer()))
    MultilevelCheckpoint._load_pretrained(stub, checkpoint)
    after = target.state_dict()
    assert any(k.startswith("backbone.") for k in after)
    for key, value in after.items():
        want = expected[key] if key.startswith("backbone.") else before[key]
        assert torch.equal(value, want), key


OLD_BACKBONE_PREFIXES = [(name, old) for name in METHODS for old, new in adapter(name).state_key_map if new == "backbone."]


@pytest.mark.parametrize("name,old", OLD_BACKBONE_PREFIXES)
def test_pretrained_state_mapping_written_before_a_rename_loads_the_backbone(name, old):
    """A project's ``pretrained_state_mapping: {<old>: <old>}`` and a checkpoint in the old layout (e.g.
    ``model.bert: model.bert`` with MMF's visual_bert checkpoints): the prefixes and keys are translated
    by the method's key map, and only the backbone is copied."""
    source = build(name, first_head(name), seed=1).state_dict()
    written = {(old + key[len("backbone."):] if key.startswith("backbone.") else key): value
               for key, value in source.items()}
    prefix = old.rstrip(".")
    _assert_loads_only_the_backbone(name, task_head(name), written, {prefix: prefix}, source)


@pytest.mark.parametrize("name", METHODS)
def test_typed_defaults_equal_defaults_yaml(name):
    cls = adapter(name)
    yaml = OmegaConf.to_container(OmegaConf.load(cls.config_path()).model_config[name])
    typed = OmegaConf.to_container(OmegaConf.structured(cls.config_class))
    typed.pop("model")
    assert yaml == typed


@pytest.mark.parametrize("name", METHODS)
def test_unknown_or_mistyped_keys_name_the_config_key(name):
    cls = adapter(name)
    with pytest.raises(ValueError, match=f"model_config.{name}.no_such_key"):
        cls(OmegaConf.create({"no_such_key": 1}))
    with pytest.raises(ValueError, match=f"model_config.{name}.hidden_size"):
        cls(OmegaConf.create({"hidden_size": "wide"}))
    with pytest.raises(ValueError, match="training_head_type must be one of"):
        cls(OmegaConf.create({**tiny(name).tiny_config(first_head(name)), "training_head_type": "nope"})).build()


def test_from_pretrained_through_a_user_zoo_in_a_fresh_interpreter(tmp_path, server):
    """Every method's weights, published in a user zoo, load with MMF's ``from_pretrained``: download
    over HTTP, checksum, extraction, then the same parameters."""
    zoo_lines, expected = [], {}
    for name in METHODS:
        model = build(name, task_head(name), seed=5)
        weights = tmp_path / f"{name}_final.pth"
        torch.save(model.state_dict(), weights)
        expected[name] = str(weights)
        full = OmegaConf.create({"model_config": {name: model.config}, "training": {"update_frequency": 1}})
        archive = tar_bytes({f"{name}_final.pth": weights.read_bytes(), "config.yaml": OmegaConf.to_yaml(full).encode()})
        server.files[f"{name}.tar.gz"] = archive
        zoo_lines.append(
            f"{name}:\n  user:\n    tiny:\n      version: 1.0_2026_12_01\n      resources:\n"
            f"      - url: {server.url}/{name}.tar.gz\n        file_name: {name}.tar.gz\n"
            f"        hashcode: {hashlib.sha256(archive).hexdigest()}\n"
        )
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("".join(zoo_lines))
    script = (
        "import torch, mmf\n"
        "from mmf.common.registry import registry\n"
        f"for key, path in {expected!r}.items():\n"
        "    cls = registry.get_model_class(key)\n"
        "    m = cls.from_pretrained(key + '.user.tiny')\n"
        "    ref = torch.load(path, weights_only=True)\n"
        "    own = m.state_dict()\n"
        "    assert ref.keys() == own.keys(), key\n"
        "    assert all(torch.equal(own[k], v) for k, v in ref.items()), key + ': weights differ'\n"
        "    assert type(m) is cls and not m.training\n"
        "    print('loaded', key, len(ref))\n"
    )
    env = clean_env(tmp_path, MMF_USER_ZOO=zoo, MMF_DATA_DIR=tmp_path / "data")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for name in METHODS:
        assert f"loaded {name}" in result.stdout
    assert {name for name, _ in server.requests} == {f"{name}.tar.gz" for name in METHODS}


@pytest.mark.parametrize("name,head_type", CASES)
def test_a_batch_without_text_is_refused_naming_the_model(name, head_type):
    model = build(name, head_type).train()
    batch = tiny(name).tiny_batch(head_type)
    # the texts, at the top level or nested per image (SOHO's pre-training batch: ``pairs``)
    holder = batch["pairs"] if "input_ids" not in batch and "pairs" in batch else batch
    del holder["input_ids"]
    with pytest.raises(KeyError, match=f"{name} needs 'input_ids'"):
        model(batch)


# ---------------------------------------------------------------------- matching with a pre-training model
def _restored_ids(ids, labels):
    """The words a masked_token processor replaced put back (``labels`` >= 0 hold them)."""
    return torch.where(labels >= 0, labels, ids)


def _unmasked_semvlp(batch):
    for key in ("region_selected", "region_zeroed"):
        batch[key] = torch.zeros_like(batch[key])
    batch.input_ids = _restored_ids(batch.input_ids, batch.lm_label_ids)
    return batch, slice(None)


def _unmasked_muvla(batch):
    batch.input_ids = _restored_ids(batch.input_ids, batch.lm_label_ids)
    return batch, slice(None)


def _unmasked_mvptr(batch):
    # the masked tag back (MCR) and no MLM target: the captions' ids are the originals already
    batch.tag_ids = torch.where(batch.mcr_label_ids >= 0, batch.mcr_label_ids, batch.tag_ids)
    batch.mcr_label_ids = torch.full_like(batch.mcr_label_ids, -100)
    return batch, slice(0, batch.input_ids.size(0))  # the positives come first, then the hard negatives


def _unmasked_simla(batch):
    batch.input_ids = _restored_ids(batch.input_ids, batch.lm_label_ids)
    return batch, slice(0, batch.input_ids.size(0))  # B positives, then 2B negative pairs


def _unmasked_soho(batch):
    from mmf_multilevel.methods.soho.testing import one_text_batch

    batch = one_text_batch(num_images=3)
    batch.lm_label_ids = torch.full_like(batch.lm_label_ids, -1)
    return batch, slice(None)


#: per method with a pre-training head: its tiny pre-training batch with nothing masked, and the rows of the
#: pre-training pass's ``scores`` that are the batch's own (caption i, image i) pairs
UNMASKED = {"semvlp": _unmasked_semvlp, "muvla": _unmasked_muvla, "mvptr": _unmasked_mvptr,
            "simla": _unmasked_simla, "soho": _unmasked_soho}
PRETRAINING = [name for name in METHODS if "pretraining" in adapter(name).head_types]


def test_every_pre_training_method_has_an_unmasked_batch_for_the_matching_test():
    assert set(PRETRAINING) == set(UNMASKED), "a method with a pre-training head needs an entry in UNMASKED"


@pytest.mark.parametrize("name", PRETRAINING)
def test_pre_training_match_logits_are_the_itm_scores_of_the_unmasked_pair(name):
    """What ``Predictor.match`` scores a pair with on a pre-training model: equal to the scores the method's own
    pre-training pass hands its ITM loss for the same pairs when nothing is masked."""
    model = build(name, "pretraining").eval()
    batch, own = UNMASKED[name](tiny(name).tiny_batch("pretraining"))
    with torch.no_grad():
        expected = run(model, batch)["scores"][own]
        logits = model.match_logits(batch)
    assert logits.shape == (expected.size(0), 2)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("name", PRETRAINING)
def test_pre_training_match_logits_read_the_text_and_not_the_masking_fields(name):
    model = build(name, "pretraining").eval()
    batch, _ = UNMASKED[name](tiny(name).tiny_batch("pretraining"))
    with torch.no_grad():
        logits = model.match_logits(batch)
        if "is_correct" in batch:  # a label, not an input
            batch.is_correct = 1 - batch.is_correct
        torch.testing.assert_close(model.match_logits(batch), logits)
        batch.input_ids = batch.input_ids.clone()
        batch.input_ids[0, 1] = 4 if int(batch.input_ids[0, 1]) != 4 else 5  # one word of the first caption
        changed = model.match_logits(batch)
    assert not torch.allclose(changed[0], logits[0]), "the first caption's word did not reach the matching head"
    torch.testing.assert_close(changed[1:], logits[1:])


@pytest.mark.parametrize("name", METHODS)
def test_a_model_without_a_matching_head_refuses_to_match_by_name(name):
    head = next((h for h in adapter(name).head_types if h not in ("pretraining", "retrieval")), None)
    if head is None:
        pytest.skip(f"{name}: every head type matches")
    model = build(name, head).eval()
    with pytest.raises(ValueError, match=f"{name} model with training_head_type '{head}' has no image-text matching"):
        model.match_logits(tiny(name).tiny_batch(head))
