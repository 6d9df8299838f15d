"""SOHO's model config (``model_config.soho``): the typed defaults; ``defaults.yaml`` beside this
file holds the same values with their explanations (a test keeps the two equal)."""
from dataclasses import dataclass, field
from typing import List, Optional

from mmf_multilevel.methods.config import MethodConfig


@dataclass
class SOHOPretrainingConfig:
    init_mlm_from_bert: bool = True
    mvm_mode: str = "ratio"
    mvm_mask_ratio: float = 0.15
    mvm_max_ratio: float = 0.5
    itm_separate_pass: bool = True


@dataclass
class SOHOOptimizationConfig:
    cnn_lr: float = 1.0e-2
    cnn_momentum: float = 0.9
    cnn_weight_decay: float = 5.0e-4
    lr: float = 1.0e-4
    weight_decay: float = 1.0e-2
    lr_steps: List[int] = field(default_factory=list)
    lr_ratio: float = 0.1


@dataclass
class SOHOConfig(MethodConfig):
    bert_num_layers: Optional[int] = None
    backbone: str = "resnet101"
    backbone_pretrained: bool = True
    frozen_batch_norm: bool = True
    pool_before_conv: bool = False
    channels_last: bool = True
    visual_token_type: bool = True
    vd_size: int = 2048
    vd_momentum: float = 0.99
    vd_init: str = "feature_statistics"
    use_vd: bool = True
    use_vd_in_finetune: bool = False
    freeze_resnet_epochs: int = 10
    freeze_resnet_updates: Optional[int] = None
    mask_token_id: int = 103
    num_answers: int = 3129
    retrieval_in_batch: bool = False
    pretraining: SOHOPretrainingConfig = field(default_factory=SOHOPretrainingConfig)
    optimization: SOHOOptimizationConfig = field(default_factory=SOHOOptimizationConfig)
