"""MVPTR's network: one shared embedding block and three 6-layer encoders in two stages (paper §3).

* **Embeddings** (paper §3.1 "Model Input"): one BERT ``BertEmbeddings`` (word,
  position and token-type tables, LayerNorm, dropout) shared by the text tokens, the phrase concepts
  and the object tags. Its word table has ``num_embeddings >= vocab_size`` rows: the ``vocab_size``
  BERT word-pieces, then the phrase-concept ids of ``id2phrase.json`` (single-word-piece objects reuse
  their BERT id; the others have ids from ``vocab_size`` up). :meth:`MVPTRNetwork.init_concept_embeddings`
  sets every new concept row to the mean of its word-pieces' embeddings (paper §3.1).
* **Stage 1, uni-modal** (paper §3.2): the text encoder runs over ``[CLS] w_1..w_N c_1..c_M [SEP] pad``
  (35 + 5 = 40 slots, token type 0, positions 0..39: the phrases continue the tokens' positions,
  as the official code lays them out) and the visual encoder over ``[CLS] tags [SEP] pad`` (20 slots, token type 1, positions
  0..19) followed by the regions (50 slots). A region is ``Linear([f ; box]) (2048 + 6 -> H)`` then
  dropout: no position, token-type or LayerNorm (``img_layer_norm`` turns an optional LayerNorm on,
  as some released fine-tuning scripts do). The box is ``[x1/W, y1/H, x2/W, y2/H,
  w/W, h/H]`` (:func:`~mmf_multilevel.modules.visual.normalize_boxes` with ``mode="6d"``; the official
  release's 2054-d region feature).
* **Stage 2, cross-modal** (paper §3.3): the multimodal encoder runs over the text outputs (all 40
  slots, [CLS]/[SEP]/pads included) followed by the **region** outputs of the visual encoder only (the
  visual [CLS] and the tags are dropped, so that tags give masked language modelling no shortcut), with
  no new embedding; its attention mask is ``[text mask ; region mask]`` (paper §3.3). BERT's
  pooler (dense + tanh) reads position 0, the text [CLS].
* **VSC projections** (paper §3.3 "Visual Semantic Contrastive Loss"; the projections are
  the official code's, the paper names none): bias-free
  ``H x H`` matrices ``txt_proj`` / ``vis_proj`` (init ``H^-0.5 * randn``) applied to the two [CLS]
  outputs before the L2 norm, and the learnable ``logit_scale`` (init ``ln(1/0.07)``). They live here,
  not with the pre-training heads, because uni-modal retrieval (MVPTR-Uni, paper §4.3 Table 2) uses them too.

Each stage has its own method (:meth:`~MVPTRNetwork.encode_text`, :meth:`~MVPTRNetwork.encode_visual`,
:meth:`~MVPTRNetwork.fuse`) because the losses use the uni-modal outputs alone (VSC, MCR) and the ITM
negatives pair already-encoded texts and images (``fuse`` takes index tensors, nothing is re-encoded).

Storage: ``bert`` is one ``2L``-layer :class:`~mmf_multilevel.modules.text.BertTextEncoder` whose layers
``0..L-1`` are the text encoder and ``L..2L-1`` the multimodal encoder (so a BERT checkpoint maps onto it
key for key), and ``visual_layers`` is the visual encoder, a separate copy of ``L`` layers.
:meth:`MVPTRNetwork.from_bert` fills it from a 12-layer BERT: layers 1-6 into both uni-modal encoders,
7-12 into the multimodal one, the embeddings and pooler shared (paper §4.1).

Parameter count at base size (BERT-base, 86,051 word rows = 30,522 + the official 55,029 new concept
ids): 197,413,633 (``python -m mmf_multilevel.methods.mvptr.network --counts``; README.md here). The
network imports no MMF.
"""
import copy
import math
from typing import Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from mmf_multilevel.modules.attention import use_fast_attention
from mmf_multilevel.modules.heads import init_bert_weights
from mmf_multilevel.modules.text import BertTextEncoder, extended_attention_mask, load_pretrained, mask_compute_dtype
from mmf_multilevel.modules.visual import RegionEmbedding

