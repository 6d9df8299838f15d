"""VisualBERT weights (MMF's visual_bert, HF transformers' VisualBertModel) converted into the μ-VLA
backbone give the source model's hidden states on the same input."""
import mmf  # noqa: F401  (applies the compatibility layer)
import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, VisualBertConfig, VisualBertModel

from mmf_multilevel.methods.muvla.checkpoints import convert_visual_bert_state, load_visual_bert
from mmf_multilevel.methods.muvla.model import MuVLA
from mmf_multilevel.methods.muvla.network import MuVLANetwork
from mmf_multilevel.modules.text import BertTextEncoder

SIZES = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FEAT, B, T, N = 24, 3, 7, 5


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    feats = torch.randn(B, N, FEAT, generator=g)
    rmask = torch.ones(B, N, dtype=torch.long)
    rmask[2, 3:] = 0
    return ids, mask, feats, rmask


def ours():
    torch.manual_seed(9)
    return MuVLANetwork(BertTextEncoder.from_config(BertConfig(**SIZES)), FEAT, "visual_bert").eval()


def test_hf_visual_bert_converts_to_the_same_hidden_states():
    torch.manual_seed(1)
    source = VisualBertModel(VisualBertConfig(visual_embedding_dim=FEAT, **SIZES)).eval()
    net = ours()
    load_visual_bert(net, source.state_dict())
    ids, mask, feats, rmask = inputs()
    with torch.no_grad():
        ref = source(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), visual_embeds=feats,
                     visual_attention_mask=rmask, visual_token_type_ids=torch.ones(B, N, dtype=torch.long))
        out = net(ids, mask, feats, torch.zeros(B, N, 5), rmask)
    torch.testing.assert_close(out["sequence"], ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pooled"], ref.pooler_output, atol=1e-5, rtol=0)


def mmf_visual_bert():
    from mmf.models.visual_bert import VisualBERTBase
    from transformers import BertConfig as Config

    torch.manual_seed(2)
    return VisualBERTBase(Config(**SIZES), visual_embedding_dim=FEAT).eval()


def test_mmf_visual_bert_checkpoint_converts_to_the_same_hidden_states(tmp_path):
    source = mmf_visual_bert()
    ids, mask, feats, rmask = inputs()
    with torch.no_grad():
        sequence, pooled = source(ids, torch.cat([mask, rmask], 1), torch.zeros_like(ids), feats,
                                  visual_embeddings_type=torch.ones(B, N, dtype=torch.long))[:2]
    # as an MMF model checkpoint stores it (VisualBERT.model.bert.*, with heads beside it)
    state = {f"model.bert.{k}": v for k, v in source.state_dict().items()}
    state["model.classifier.1.weight"] = torch.zeros(3, 3)
    converted = convert_visual_bert_state(state)
    assert "regions.proj.weight" in converted and not any("classifier" in k for k in converted)
    net = ours()
    load_visual_bert(net, state)
    with torch.no_grad():
        out = net(ids, mask, feats, torch.zeros(B, N, 5), rmask)
    torch.testing.assert_close(out["sequence"], sequence, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pooled"], pooled, atol=1e-5, rtol=0)

    # the registered model loads the file through model_config.muvla.visual_bert_checkpoint
    path = tmp_path / "visual_bert.pth"
    torch.save({"model": state}, path)
    base = OmegaConf.load(MuVLA.config_path()).model_config.muvla
    config = OmegaConf.merge(base, dict(bert_model_name=None, embedding_style="visual_bert", feature_dim=FEAT,
                                        visual_bert_checkpoint=str(path), training_head_type="refcoco", **SIZES))
    model = MuVLA(config)
    model.build()
    torch.testing.assert_close(model.backbone.regions.proj.weight, source.embeddings.projection.weight)


def test_visual_bert_weights_need_the_visual_bert_embedding_style_and_matching_sizes():
    source = mmf_visual_bert()
    state = {f"model.bert.{k}": v for k, v in source.state_dict().items()}
    torch.manual_seed(0)
    paper = MuVLANetwork(BertTextEncoder.from_config(BertConfig(**SIZES)), FEAT, "paper")
    with pytest.raises(ValueError, match="embedding_style: visual_bert"):
        load_visual_bert(paper, state)
    wider = MuVLANetwork(BertTextEncoder.from_config(BertConfig(**SIZES)), FEAT + 1, "visual_bert")
    with pytest.raises(ValueError, match="regions.proj.weight"):
        load_visual_bert(wider, state)
    with pytest.raises(KeyError, match="not a VisualBERT state dict"):
        convert_visual_bert_state({"foo": torch.zeros(1)})
