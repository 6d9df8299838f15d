"""``visual_bert_grounding``: MMF's VisualBERT with a per-region scoring head, the reference
model of the RefCOCO+ task until the methods' own grounding heads land.

Everything but the head is rc10's ``visual_bert`` (same configuration keys, checkpoints and
``pretrained_state_mapping``). The head scores each region's last hidden state,
``Linear(H, H) -> GELU -> LayerNorm -> Linear(H, 1)`` (the per-region scorer μ-VLA and UNITER
use), and padding regions get -1e4, so ``scores`` is batch x regions: a softmax
``cross_entropy`` over the proposals trains it (``targets`` = the best proposal) and
``refcoco_accuracy`` evaluates it.
"""
import os

from mmf.common.registry import registry
from mmf.models.visual_bert import VisualBERT

from mmf_multilevel.modules.task_heads import RegionScoringHead


@registry.register_model("visual_bert_grounding")
class VisualBERTGrounding(VisualBERT):
    @classmethod
    def config_path(cls):
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults.yaml")

    def build(self):
        if self.config.training_head_type != "classification":
            raise ValueError(
                "model_config.visual_bert_grounding.training_head_type must be 'classification' (the encoder "
                f"of VisualBERT's classification model is reused), got {self.config.training_head_type!r}"
            )
        super().build()
        bert_config = self.model.bert.config
        self.region_scorer = RegionScoringHead(bert_config.hidden_size, getattr(bert_config, "layer_norm_eps", 1e-12))

    def forward(self, sample_list):
        sample_list = self.update_sample_list_based_on_head(sample_list)
        sample_list = self.add_custom_params(sample_list)
        sample_list = self.flatten_for_bert(sample_list)
        sequence, _, _ = self.model.bert(
            sample_list.input_ids,
            sample_list.attention_mask,
            sample_list.token_type_ids,
            sample_list.visual_embeddings,
            sample_list.position_embeddings_visual,
            sample_list.visual_embeddings_type,
            sample_list.image_text_alignment,
        )
        text_length = sample_list.input_ids.size(1)
        regions = sequence[:, text_length:]
        return {"scores": self.region_scorer(regions, sample_list.image_mask)}
