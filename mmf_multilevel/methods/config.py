"""Typed defaults of the methods' model configs (``model_config.<method>``).

Each method writes its defaults once, as a dataclass in ``methods/<method>/config.py`` built from
the pieces here; the ``defaults.yaml`` beside it (what MMF reads through ``config_path``) must hold
the same values, which a test checks. Adapters read their settings through :func:`read_config`, so
a missing key takes the dataclass default, a wrong type or an unknown key is an error naming
``model_config.<method>.<key>``, and no ``get(key, default)`` repeats a yaml value in code.
"""
from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["BertFields", "MethodConfig", "read_config", "BERT_FIELDS", "bert_config_of"]


@dataclass
class BertFields:
    """``BertConfig`` fields, used as given when ``bert_model_name`` is null (random initialisation);
    BERT-base sizes."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1.0e-12


BERT_FIELDS = tuple(f.name for f in fields(BertFields))


@dataclass
class MethodConfig(BertFields):
    """What every method's model config has: the text encoder's source, the head type, MMF's
    ``losses`` list and ``model`` (the registry name MMF's trainer writes in)."""

    bert_model_name: Optional[str] = "bert-base-uncased"
    training_head_type: str = "pretraining"
    losses: List[Any] = field(default_factory=list)
    model: Optional[str] = None


def read_config(schema, config, method: str, moved=None):
    """``config`` (an OmegaConf node or a dict, e.g. MMF's ``model_config.<method>``) checked against the
    dataclass ``schema``: defaults filled in, types converted, unknown keys refused. ``moved`` maps a
    dotted key that no longer belongs here to where it went (its error says so)."""
    base = OmegaConf.structured(schema)
    try:
        # interpolations (``${env.data_dir}/...``) resolved against the whole run config the node belongs to
        given = (OmegaConf.create(OmegaConf.to_container(config, resolve=True)) if isinstance(config, DictConfig)
                 else OmegaConf.create(dict(config or {})))
        for key, place in (moved or {}).items():
            if OmegaConf.select(given, key, default=None) is not None:
                raise ValueError(f"model_config.{method}.{key} is no longer a model setting: {place}")
        merged = OmegaConf.merge(base, given)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
        known = ", ".join(sorted(_keys(base)))
        raise ValueError(f"model_config.{method}.{key}: {error.msg if hasattr(error, 'msg') else error} "
                         f"(known keys: {known})") from None
    return OmegaConf.to_object(merged)


def _keys(node):
    return [str(k) for k in node.keys()]


def bert_config_of(settings):
    """A ``transformers.BertConfig`` from a method's typed settings (random initialisation)."""
    from transformers import BertConfig

    return BertConfig(**{name: getattr(settings, name) for name in BERT_FIELDS})


def build_text_encoder(settings):
    """The BERT of a method: ``bert_model_name`` by hub name or path (with the settings' dropout
    probabilities), else randomly initialised from the settings' BERT fields."""
    from mmf_multilevel.modules.text import BertTextEncoder

    if settings.bert_model_name:
        return BertTextEncoder.from_name(str(settings.bert_model_name),
                                         hidden_dropout_prob=settings.hidden_dropout_prob,
                                         attention_probs_dropout_prob=settings.attention_probs_dropout_prob)
    return BertTextEncoder.from_config(bert_config_of(settings))