__all__ = [
    "TEXT_SLOTS",
    "TAG_SLOTS",
    "REGION_SLOTS",
    "REGION_FEATURE_DIM",
    "BOX_DIM",
    "MVPTRNetwork",
    "embedding_rows",
    "base_config",
    "base_counts",
    "parameter_count",
]

TEXT_SLOTS = 35 + 5  # [CLS] tokens phrases [SEP] (paper §4.1: 35 tokens, 5 phrases)
TAG_SLOTS = 20  # [CLS] tag pieces [SEP] (paper §4.1: 20 tags)
REGION_SLOTS = 50
REGION_FEATURE_DIM = 2048
BOX_DIM = 6  # x1/W, y1/H, x2/W, y2/H, w/W, h/H
BERT_VOCAB = 30522
OFFICIAL_CONCEPT_ROWS = 86051  # max id of the official id2phrase_new.json + 1

Phrase = Sequence[str]
ConceptVocabulary = Union[Mapping[Union[int, str], Phrase], Iterable[Tuple[Union[int, str], Phrase]]]


def _concept_items(id2phrase: ConceptVocabulary):
    items = id2phrase.items() if isinstance(id2phrase, Mapping) else id2phrase
    out = []
    for key, phrase in items:
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"id2phrase: concept id {key!r} is not an integer") from None
        if isinstance(phrase, str) or not len(phrase) or not all(isinstance(p, str) and p for p in phrase):
            raise ValueError(f"id2phrase[{key}] must be a non-empty tuple of non-empty strings, got {phrase!r}")
        out.append((index, tuple(phrase)))
    return out


def embedding_rows(id2phrase: ConceptVocabulary, vocab_size: int = BERT_VOCAB) -> int:
    """Rows the shared word table needs: ``max(vocab_size, largest concept id + 1)`` (the
    official ids are not contiguous, so this is not ``vocab_size + len(id2phrase)``)."""
    ids = [index for index, _ in _concept_items(id2phrase)]
    return max([vocab_size] + [i + 1 for i in ids])


