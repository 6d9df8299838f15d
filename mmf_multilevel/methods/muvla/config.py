"""μ-VLA's model config (``model_config.muvla``): the typed defaults; ``defaults.yaml`` beside this
file holds the same values with their explanations (a test keeps the two equal)."""
from dataclasses import dataclass, field
from typing import Optional

from mmf_multilevel.methods.config import MethodConfig


@dataclass
class MuVLAPretrainingConfig:
    num_tags: int = 1600
    init_heads_from_bert: bool = True
    mrm_normalization: str = "masked"
    feature_loss: str = "mse"
    rp_mrfr: bool = False
    is_mrm: bool = False
    itm_weighting: str = "per_pair"
    itm_weight_source: str = "masked"
    itm_weight_start_epoch: int = 1
    itm_weight_start_update: Optional[int] = None
    default_task: Optional[str] = None


@dataclass
class MuVLAConfig(MethodConfig):
    embedding_style: str = "paper"
    visual_bert_checkpoint: Optional[str] = None
    released_checkpoint: Optional[str] = None
    feature_dim: int = 2048
    pooling: str = "last_text"
    num_labels: Optional[int] = None
    classifier_dropout: float = 0.1
    pretraining: MuVLAPretrainingConfig = field(default_factory=MuVLAPretrainingConfig)
