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
