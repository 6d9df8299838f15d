"""SemVLP's model config (``model_config.semvlp``): the typed defaults; ``defaults.yaml`` beside this
file holds the same values with their explanations (a test keeps the two equal)."""
from dataclasses import dataclass, field
from typing import Optional

from mmf_multilevel.methods.config import MethodConfig


@dataclass
class SemVLPPretrainingConfig:
    init_mlm_from_bert: bool = True
    feature_loss: str = "mse"
    num_object_labels: int = 1600
    num_qa_answers: int = 0


@dataclass
class SemVLPConfig(MethodConfig):
    mode: str = "single"
    mode_schedule: str = "random"
    single_stream_ratio: float = 0.5
    schedule_seed: int = 0
    cross_layer_start: int = 6
    cross_attention_layers: str = "upper"
    feature_dim: int = 2048
    num_labels: Optional[int] = None
    pretraining: SemVLPPretrainingConfig = field(default_factory=SemVLPPretrainingConfig)
