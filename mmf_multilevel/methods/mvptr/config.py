"""MVPTR's model config (``model_config.mvptr``): the typed defaults; ``defaults.yaml`` beside this
file holds the same values with their explanations (a test keeps the two equal)."""
from dataclasses import dataclass, field
from typing import Optional

from mmf_multilevel.methods.config import MethodConfig


@dataclass
class MVPTRPretrainingConfig:
    mcr: bool = True
    wpg: bool = True
    itm_negatives: str = "sampled"
    wpg_negative: str = "hard"
    wpg_aggregation: str = "max"
    wpg_margin: float = 0.2
    vsc_max_logit_scale: Optional[float] = 4.605170185988092
    init_heads_from_bert: bool = True


@dataclass
class MVPTRRetrievalConfig:
    itm_negatives: str = "sampled"
    uni: bool = False
    top_k_texts: int = 128
    top_k_images: int = 64


@dataclass
class MVPTRRefCOCOConfig:
    layer: int = 3
    loss: str = "mse_iou"
    learn_scale: bool = True


@dataclass
class MVPTRConfig(MethodConfig):
    concepts: Optional[str] = None
    num_embeddings: Optional[int] = None
    feature_dim: int = 2048
    img_layer_norm: bool = False
    num_tag_slots: int = 20
    num_answers: int = 3129
    pretraining: MVPTRPretrainingConfig = field(default_factory=MVPTRPretrainingConfig)
    retrieval: MVPTRRetrievalConfig = field(default_factory=MVPTRRetrievalConfig)
    refcoco: MVPTRRefCOCOConfig = field(default_factory=MVPTRRefCOCOConfig)
