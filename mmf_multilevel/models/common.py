"""What the registered method models share: MMF registration, reading their model config, and
turning MMF sample lists into text and region tensors."""
import os

from torch import nn
from transformers import BertConfig

from mmf_multilevel.modules.visual import normalize_boxes, num_boxes_to_mask


class MMFMissingBaseModel(nn.Module):
    """Stands in for MMF's ``BaseModel`` where MMF is not installed: the plain networks of each method
    still import and work, the registered adapters say what is missing."""

    def __init__(self, config, *args, **kwargs):
        raise ImportError(f"the registered {type(self).__name__} model needs MMF: pip install --no-deps mmf==1.0.0rc10")


def _registry():
    # imported when called, not with this module: importing MMF's registry loads this plugin's
    # models, which import this module
    try:
        from mmf.common.registry import registry
    except ImportError:  # pragma: no cover - exercised only without MMF
        return None
    return registry


def register_model(name):
    """``registry.register_model(name)`` when MMF is installed, else a no-op decorator."""
    def register(cls):
        registry = _registry()
        return registry.register_model(name)(cls) if registry is not None else cls
    return register


def registry_value(key):
    """``registry.get(key)`` (None when unset or without MMF)."""
    registry = _registry()
    return registry.get(key, no_warning=True) if registry is not None else None


def training_setting(key, default):
    """``training.<key>`` of the run's registered config as a positive int, else ``default``."""
    config = registry_value("config")
    try:
        return max(1, int(config.training.get(key) or default))
    except (AttributeError, TypeError, ValueError):
        return default

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


def sample_text(sample_list, model):
    """``(input_ids, input_mask, segment_ids or None)`` of a sample list (the mask defaults to the
    non-zero ids); ``model`` names the model in the error when the ids are missing."""
    if "input_ids" not in sample_list:
        raise KeyError(f"{model} needs 'input_ids' (the text processor's output) in the sample list")
    input_ids = sample_list["input_ids"]
    mask = sample_list["input_mask"] if "input_mask" in sample_list else (input_ids != 0).long()
    segment = sample_list["segment_ids"] if "segment_ids" in sample_list else None
    return input_ids, mask, segment


def sample_regions(features, info, feature_dim, box_mode, model):
    """Region features ``(B, N, D)`` and MMF's ``image_info_0`` -> ``(features, boxes, region_mask)``:
    float features checked against ``feature_dim``, the region mask from ``max_features`` /
    ``num_boxes``, and ``box_mode`` (``"4d"`` / ``"5d"``) normalised boxes, zero on padding."""
    if features is None or info is None:
        raise KeyError(f"{model} needs 'image_feature_0' and 'image_info_0' (region features) in the sample list")
    features = features.float()
    batch, num, dim = features.shape
    if dim != feature_dim:
        raise ValueError(f"image_feature_0 has {dim}-d features but model_config.{model}.feature_dim is {feature_dim}")
    for key in ("bbox", "image_width", "image_height"):
        if key not in info:
            raise KeyError(f"{model} needs image_info_0.{key} for the {box_mode} region boxes")
    count = info["max_features"] if "max_features" in info else info["num_boxes"]
    region_mask = num_boxes_to_mask(count.view(-1).clamp(max=num).to(features.device), num)
    boxes = normalize_boxes(info["bbox"].to(features.device).float()[:, :num], info["image_width"].to(features.device),
                            info["image_height"].to(features.device), mode=box_mode)
    boxes = boxes * region_mask.unsqueeze(-1).to(boxes.dtype)
    return features, boxes, region_mask
