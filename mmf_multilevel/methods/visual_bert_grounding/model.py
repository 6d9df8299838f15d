"""The registered MMF model ``visual_bert_grounding``: MMF's VisualBERT encoder with a per-region
scoring head on the adapter base, the reference model of the RefCOCO+ task.

* ``backbone``: rc10's ``VisualBERTBase`` (``mmf.models.visual_bert``), built as MMF's ``visual_bert``
  builds it (same configuration keys: ``bert_model_name``, ``visual_embedding_dim``,
  ``special_visual_initialize``, ``freeze_base``, ...). Its input is ``[text ; regions]``: the
  text's ids, segments and mask, the raw region features (projected inside VisualBERT's embedding,
  no boxes in the ``plain`` strategy), visual token type 0 for every region, and the region mask.
* ``classifier``: :class:`~mmf_multilevel.modules.task_heads.RegionScoringHead`,
  ``Linear(H, H) -> GELU -> LayerNorm -> Linear(H, 1)`` on each region's last hidden state (the
  per-region scorer μ-VLA and UNITER use); padding regions get -1e4, so ``scores`` is batch x
  regions: a softmax ``cross_entropy`` over the proposals trains it (``targets`` = the best
  proposal) and ``refcoco_accuracy`` evaluates it.

``training_head_type: classification`` is the one head type (the name VisualBERT's configs use for
its fine-tuning encoder). Checkpoints written when this model was a subclass of MMF's ``VisualBERT``
(``model.bert.*``, ``region_scorer.*`` and VisualBERT's unused ``model.classifier.*``) load through
:attr:`VisualBERTGrounding.state_key_map`, which also translates ``pretrained_state_mapping:
{model.bert: model.bert}`` from MMF's ``visual_bert`` pre-trained checkpoints.
"""
import os
from dataclasses import asdict

import torch
from mmf.models.visual_bert import VisualBERTBase
from mmf.utils.configuration import get_mmf_cache_dir
from mmf.utils.modeling import get_bert_configured_parameters
from transformers import BertConfig

from mmf_multilevel.methods.base import MethodModel, register_method
from mmf_multilevel.methods.batch import region_inputs, text_inputs
from mmf_multilevel.methods.visual_bert_grounding.config import VisualBERTGroundingConfig
from mmf_multilevel.modules.task_heads import RegionScoringHead

#: VisualBERT options rc10's ``VisualBERTBase`` accepts but cannot run with under today's transformers
#: (they failed the same way in MMF's own ``visual_bert`` and in this model before the adapter base)
UNSUPPORTED = {
    "output_attentions": "transformers' BertConfig refuses it with its default sdpa attention",
    "bypass_transformer": "VisualBERTBase passes the additional BertLayer's output tuple to the pooler",
}


@register_method
class VisualBERTGrounding(MethodModel):
    """The registered MMF model ``visual_bert_grounding`` (see the module docstring and
    ``defaults.yaml`` beside it)."""

    name = "visual_bert_grounding"
    config_class = VisualBERTGroundingConfig
    head_types = ("classification",)
    state_key_map = (
        ("model.bert.", "backbone."),  # MMF's VisualBERT layout (this model before the adapter base)
        ("region_scorer.", "classifier."),
        ("model.classifier.", None),  # VisualBERT's pooled-output classifier, built but never used
        ("bert.bert.", "backbone."),  # the original VisualBERT code's layout (VisualBERT.format_state_key)
        ("bert.classifier.", None),
    )

    # ------------------------------------------------------------------ build
    def build_backbone(self):
        """rc10's ``VisualBERTBase`` as ``VisualBERTForClassification`` and ``VisualBERT.build`` make it."""
        s = self.settings
        for key in UNSUPPORTED:
            if getattr(s, key):
                raise ValueError(f"model_config.{self.name}.{key}: true is not supported: {UNSUPPORTED[key]}")
        bert_config = BertConfig.from_dict(asdict(s))
        options = dict(visual_embedding_dim=s.visual_embedding_dim, embedding_strategy=s.embedding_strategy,
                       bypass_transformer=s.bypass_transformer, output_attentions=s.output_attentions,
                       output_hidden_states=s.output_hidden_states)
        if s.bert_model_name is None:
            backbone = VisualBERTBase(bert_config, **options)
            if not s.random_initialize:
                backbone.init_weights()
        else:
            backbone = VisualBERTBase.from_pretrained(
                str(s.bert_model_name), config=bert_config,
                cache_dir=os.path.join(get_mmf_cache_dir(), "distributed_-1"), **options,
            )
        if s.special_visual_initialize:
            backbone.embeddings.initialize_visual_from_pretrained()
        if s.freeze_base:
            for parameter in backbone.parameters():
                parameter.requires_grad = False
        return backbone

    def build_head(self, head_type):
        bert = self.backbone.config
        self.classifier = RegionScoringHead(bert.hidden_size, bert.layer_norm_eps, bert.initializer_range)

    def get_optimizer_parameters(self, config):
        """VisualBERT's parameter groups (``get_optimizer_parameters_for_bert``): no weight decay on
        biases and LayerNorms; the encoder at ``lr x finetune_lr_multiplier``, the region scorer at ``lr``."""
        lr = config.optimizer.params.lr
        parameters = get_bert_configured_parameters(self.backbone, lr * self.settings.finetune_lr_multiplier)
        return parameters + get_bert_configured_parameters(self.classifier, lr)

    # ------------------------------------------------------------------ forward
    def encode(self, sample_list, side=None):
        text = text_inputs(sample_list, self.name)
        # the boxes stay unused: VisualBERT's plain embedding has no box input
        regions = region_inputs(sample_list, self.name, self.settings.visual_embedding_dim, "4d", side)
        region_mask = regions.mask.to(text.mask.dtype)
        outputs = self.backbone(
            text.input_ids,
            torch.cat([text.mask, region_mask], dim=-1),
            text.segment_ids,
            visual_embeddings=regions.features,
            visual_embeddings_type=torch.zeros_like(regions.mask, dtype=torch.long),
        )
        sequence, pooled = outputs[0], outputs[1]
        length = text.input_ids.size(1)
        return {"sequence": sequence, "pooled": pooled, "text": sequence[:, :length], "regions": sequence[:, length:],
                "region_mask": regions.mask}

    def task_forward(self, sample_list):
        out = self.encode(sample_list)
        output = {"scores": self.classifier(out["regions"], out["region_mask"])}
        if self.settings.output_hidden_states:  # as VisualBERT's classification model reports them
            output["sequence_output"], output["pooled_output"] = out["sequence"], out["pooled"]
        return output
