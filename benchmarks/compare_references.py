"""The reference models of ``compare.py``: each method's rows are divided by its ``REFERENCE``'s, measured in
the same run. Each reference has the shape of a method's benchmark adapter (``methods/benchmarking.py``) plus
``train_model(size, batch)`` -> ``(model, loss_fn, samples)`` and ``inference_model(size)`` ->
``(model, answer(question, visual))``.

* ``visual_bert``: HF transformers' ``VisualBertForPreTraining`` (MLM + sentence-image matching) /
  ``VisualBertForQuestionAnswering`` (3,129 answers), BERT-base over 20 tokens + 100 regions;
* ``lxmert``: HF transformers' ``LxmertForPreTraining`` (9 language / 5 vision / 5 cross-modality layers; MLM,
  object feature and label losses, matching) / ``LxmertForQuestionAnswering``;
* ``albef``: the registered ``simla`` model with ``layout: albef`` (``methods/simla/benchmark.py``).
"""
import torch

from mmf_multilevel.methods import benchmarking as bm
from mmf_multilevel.methods.simla import benchmark as simla

ANSWERS = 3129
DIMS = {
    "base": dict(hidden=768, intermediate=3072, layers=12, heads=12, vocab=30522, features=2048, tokens=20, regions=100,
                 question=16, answers=ANSWERS, language=9, vision=5, cross=5, classes=1600),
    "tiny": dict(hidden=32, intermediate=64, layers=2, heads=4, vocab=40, features=16, tokens=8, regions=5, question=16,
                 answers=5, language=1, vision=1, cross=1, classes=4),
}


class Reference:
    INPUT = "regions"
    MODES = ("",)
    REFERENCE = None

    def __init__(self, name):
        self.name = name

    def describe_batch(self, size, batch):
        d = DIMS[size]
        return f"{batch} x ({d['tokens']} tokens + {d['regions']} regions)"

    def inputs(self, size, batch, seed=0):
        d = DIMS[size]
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, d["vocab"], (batch, d["tokens"]), generator=g)
        masked, labels = bm.lm_labels(ids, g, mask_id=4 if size == "tiny" else 103, ignore=-100)
        features = torch.rand(batch, d["regions"], d["features"], generator=g)
        xy = torch.rand(batch, d["regions"], 2, generator=g) * 0.5
        boxes = torch.cat([xy, xy + torch.rand(batch, d["regions"], 2, generator=g) * 0.5], -1)
        return masked, labels, features, boxes, g


class VisualBERT(Reference):
    def _config(self, size):
        from transformers import VisualBertConfig

        d = DIMS[size]
        return VisualBertConfig(visual_embedding_dim=d["features"], num_hidden_layers=d["layers"], hidden_size=d["hidden"],
                                num_attention_heads=d["heads"], intermediate_size=d["intermediate"],
                                vocab_size=d["vocab"], num_labels=d["answers"])

    def train_model(self, size, batch):
        from transformers import VisualBertForPreTraining

        torch.manual_seed(0)
        model = VisualBertForPreTraining(self._config(size))
        ids, labels, features, _, g = self.inputs(size, batch)
        N = features.size(1)
        full = torch.cat([labels, torch.full((batch, N), -100, dtype=torch.long)], 1)
        matched = torch.randint(0, 2, (batch,), generator=g)

        def loss_fn():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                         visual_embeds=features, visual_attention_mask=torch.ones(batch, N, dtype=torch.long),
                         visual_token_type_ids=torch.ones(batch, N, dtype=torch.long), labels=full,
                         sentence_image_labels=matched).loss
        return model, loss_fn, batch

    def inference_model(self, size):
        from transformers import VisualBertForQuestionAnswering

        torch.manual_seed(0)
        model = VisualBertForQuestionAnswering(self._config(size)).eval()

        def answer(question, visual):
            feats = visual["features"][None, :, : DIMS[size]["features"]].float()
            n = feats.size(1)
            return model(input_ids=question, attention_mask=torch.ones_like(question),
                         token_type_ids=torch.zeros_like(question), visual_embeds=feats,
                         visual_attention_mask=torch.ones(1, n, dtype=torch.long),
                         visual_token_type_ids=torch.ones(1, n, dtype=torch.long)).logits
        return model, answer

    def flops(self, size, mode=""):
        d = DIMS[size]
        H, I, L, V = d["hidden"], d["intermediate"], d["layers"], d["vocab"]
        n = d["regions"]
        visual = 2 * n * d["features"] * H
        # HF's MLM head scores every position of [text ; regions]
        train = 3 * (L * bm.bert_layer(d["tokens"] + n, H, I) + visual + bm.mlm_decoder(d["tokens"] + n, H, V))
        inference = L * bm.bert_layer(d["question"] + n, H, I) + visual + 2 * (H * H + H * d["answers"])
        return {"train": train, "inference": inference}


