"""The RefCOCO+ reference model's config (``model_config.visual_bert_grounding``): the typed defaults;
``defaults.yaml`` beside this file holds the same values with their explanations (a test keeps the two
equal). The keys are those of MMF's ``visual_bert`` (rc10), so its configs carry over unchanged."""
from dataclasses import dataclass, field
from typing import Any, List

from mmf_multilevel.methods.config import MethodConfig


@dataclass
class VisualBERTGroundingConfig(MethodConfig):
    training_head_type: str = "classification"
    visual_embedding_dim: int = 2048
    special_visual_initialize: bool = True
    embedding_strategy: str = "plain"
    bypass_transformer: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False
    random_initialize: bool = False
    freeze_base: bool = False
    finetune_lr_multiplier: float = 1.0
    num_labels: int = 2
    losses: List[Any] = field(default_factory=lambda: [{"type": "cross_entropy"}])