def base_config(**overrides) -> BertConfig:
    """BERT-base (uncased) as MVPTR uses it: 12 layers split 6 + 6, hidden 768, 12 heads, FFN 3072."""
    values = dict(vocab_size=BERT_VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    values.update(overrides)
    return BertConfig(**values)


def _tokenizer_fn(tokenizer) -> Callable[[str], Sequence[int]]:
    """Word-piece ids of a string, without special tokens, for a Hugging Face tokenizer, a
    ``tokenizers.Tokenizer`` or a plain callable ``str -> ids``."""
    try:
        from transformers import PreTrainedTokenizerBase

        if isinstance(tokenizer, PreTrainedTokenizerBase):
            return lambda text: tokenizer.encode(text, add_special_tokens=False)
    except ImportError:  # pragma: no cover
        pass
    try:
        from tokenizers import Tokenizer

        if isinstance(tokenizer, Tokenizer):
            return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    except ImportError:  # pragma: no cover
        pass
    if callable(tokenizer):
        return tokenizer
    raise TypeError(
        "tokenizer must be a Hugging Face tokenizer, a tokenizers.Tokenizer or a callable str -> word-piece ids; "
        f"got {type(tokenizer).__name__}"
    )


class MVPTRNetwork(nn.Module):
    """Shared embeddings, text / visual / multimodal encoders, pooler and VSC projections (paper §3).

    ``config``: the BERT config; ``config.vocab_size`` is the word-piece vocabulary (30,522; the MLM and
    MCR decoders predict over it) and ``config.num_hidden_layers`` is ``2 L``: ``L`` layers per encoder.
    ``num_embeddings``: rows of the shared word table (vocabulary + concept rows, see
    :func:`embedding_rows`). ``num_tag_slots``: tag positions in the visual sequence (20), i.e. where its
    regions start. A random build initialises everything as BERT does (the visual layers independently
    of the text layers); use :meth:`from_bert` for the paper's initialisation.
    """

    def __init__(
        self,
        config: BertConfig,
        num_embeddings: Optional[int] = None,
        region_feature_dim: int = REGION_FEATURE_DIM,
        box_dim: int = BOX_DIM,
        img_layer_norm: bool = False,
        num_tag_slots: int = TAG_SLOTS,
    ):
        super().__init__()
        layers = config.num_hidden_layers
        if layers < 2 or layers % 2:
            raise ValueError(
                f"num_hidden_layers must be even (L layers per encoder, 2 L in all: text + multimodal); got {layers}"
            )
        vocab_size = config.vocab_size
        num_embeddings = vocab_size if num_embeddings is None else int(num_embeddings)
        if num_embeddings < vocab_size:
            raise ValueError(
                f"num_embeddings ({num_embeddings}) must be >= vocab_size ({vocab_size}): the word-piece rows come "
                "first, the concept rows after them"
            )
        if num_tag_slots < 1:
            raise ValueError(f"num_tag_slots must be >= 1 (the visual [CLS] is tag slot 0); got {num_tag_slots}")
        self.vocab_size, self.num_embeddings, self.stage_layers = vocab_size, num_embeddings, layers // 2
        self.num_tag_slots = num_tag_slots
        self.region_feature_dim, self.box_dim = region_feature_dim, box_dim
        table_config = BertConfig.from_dict(config.to_dict())
        table_config.vocab_size = num_embeddings
        self.bert = BertTextEncoder(BertModel(table_config, add_pooling_layer=True))
        hidden = config.hidden_size
        self.visual_layers = nn.ModuleList(copy.deepcopy(layer) for layer in self.bert.layers[: self.stage_layers])
        init_bert_weights(self.visual_layers, config.initializer_range)
        self.region_embedding = RegionEmbedding(
            region_feature_dim, hidden, box_dim=box_dim, style="concat", dropout=config.hidden_dropout_prob,
            layer_norm=img_layer_norm, layer_norm_eps=config.layer_norm_eps,
            initializer_range=config.initializer_range,
        )
        self.txt_proj = nn.Parameter(hidden ** -0.5 * torch.randn(hidden, hidden))
        self.vis_proj = nn.Parameter(hidden ** -0.5 * torch.randn(hidden, hidden))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        use_fast_attention(self)

    # ------------------------------------------------------------------ access points
    @property
    def config(self) -> BertConfig:
        """The config of the ``2 L``-layer stack (its ``vocab_size`` is ``num_embeddings``)."""
        return self.bert.config

    @property
    def hidden_size(self) -> int:
        return self.bert.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The shared word table: ``vocab_size`` word-piece rows, then the concept rows."""
        return self.bert.word_embeddings

    @property
    def text_layers(self) -> nn.ModuleList:
        return self.bert.layers[: self.stage_layers]

    @property
    def multimodal_layers(self) -> nn.ModuleList:
        return self.bert.layers[self.stage_layers:]

    # ------------------------------------------------------------------ initialisation
    @classmethod
    def from_bert(
        cls,
        bert: Union[str, BertModel, BertTextEncoder],
        num_embeddings: Optional[int] = None,
        id2phrase: Optional[ConceptVocabulary] = None,
        tokenizer=None,
        **kwargs,
    ) -> "MVPTRNetwork":
        """The paper's initialisation from a ``2 L``-layer BERT (paper §4.1).

        ``bert``: a ``BertModel``, a :class:`BertTextEncoder` or a ``save_pretrained`` directory / hub id.
        Its layers ``1..L`` go into the text **and** (a separate copy) the visual encoder, layers
        ``L+1..2L`` into the multimodal encoder; embeddings (the first ``vocab_size`` word rows) and
        pooler are copied as they are. ``num_embeddings`` defaults to :func:`embedding_rows` of
        ``id2phrase`` when given; with ``tokenizer`` too the concept rows are set by
        :meth:`init_concept_embeddings`, otherwise they keep BERT's random init. ``kwargs`` go to the
        constructor (``region_feature_dim``, ``box_dim``, ``img_layer_norm``, ``num_tag_slots``).
        """
        if isinstance(bert, str):
            bert = load_pretrained(BertModel, bert, add_pooling_layer=True)
        elif isinstance(bert, BertTextEncoder):
            bert = bert.bert
        if not isinstance(bert, BertModel):
            raise TypeError(f"bert must be a path/hub id, a BertModel or a BertTextEncoder; got {type(bert).__name__}")
        if num_embeddings is None and id2phrase is not None:
            num_embeddings = embedding_rows(id2phrase, bert.config.vocab_size)
        net = cls(BertConfig.from_dict(bert.config.to_dict()), num_embeddings, **kwargs)
        net.load_bert(bert)
        if id2phrase is not None and tokenizer is not None:
            net.init_concept_embeddings(id2phrase, tokenizer)
        return net

    def load_bert(self, bert: BertModel) -> None:
        """Copy a BERT's weights in place (see :meth:`from_bert`); its shapes must match this network's."""
        state = dict(bert.state_dict())
        if bert.config.num_hidden_layers != 2 * self.stage_layers:
            raise ValueError(
                f"the BERT has {bert.config.num_hidden_layers} layers; this network needs num_hidden_layers = "
                f"{2 * self.stage_layers} ({self.stage_layers} per encoder)"
            )
        key = "embeddings.word_embeddings.weight"
        words = state[key]
        if words.shape[0] != self.vocab_size:
            raise ValueError(
                f"the BERT's word table has {words.shape[0]} rows; this network's vocab_size is {self.vocab_size}"
            )
        table = self.word_embeddings.weight.detach().clone()
        table[: self.vocab_size] = words
        state[key] = table
        missing, unexpected = self.bert.bert.load_state_dict(state, strict=False)
        if unexpected or any(not name.startswith("pooler.") for name in missing):
            raise ValueError(f"BERT weights do not fit: missing {missing}, unexpected {unexpected}")
        for target, source in zip(self.visual_layers, bert.encoder.layer[: self.stage_layers]):
            target.load_state_dict(source.state_dict())

    @torch.no_grad()
    def init_concept_embeddings(self, id2phrase: ConceptVocabulary, tokenizer) -> int:
        """Set each concept row ``>= vocab_size`` to the mean of the word embeddings of all word-pieces of
        all its elements (relations included: "[man, ride on top of, horse]" averages the pieces of "man",
        "ride on top of" and "horse"; paper §3.1 "Model Input"). Concepts with ids
        below ``vocab_size`` reuse a BERT row and are left alone. Returns the number of rows set."""
        tokenize = _tokenizer_fn(tokenizer)
        table = self.word_embeddings.weight
        done = 0
        for index, phrase in _concept_items(id2phrase):
            if index < self.vocab_size:
                continue
            if index >= self.num_embeddings:
                raise ValueError(
                    f"id2phrase: concept id {index} {list(phrase)} does not fit num_embeddings = {self.num_embeddings} "
                    "(build the network with embedding_rows(id2phrase))"
                )
            pieces = [int(p) for element in phrase for p in tokenize(element)]
            if not pieces or any(p < 0 or p >= self.vocab_size for p in pieces):
                raise ValueError(
                    f"id2phrase[{index}] = {list(phrase)} tokenises to {pieces}; expected word-piece ids in "
                    f"[0, vocab_size = {self.vocab_size})"
                )
            table[index] = table[torch.tensor(pieces, device=table.device)].mean(0)
            done += 1
        return done

    # ------------------------------------------------------------------ computation
    @staticmethod
    def _check_mask(mask: torch.Tensor, ids_or_states: torch.Tensor, name: str) -> torch.Tensor:
        if mask.shape != ids_or_states.shape[:2]:
            raise ValueError(f"{name} must be {tuple(ids_or_states.shape[:2])}; got {tuple(mask.shape)}")
        return mask.long()

    def _run(self, layers: Sequence[nn.Module], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        extended = extended_attention_mask(mask, mask_compute_dtype(hidden))
        for layer in layers:
            hidden = layer(hidden, attention_mask=extended)[0]
        return hidden

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Text encoder (paper §3.2): ``[CLS] w c [SEP] pad`` ids ``(B, T)`` (T = 40 in pre-training) ->
        ``(B, T, H)``. Token types default to 0 and positions to ``0..T-1`` (the official layout)."""
        mask = self._check_mask(attention_mask, input_ids, "attention_mask")
        if input_ids.numel() and int(input_ids.max()) >= self.num_embeddings:
            raise ValueError(f"input_ids hold id {int(input_ids.max())} >= num_embeddings = {self.num_embeddings}")
        embedded = self.bert.embed(input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        return self._run(self.text_layers, embedded, mask)

    def embed_regions(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``Linear([f ; box])`` + dropout (LayerNorm only with ``img_layer_norm``): ``(B, K, D), (B, K, 6) ->
        (B, K, H)``, no position or token-type embedding (paper §3.1: "linearly mapped")."""
        return self.region_embedding(features, boxes)[0]

    def encode_visual(
        self,
        tag_ids: torch.Tensor,
        tag_mask: torch.Tensor,
        region_features: torch.Tensor,
        boxes: torch.Tensor,
        region_mask: torch.Tensor,
        tag_type_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Visual encoder (paper §3.2): ``[CLS] tags [SEP] pad`` ids ``(B, num_tag_slots)`` through the
        shared embeddings (token type 1, positions ``0..num_tag_slots-1``) followed by the embedded regions
        ``(B, K, region_feature_dim)`` with ``boxes (B, K, box_dim)``. Returns ``(states (B, num_tag_slots +
        K, H), mask (B, num_tag_slots + K))``; position 0 is the visual [CLS]."""
        if tag_ids.dim() != 2 or tag_ids.size(1) != self.num_tag_slots:
            raise ValueError(f"tag_ids must be (batch, num_tag_slots = {self.num_tag_slots}); got {tuple(tag_ids.shape)}")
        tag_mask = self._check_mask(tag_mask, tag_ids, "tag_mask")
        region_mask = self._check_mask(region_mask, region_features, "region_mask")
        if region_features.size(0) != tag_ids.size(0):
            raise ValueError(f"tags ({tag_ids.size(0)}) and regions ({region_features.size(0)}) differ in batch size")
        if tag_type_ids is None:
            tag_type_ids = torch.ones_like(tag_ids)
        tags = self.bert.embed(tag_ids, token_type_ids=tag_type_ids)
        regions = self.embed_regions(region_features, boxes).to(tags.dtype)
        mask = torch.cat([tag_mask, region_mask], dim=1)
        return self._run(self.visual_layers, torch.cat([tags, regions], dim=1), mask), mask

    def fuse(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        visual_states: torch.Tensor,
        visual_mask: torch.Tensor,
        text_index: Optional[torch.Tensor] = None,
        image_index: Optional[torch.Tensor] = None,
        num_layers: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multimodal encoder (paper §3.3) over already-encoded uni-modal outputs (its first ``num_layers``
        layers only when given: RefCOCO+ reads an intermediate layer).

        ``text_states (Bt, T, H)`` / ``text_mask (Bt, T)`` from :meth:`encode_text`, ``visual_states (Bv,
        num_tag_slots + K, H)`` / ``visual_mask`` from :meth:`encode_visual`. Pair ``p`` joins text
        ``text_index[p]`` with image ``image_index[p]`` (both ``(P,)``; omitted: ``0..B-1``, the batch's own
        pairs). The joint sequence is ``[text (T) ; regions (K)]`` (visual [CLS] and tags dropped) with mask
        ``[text_mask ; region mask]``; regions start at position ``T``. Returns ``(states (P, T + K, H),
        pooled (P, H): the pooler on position 0, the text [CLS], mask (P, T + K))``.
        """
        text_mask = self._check_mask(text_mask, text_states, "text_mask")
        visual_mask = self._check_mask(visual_mask, visual_states, "visual_mask")
        if visual_states.size(1) <= self.num_tag_slots:
            raise ValueError(
                f"visual_states has {visual_states.size(1)} positions; expected num_tag_slots = {self.num_tag_slots} "
                "tag slots followed by the regions"
            )
        if text_index is None and image_index is None and text_states.size(0) != visual_states.size(0):
            raise ValueError(
                f"{text_states.size(0)} texts and {visual_states.size(0)} images: pass text_index and image_index"
            )
        regions = visual_states[:, self.num_tag_slots:]
        region_mask = visual_mask[:, self.num_tag_slots:]
        if text_index is not None:
            text_states, text_mask = text_states[text_index], text_mask[text_index]
        if image_index is not None:
            regions, region_mask = regions[image_index], region_mask[image_index]
        if text_states.size(0) != regions.size(0):
            raise ValueError(f"text_index gives {text_states.size(0)} pairs, image_index {regions.size(0)}")
        joint = torch.cat([text_states, regions.to(text_states.dtype)], dim=1)
        mask = torch.cat([text_mask, region_mask], dim=1)
        layers = self.multimodal_layers if num_layers is None else self.multimodal_layers[: int(num_layers)]
        states = self._run(layers, joint, mask)
        return states, self.bert.pool(states, 0), mask

    def global_embeddings(
        self, text_states: torch.Tensor, visual_states: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """VSC's L2-normalised global vectors ``g_t = norm(w_cls W_t)``, ``g_v = norm(t_cls W_v)`` from the
        uni-modal outputs (paper §3.3, VSC)."""
        text = text_states[:, 0] @ self.txt_proj.to(text_states.dtype)
        visual = visual_states[:, 0] @ self.vis_proj.to(visual_states.dtype)
        return F.normalize(text.float(), dim=-1), F.normalize(visual.float(), dim=-1)


def parameter_count(module: nn.Module) -> int:
    """Number of distinct parameters (a tied weight counts once: ``parameters()`` yields it once)."""
    return sum(param.numel() for param in module.parameters())


def base_counts(num_embeddings: int = OFFICIAL_CONCEPT_ROWS) -> dict:
    """Parameter counts of the base-size network, built on the meta device (no memory)."""
    with torch.device("meta"):
        net = MVPTRNetwork(base_config(), num_embeddings)
    counts = {
        "network": parameter_count(net),
        "word_table": net.word_embeddings.weight.numel(),
        "text_encoder": parameter_count(net.text_layers),
        "visual_encoder": parameter_count(net.visual_layers),
        "multimodal_encoder": parameter_count(net.multimodal_layers),
        "pooler": parameter_count(net.bert.pooler),
        "region_embedding": parameter_count(net.region_embedding),
    }
    counts["embeddings_other"] = parameter_count(net.bert.embeddings) - counts["word_table"]
    counts["vsc"] = net.txt_proj.numel() + net.vis_proj.numel() + net.logit_scale.numel()
    return counts


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="MVPTR network parameter counts at base size (meta device).")
    parser.add_argument("--counts", action="store_true", help="print the base-size parameter counts")
    parser.add_argument("--num-embeddings", type=int, default=OFFICIAL_CONCEPT_ROWS)
    args = parser.parse_args()
    for name, value in base_counts(args.num_embeddings).items():
        print(f"{name:20s} {value:>13,}")
