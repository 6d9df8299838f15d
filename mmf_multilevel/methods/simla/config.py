"""SIMLA's model config (``model_config.simla``): the typed defaults; ``defaults.yaml`` beside this
file holds the same values with their explanations (a test keeps the two equal)."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mmf_multilevel.methods.config import MethodConfig


@dataclass
class SIMLAOptimizationConfig:
    lr: float = 1.0e-4
    weight_decay: float = 0.02
    warmup_lr: float = 1.0e-5
    warmup_updates: int = 2000
    min_lr: float = 1.0e-5
    total_updates: Optional[int] = None


@dataclass
class SIMLAVQAConfig:
    answer_list: Optional[str] = None
    tokenizer: str = "bert-base-uncased"
    max_answer_length: int = 10
    decoder_layers: int = 6
    decoder_from_layer: int = 6
    k_test: int = 128
    count_first_token_twice: bool = False
    dataset_weights: Dict[str, float] = field(default_factory=lambda: {"vgqa_images": 0.5})


@dataclass
class SIMLAConfig(MethodConfig):
    layout: str = "simla"
    fusion_layer: int = 6
    vit: str = "deit_base_patch16_224"
    vit_pretrained: bool = True
    vit_options: Dict[str, Any] = field(default_factory=dict)
    image_size: int = 256
    mask_token_init: str = "zeros"
    embed_dim: int = 256
    image_vocab: int = 8192
    temp: float = 0.07
    temp_range: List[float] = field(default_factory=lambda: [0.001, 0.5])
    momentum: float = 0.995
    queue_size: int = 65536
    alpha: float = 0.4
    alpha_ramp_updates: Optional[int] = None
    mlm: bool = True
    mim: bool = True
    psl: bool = True
    init_mlm_from_bert: bool = True
    mim_masked_patches: int = 75
    mim_min_block: int = 16
    mim_min_aspect: float = 0.3
    dvae_path: Optional[str] = None
    dvae_random_hidden: int = 256
    dvae_random_blocks: int = 2
    pixel_mean: List[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    pixel_std: List[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    psl_k_per_head: int = 4
    psl_num_labels: int = 5
    psl_replicate_official: bool = False
    cls_token_id: int = 101
    sep_token_id: int = 102
    pad_token_id: int = 0
    k_test: int = 256
    gradcam_layer: int = 8
    grounding_box_exponent: float = 0.5
    optimization: SIMLAOptimizationConfig = field(default_factory=SIMLAOptimizationConfig)
    vqa: SIMLAVQAConfig = field(default_factory=SIMLAVQAConfig)
    nlvr2_shared_layers: int = 6
    track_queue_ids: bool = False
