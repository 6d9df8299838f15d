"""MVPTR's official-checkpoint converter (mmf_multilevel/methods/mvptr/checkpoints.py).

A tiny checkpoint is built in the official release's exact key layout (``BiBertImgForPreTraining`` of
Junction4Nako/mvp_pytorch: ``bert.{embeddings,txt_encoder,vis_encoder,mul_encoder,pooler,img_embedding,
txt_proj,vis_proj}``, ``cls.predictions`` / ``cls.seq_relationship``, ``half_mlm``, ``logit_scale``,
``qa_head``) from Hugging Face's BERT modules, converted through the command line, loaded into
``mvptr``'s network and heads, and compared with an independent computation of the official forward
pass written here with those Hugging Face modules (three encoders, regions concatenated to tags,
the tags dropped before the multimodal encoder, ITM with 0 = matched).
"""
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertEncoder,
    BertLMPredictionHead,
    BertPooler,
    BertPreTrainingHeads,
)

from mmf_multilevel.methods.mvptr.checkpoints import convert_official_state, main
from mmf_multilevel.methods.mvptr.network import MVPTRNetwork
from mmf_multilevel.methods.mvptr.pretraining import MVPTRPretrainingHeads

WORDS, ROWS, HIDDEN, HALF = 40, 47, 32, 2  # word-pieces, word table rows (with concepts), width, layers/encoder
FEATURE, BOX, TAGS, T, K = 12, 6, 6, 9, 5