class LXMERT(Reference):
    def _config(self, size, **extra):
        from transformers import LxmertConfig

        d = DIMS[size]
        return LxmertConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], num_attention_heads=d["heads"],
                            intermediate_size=d["intermediate"], l_layers=d["language"], x_layers=d["cross"],
                            r_layers=d["vision"], visual_feat_dim=d["features"], num_object_labels=d["classes"],
                            num_qa_labels=d["answers"], **extra)

    def train_model(self, size, batch):
        from transformers import LxmertForPreTraining

        torch.manual_seed(0)
        d = DIMS[size]
        model = LxmertForPreTraining(self._config(size, num_attr_labels=4, task_qa=False, visual_attr_loss=False,
                                                  visual_obj_loss=True, visual_feat_loss=True))
        ids, labels, features, boxes, g = self.inputs(size, batch)
        selected = torch.rand(batch, d["regions"], generator=g) < 0.15
        targets = {"obj": (torch.randint(0, d["classes"], (batch, d["regions"]), generator=g),
                           torch.ones(batch, d["regions"])), "feat": (features, selected.float())}
        matched = torch.randint(0, 2, (batch,), generator=g)

        def loss_fn():
            inputs = features.masked_fill(selected.unsqueeze(-1), 0.0)
            return model(input_ids=ids, visual_feats=inputs, visual_pos=boxes, attention_mask=torch.ones_like(ids),
                         labels=labels, obj_labels=targets, matched_label=matched).loss
        return model, loss_fn, batch

    def inference_model(self, size):
        from transformers import LxmertForQuestionAnswering

        torch.manual_seed(0)
        model = LxmertForQuestionAnswering(self._config(size)).eval()

        def answer(question, visual):
            scale = torch.tensor([visual["width"], visual["height"]] * 2, dtype=torch.float)
            return model(input_ids=question, attention_mask=torch.ones_like(question),
                         visual_feats=visual["features"][None, :, : DIMS[size]["features"]].float(),
                         visual_pos=(visual["boxes"].float() / scale)[None]).question_answering_score
        return model, answer

    def flops(self, size, mode=""):
        d = DIMS[size]
        H, I = d["hidden"], d["intermediate"]

        def forward(t, n, scored_t, scored_n):
            cross = d["cross"] * (bm.cross_attention(t, n, H) + bm.cross_attention(n, t, H)
                                  + bm.bert_layer(t, H, I) + bm.bert_layer(n, H, I))
            core = d["language"] * bm.bert_layer(t, H, I) + d["vision"] * bm.bert_layer(n, H, I) + cross \
                + 2 * n * (d["features"] + 4) * H
            heads = bm.mlm_decoder(scored_t, H, d["vocab"]) \
                + 2 * scored_n * (2 * H * H + H * d["features"] + H * d["classes"])
            return core + heads

        n = d["regions"]
        return {"train": 3 * forward(d["tokens"], n, d["tokens"], n),  # LXMERT scores every position
                "inference": forward(d["question"], n, 0, 0) + bm.vqa_head(H, d["answers"])}


class ALBEF(Reference):
    """The registered ``simla`` model with ``layout: albef`` (and no MIM / PSL: ALBEF's losses)."""
    INPUT = "pixels"

    def describe_batch(self, size, batch):
        return simla.describe_batch(size, batch)

    def _config(self, size, head_type):
        return dict(simla.model_config(size, "", head_type, layout="albef"), mim=False, psl=False)

    def train_model(self, size, batch):
        model = bm.build("simla", self._config(size, "pretraining"))
        sample_list = simla.train_batch(size, batch, "")

        def loss_fn():
            return sum(model(sample_list)["losses"].values())
        return model, loss_fn, int(sample_list.input_ids.size(0))

    def inference_model(self, size):
        model = bm.build("simla", self._config(size, simla.INFERENCE_HEAD)).eval()

        def answer(question, pixels):
            return model.forward(simla.inference_batch(size, question, pixels))["scores"]
        return model, answer

    def inference_image(self, size):
        return simla.inference_image(size)

    def flops(self, size, mode=""):
        return simla.flops(size, mode, layout="albef")


REFERENCES = {"visual_bert": VisualBERT("visual_bert"), "lxmert": LXMERT("lxmert"), "albef": ALBEF("albef")}
