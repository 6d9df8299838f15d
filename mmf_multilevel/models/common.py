"""What the registered method models share: reading their MMF model config."""
import os

from transformers import BertConfig

#: the ``model_config.<method>`` keys that size a randomly initialised BERT
BERT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps",
)


def bert_config_from(config) -> BertConfig:
    """A ``BertConfig`` from the BERT fields of a method's model config (random initialisation)."""
    return BertConfig(**{key: config[key] for key in BERT_CONFIG_KEYS if config.get(key) is not None})


def config_get(config, key, default=None):
    """``config[key]``, or ``default`` when the key is missing or None (dicts and OmegaConf nodes alike)."""
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def model_config_path(name):
    """The default config yaml of model ``name``: ``mmf_multilevel/configs/models/<name>/defaults.yaml``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models", name, "defaults.yaml")


def text_encoder_from(config):
    """The BERT of a method: ``bert_model_name`` by hub name or path (with the config's dropout
    probabilities), else randomly initialised from the config's BERT fields."""
    from mmf_multilevel.modules.text import BertTextEncoder

    name = config.get("bert_model_name")
    if name:
        overrides = {k: config[k] for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if config.get(k) is not None}
        return BertTextEncoder.from_name(str(name), **overrides)
    return BertTextEncoder.from_config(bert_config_from(config))


def head_type_of(config, model, allowed):
    """``training_head_type`` (default ``pretraining``), checked against ``allowed``."""
    head_type = str(config_get(config, "training_head_type", "pretraining"))
    if head_type not in allowed:
        raise ValueError(f"model_config.{model}.training_head_type must be one of {list(allowed)}, got {head_type!r}")
    return head_type