def official_config():
    config = BertConfig(vocab_size=ROWS, hidden_size=HIDDEN, num_hidden_layers=2 * HALF, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"  # the plain softmax attention of the release's BERT
    return config


class OfficialModel(nn.Module):
    """The official pre-training model's modules under their release names (built from HF BERT parts)."""

    def __init__(self, img_layer_norm=False):
        super().__init__()
        config = official_config()
        half = official_config()
        half.num_hidden_layers = HALF
        words = official_config()
        words.vocab_size = WORDS  # only_vocab: the decoders predict the word-pieces only
        self.bert = nn.Module()
        self.bert.embeddings = BertEmbeddings(config)
        self.bert.txt_encoder, self.bert.vis_encoder, self.bert.mul_encoder = (BertEncoder(half) for _ in range(3))
        self.bert.pooler = BertPooler(config)
        self.bert.txt_proj = nn.Parameter(torch.randn(HIDDEN, HIDDEN) * HIDDEN ** -0.5)
        self.bert.vis_proj = nn.Parameter(torch.randn(HIDDEN, HIDDEN) * HIDDEN ** -0.5)
        self.bert.img_embedding = nn.Linear(FEATURE + BOX, HIDDEN)
        if img_layer_norm:
            self.bert.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.cls = BertPreTrainingHeads(words)
        self.half_mlm = BertLMPredictionHead(words)
        self.qa_head = nn.Linear(HIDDEN, 7)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        with torch.no_grad():  # non-trivial values everywhere (biases, LayerNorms), decoders tied to the table
            for name, param in self.named_parameters():
                if "LayerNorm" in name or name.endswith(".bias"):
                    param.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
            table = self.bert.embeddings.word_embeddings.weight
            self.cls.predictions.decoder.weight = nn.Parameter(table[:WORDS])
            self.half_mlm.decoder.weight = self.cls.predictions.decoder.weight
        self.eval()

    def state(self):
        state = self.state_dict()
        state.pop("cls.predictions.decoder.bias", None)  # HF ties the decoder bias to predictions.bias
        state.pop("half_mlm.decoder.bias", None)
        return {k: v.clone() for k, v in state.items()}

    @staticmethod
    def _encode(encoder, hidden, mask):
        extended = (1.0 - mask[:, None, None, :].float()) * -10000.0  # the official mask arithmetic
        for layer in encoder.layer:
            hidden = layer(hidden, attention_mask=extended)[0]
        return hidden

    @torch.no_grad()
    def forward(self, text_ids, text_mask, tag_ids, tag_mask, img_feats, region_mask, hard_img):
        """``BiBertImgModel.forward`` + the pre-training heads, with the hard negatives given."""
        bert = self.bert
        a = bert.embeddings(text_ids, token_type_ids=torch.zeros_like(text_ids))
        b = bert.embeddings(tag_ids, token_type_ids=torch.ones_like(tag_ids))
        regions = bert.img_embedding(img_feats)
        if hasattr(bert, "LayerNorm"):
            regions = bert.LayerNorm(regions)
        b = torch.cat([b, regions], 1)
        mask_b = torch.cat([tag_mask, region_mask], 1)
        txt = self._encode(bert.txt_encoder, a, text_mask)
        vis = self._encode(bert.vis_encoder, b, mask_b)
        only_vis, only_mask = vis[:, TAGS:], mask_b[:, TAGS:]
        g_t = nn.functional.normalize(txt[:, 0] @ bert.txt_proj, dim=-1)
        g_v = nn.functional.normalize(vis[:, 0] @ bert.vis_proj, dim=-1)
        joint = self._encode(bert.mul_encoder, torch.cat([txt, only_vis], 1), torch.cat([text_mask, only_mask], 1))
        hard = self._encode(bert.mul_encoder, torch.cat([txt, only_vis[hard_img]], 1),
                            torch.cat([text_mask, only_mask[hard_img]], 1))
        pooled = torch.cat([bert.pooler(joint), bert.pooler(hard)])
        mlm, itm = self.cls(joint[:, :T], pooled)
        return dict(sim=(g_t @ g_v.t()) * self.logit_scale.exp(), itm=itm, mlm=mlm, mcr=self.half_mlm(vis[:, :TAGS]),
                    joint=joint)


class Converted(nn.Module):
    """``mvptr``'s storage: ``backbone`` (the network) and ``heads`` (the pre-training heads)."""

    def __init__(self, img_layer_norm=False):
        super().__init__()
        config = official_config()
        config.vocab_size = WORDS
        self.backbone = MVPTRNetwork(config, ROWS, region_feature_dim=FEATURE, box_dim=BOX,
                                     img_layer_norm=img_layer_norm, num_tag_slots=TAGS)
        self.heads = MVPTRPretrainingHeads(self.backbone)
        self.eval()

    @torch.no_grad()
    def forward(self, text_ids, text_mask, tag_ids, tag_mask, img_feats, region_mask, hard_img):
        net = self.backbone
        text = net.encode_text(text_ids, text_mask)
        visual, visual_mask = net.encode_visual(tag_ids, tag_mask, img_feats[..., :FEATURE], img_feats[..., FEATURE:],
                                                region_mask)
        g_t, g_v = net.global_embeddings(text, visual)
        n = text_ids.size(0)
        states, pooled, _ = net.fuse(text, text_mask, visual, visual_mask,
                                     torch.cat([torch.arange(n), torch.arange(n)]), torch.cat([torch.arange(n), hard_img]))
        return dict(sim=(g_t @ g_v.t()) * net.logit_scale.exp(), itm=self.heads.itm_logits(pooled),
                    mlm=self.heads.mlm_logits(states[:n, :T]), mcr=self.heads.mcr_logits(visual[:, :TAGS]),
                    joint=states[:n])


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 4
    text_ids = torch.randint(5, ROWS, (n, T), generator=g)
    text_mask = torch.ones(n, T, dtype=torch.long)
    text_mask[1, 6:] = 0
    text_mask[3, 4:] = 0
    tag_ids = torch.randint(5, WORDS, (n, TAGS), generator=g)
    tag_mask = torch.ones(n, TAGS, dtype=torch.long)
    tag_mask[2, 3:] = 0
    img_feats = torch.randn(n, K, FEATURE + BOX, generator=g)
    region_mask = torch.ones(n, K, dtype=torch.long)
    region_mask[0, 3:] = 0
    hard_img = torch.tensor([2, 0, 3, 1])
    return text_ids, text_mask, tag_ids, tag_mask, img_feats, region_mask, hard_img


def _valid(out, text_mask):
    return out[text_mask.bool()]


@pytest.mark.parametrize("img_layer_norm", [False, True])
def test_converted_checkpoint_reproduces_the_official_forward(tmp_path, capsys, img_layer_norm):
    torch.manual_seed(0)
    official = OfficialModel(img_layer_norm)
    source, target = tmp_path / "pytorch_model.bin", tmp_path / "mvptr.pth"
    torch.save(official.state(), source)
    assert main(["convert", str(source), str(target)]) == 0
    printed = capsys.readouterr().out
    assert f"model_config.mvptr.num_embeddings={ROWS}" in printed and "qa_head.weight" in printed
    assert f"img_layer_norm={str(img_layer_norm).lower()}" in printed

    ours = Converted(img_layer_norm)
    state = torch.load(target, weights_only=True)["model"]
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert unexpected == []
    # only the tied decoders (the word table itself) may be absent from the file
    assert set(missing) <= {"heads.mlm.decoder.weight", "heads.mcr.decoder.weight"}, missing

    inputs = batch()
    want, got = official(*inputs), ours(*inputs)
    text_mask = inputs[1]
    torch.testing.assert_close(got["sim"], want["sim"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_valid(got["joint"], torch.cat([text_mask, inputs[5]], 1)),
                               _valid(want["joint"], torch.cat([text_mask, inputs[5]], 1)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_valid(got["mlm"], text_mask), _valid(want["mlm"], text_mask), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["mcr"][inputs[3].bool()], want["mcr"][inputs[3].bool()], rtol=1e-4, atol=1e-4)
    # official ITM index 0 = matched; mvptr's index 1 = matched: the same scores, columns swapped
    torch.testing.assert_close(got["itm"], want["itm"].flip(-1), rtol=1e-4, atol=1e-4)
    assert got["itm"][:, 1].ne(got["itm"][:, 0]).all()


def test_decoder_that_differs_from_the_table_is_reported():
    official = OfficialModel()
    state = official.state()
    state["half_mlm.decoder.weight"] = state["half_mlm.decoder.weight"] + 0.5
    _, notes = convert_official_state(state)
    assert any(n.startswith("half_mlm.decoder.weight (differs") and "0.5" in n for n in notes), notes
    assert not any(n.startswith("cls.predictions.decoder.weight") for n in notes)


def test_bad_checkpoints_name_the_key(tmp_path, capsys):
    official = OfficialModel()
    state = official.state()
    del state["bert.img_embedding.weight"]
    with pytest.raises(KeyError, match="bert.img_embedding.weight missing"):
        convert_official_state(state)

    state = official.state()
    state["bert.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="bert.extra_head.weight is not a key"):
        convert_official_state(state)

    state = {k: v for k, v in official.state().items() if not k.startswith("bert.vis_encoder.layer.1.")}
    with pytest.raises(ValueError, match="differ in depth"):
        convert_official_state(state)

    source = tmp_path / "bad.bin"
    torch.save({k: v for k, v in official.state().items() if k != "logit_scale"}, source)
    assert main(["convert", str(source), str(tmp_path / "out.pth")]) == 2
    assert "logit_scale missing" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()
