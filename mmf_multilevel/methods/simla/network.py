"""SIMLA's text / multimodal encoder: one BERT run in two roles (paper §2.1, §2.3, §2.5;
the official ``models/med.py`` and ``models/simla/pretrain.py``).

:class:`SIMLATextEncoder` (a plain ``nn.Module``, no MMF) is the paper's E_l = E_mm: one 12-layer BERT
whose every layer is self-attention -> cross-attention -> FFN (paper §2.5: "the weights and
architecture of BERT, with cross-attention"; the official ``shared_bert.json`` sets ``add_cross_attention``).
The same module instances serve every role:

* :meth:`~SIMLATextEncoder.encode_text` - the unimodal text encoder (``mode="text"`` in the official
  code): word + position embeddings, then every layer with its cross-attention **skipped**;
* :meth:`~SIMLATextEncoder.fuse` - the multimodal encoder (``mode="multimodal"``): the raw caption
  embeddings go through all 12 layers again, each layer's cross-attention reading the image tokens
  (queries = text, keys/values = image); it does not start from the text encoder's output (the official
  ITM, MLM and PSL passes call ``text_encoder.bert(input_ids, ..., mode="multimodal")``);
* :meth:`~SIMLATextEncoder.reconstruct_image` - the MIM direction of XMM (paper §2.3; appendix §1.2, item 3):
  the (masked) image tokens are the queries. They pass BERT's embedding module (BERT position
  embeddings 0..N and its LayerNorm are applied to them), self-attend among themselves and
  cross-attend to the caption's **embedding-layer** output (not contextualised).

**Layouts** (``layout``; ``model_config.simla.layout``). ``"simla"`` (above; paper §2.1: one stream, every layer
with cross-attention). ``"albef"``: ALBEF's separate encoders on the same code, the baseline SIMLA is compared
with (paper §3; appendix §1.2 "ALBEF vs. SIMLA": no weight sharing, 6 fusion layers instead of 12): layers ``0..fusion_layer-1`` are the text
encoder and have **no** cross-attention module (not built, not counted, not in the state dict); layers
``fusion_layer..L-1`` carry one and form the fusion encoder (ALBEF's ``configs/config_bert.json``:
``fusion_layer: 6`` of 12). :meth:`~SIMLATextEncoder.encode_text` runs the text layers only (ALBEF's
``mode="text"``); :meth:`~SIMLATextEncoder.fuse` runs the caption through the text layers and then the fusion
layers (ALBEF's ``mode="multi_modal"`` from ids, as its MLM does), or, given the text encoder's output
(``text_states``), the fusion layers alone from it (ALBEF's ``mode="fusion"`` on ``encoder_embeds``, as its ITM
does). MIM (:meth:`~SIMLATextEncoder.reconstruct_image`) has no ALBEF counterpart and is refused.

The cross-attention blocks are HF ``BertAttention`` modules (query/key/value, output dense, residual and
LayerNorm), as in SemVLP's network; they are randomly initialised (BERT checkpoints hold no cross-attention
weights; the official ``BertForMaskedLM.from_pretrained`` leaves them new too). Their key/value input width
is the hidden size, which must equal the ViT width (768 at base size; the official
``encoder_width``). The embeddings are word + absolute position + LayerNorm + dropout: the official
``med.py`` has no token-type table, so BERT's is removed (it is not loaded, not counted, not run).

``python -m mmf_multilevel.methods.simla.network --counts`` prints the exact base-size parameter
counts (built on the meta device, nothing downloaded); see the method README for how they relate to the
paper's 223M.
"""
import argparse
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertAttention

from mmf_multilevel.modules.attention import use_fast_attention
from mmf_multilevel.modules.heads import init_bert_weights
from mmf_multilevel.modules.text import BertTextEncoder, extended_attention_mask, load_pretrained, mask_compute_dtype

__all__ = ["TEXT", "MULTIMODAL", "SIMLA_LAYOUT", "ALBEF_LAYOUT", "LAYOUTS", "ALBEF_FUSION_LAYER", "SIMLATextEncoder",
           "base_bert_config", "parameter_counts", "main"]

TEXT, MULTIMODAL = "text", "multimodal"
MODES = (TEXT, MULTIMODAL)
#: ``model_config.simla.layout``: SIMLA's shared stream or ALBEF's text (``fusion_layer`` layers) + fusion encoders
SIMLA_LAYOUT, ALBEF_LAYOUT = "simla", "albef"
LAYOUTS = (SIMLA_LAYOUT, ALBEF_LAYOUT)
#: ALBEF's ``configs/config_bert.json``: the first 6 of 12 layers are the text encoder
ALBEF_FUSION_LAYER = 6


def base_bert_config(**overrides) -> BertConfig:
    """``bert-base-uncased``'s architecture (the official ``configs/shared_bert.json``: 12 layers, 768, 12 heads,
    FFN 3072, 30,522 words)."""
    fields = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    fields.update(overrides)
    return BertConfig(**fields)


class SIMLATextEncoder(nn.Module):
    """One BERT with a cross-attention block after the self-attention of every layer (paper §2.1), or, with
    ``layout="albef"``, of the layers from ``fusion_layer`` on (ALBEF's text + fusion encoders).

    ``text``: a :class:`BertTextEncoder` built without a pooler (the official ``BertForMaskedLM`` has
    none); its token-type table is removed here. ``encoder_width``: the width of the image tokens the
    cross-attention reads (the ViT's ``embed_dim``); it must equal the BERT hidden size. ``fusion_layer``:
    the ALBEF layout's first fusion layer (default 6, ALBEF's), in ``1..L-1``; unused by the SIMLA layout.
    ``cross_attention`` is keyed by the layer index (``"0"``..``"11"`` for SIMLA, ``"6"``..``"11"`` for ALBEF).
    """

    def __init__(self, text: BertTextEncoder, encoder_width: Optional[int] = None, layout: str = SIMLA_LAYOUT,
                 fusion_layer: Optional[int] = None):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"model_config.simla.layout: {layout!r}; expected one of {list(LAYOUTS)} (simla: one "
                             "stream with cross-attention in every layer; albef: text layers, then fusion layers)")
        if text.pooler is not None:
            raise ValueError("SIMLATextEncoder: the BERT must be built without its pooler (add_pooling_layer=False); "
                             "SIMLA's heads read the [CLS] state directly")
        config = text.config
        if encoder_width is not None and int(encoder_width) != config.hidden_size:
            raise ValueError(f"model_config.simla.encoder_width: the cross-attention reads image tokens of width "
                             f"{encoder_width}, expected the BERT hidden size {config.hidden_size} (ViT-B/16 and "
                             "BERT-base are both 768)")
        embeddings = text.bert.embeddings
        if hasattr(embeddings, "token_type_embeddings"):
            del embeddings.token_type_embeddings  # the official med.py embeddings have no token types
        self.text = text
        self.num_layers = config.num_hidden_layers
        self.layout = layout
        if layout == ALBEF_LAYOUT:
            fusion_layer = ALBEF_FUSION_LAYER if fusion_layer is None else fusion_layer
            if isinstance(fusion_layer, bool) or int(fusion_layer) != fusion_layer or not (
                    1 <= int(fusion_layer) < self.num_layers):
                raise ValueError(f"model_config.simla.fusion_layer: {fusion_layer!r}; the ALBEF layout needs an integer "
                                 f"in 1..{self.num_layers - 1} (text layers 0..fusion_layer-1, fusion layers "
                                 f"fusion_layer..{self.num_layers - 1}; ALBEF's is 6 of 12)")
            self.fusion_layer = int(fusion_layer)
        else:
            self.fusion_layer = 0  # every layer is a text layer and a fusion layer
        self.cross_attention = nn.ModuleDict({str(i): BertAttention(config) for i in self.fusion_layers})
        init_bert_weights(self.cross_attention, config.initializer_range)
        use_fast_attention(self.cross_attention)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: BertConfig, layout: str = SIMLA_LAYOUT,
                    fusion_layer: Optional[int] = None) -> "SIMLATextEncoder":
        """Random initialisation (BERT's own init for the BERT part and the cross-attention)."""
        return cls(BertTextEncoder.from_config(config, add_pooling_layer=False), layout=layout,
                   fusion_layer=fusion_layer)

    @classmethod
    def from_bert(cls, name_or_path: str, layout: str = SIMLA_LAYOUT, fusion_layer: Optional[int] = None,
                  **overrides) -> "SIMLATextEncoder":
        """BERT weights (hub id or ``save_pretrained`` directory) into the embeddings, self-attention and FFN
        of every layer; the cross-attention blocks stay newly initialised (paper §2.5; ALBEF initialises its
        fusion layers from BERT's upper 6 layers the same way)."""
        bert = load_pretrained(BertModel, name_or_path, add_pooling_layer=False, **overrides)
        return cls(BertTextEncoder(bert), layout=layout, fusion_layer=fusion_layer)

    # ------------------------------------------------------------------ structure
    @property
    def config(self) -> BertConfig:
        return self.text.config

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.text.word_embeddings

    @property
    def blocks(self) -> nn.ModuleList:
        """The 12 shared ``BertLayer`` blocks (self-attention ``attention``, FFN ``intermediate``/``output``)."""
        return self.text.layers

    @property
    def text_layers(self) -> range:
        """The layers of the text encoder (:meth:`encode_text`): all (SIMLA), ``0..fusion_layer-1`` (ALBEF)."""
        return range(self.num_layers) if self.layout == SIMLA_LAYOUT else range(self.fusion_layer)

    @property
    def fusion_layers(self) -> range:
        """The layers with cross-attention: all (SIMLA), ``fusion_layer..L-1`` (ALBEF)."""
        return range(self.fusion_layer, self.num_layers)

    def mode_parameters(self, mode: str) -> List[nn.Parameter]:
        """The parameters a pass in ``mode`` uses: ``"text"`` the embeddings and the text layers without
        cross-attention, ``"multimodal"`` all."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if mode == MULTIMODAL:
            return list(self.parameters())
        skipped = {id(p) for p in self.cross_attention.parameters()}
        skipped |= {id(p) for i in range(self.num_layers) if i not in self.text_layers
                    for p in self.blocks[i].parameters()}
        return [p for p in self.parameters() if id(p) not in skipped]

    # ------------------------------------------------------------------ embeddings
    def embed(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
        """Word (or given input) embeddings + absolute positions 0..S-1, LayerNorm, dropout (``med.py``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        emb = self.text.embeddings
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
            inputs_embeds = emb.word_embeddings(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != self.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, seq, {self.hidden_size}); got {tuple(inputs_embeds.shape)}")
        length = inputs_embeds.size(1)
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(length, device=inputs_embeds.device)
        hidden = inputs_embeds + emb.position_embeddings(positions).unsqueeze(0)
        return emb.dropout(emb.LayerNorm(hidden))

    # ------------------------------------------------------------------ the stack
    def run_block(self, index: int, hidden: torch.Tensor, extended_mask: torch.Tensor,
                  memory: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None,
                  output_attentions: bool = False, output_cross_attentions: bool = False
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Layer ``index``: FFN(self-attention(x)), or FFN(cross-attention(self-attention(x), memory)) when
        ``memory`` is given and the layer has a cross-attention (every layer in the SIMLA layout, the fusion
        layers in the ALBEF layout). Returns the output and, when asked, the self-attention probabilities and the
        cross-attention probabilities ``(B, heads, S, M)`` (in the graph: Grad-CAM differentiates them)."""
        block = self.blocks[index]
        out = block.attention(hidden, attention_mask=extended_mask, output_attentions=output_attentions)
        attended, probs, cross = out[0], (out[1] if output_attentions else None), None
        if memory is not None and str(index) in self.cross_attention:
            out = self.cross_attention[str(index)](attended, attention_mask=memory_mask, encoder_hidden_states=memory,
                                              output_attentions=output_cross_attentions)
            attended, cross = out[0], (out[1] if output_cross_attentions else None)
        return block.output(block.intermediate(attended), attended), probs, cross

    def encode(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None,
               memory: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None,
               output_attentions: bool = False, output_cross_attentions: bool = False,
               layers: Optional[Sequence[int]] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """``layers`` (default: all, in order) over inputs ``(B, S, H)`` with 0/1 ``mask`` ``(B, S)``;
        cross-attention to ``memory`` ``(B, M, H)`` (0/1 ``memory_mask`` ``(B, M)``) in every layer that has
        one, or skipped when it is None. With ``output_attentions`` also returns a tuple indexed by layer
        (length L) of the self-attention probabilities ``(B, heads, S, S)`` (PSL reads the last layer's,
        paper appendix §3); with ``output_cross_attentions`` (then) one of the cross-attention probabilities
        ``(B, heads, S, M)`` (Grad-CAM, paper §3.5). A layer that did not run, or ran without
        cross-attention, has None there."""
        layers = range(self.num_layers) if layers is None else layers
        batch, length, _ = hidden.shape
        dtype = mask_compute_dtype(hidden)
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"attention mask shape {tuple(mask.shape)} does not match the sequence {(batch, length)}")
        extended = extended_attention_mask(mask, dtype)
        memory_extended = None
        if memory is not None:
            if memory.dim() != 3 or memory.size(0) != batch or memory.size(-1) != self.hidden_size:
                raise ValueError(f"cross-attention memory must be ({batch}, tokens, {self.hidden_size}); got "
                                 f"{tuple(memory.shape)}")
            if memory_mask is None:
                memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
            if tuple(memory_mask.shape) != tuple(memory.shape[:2]):
                raise ValueError(f"memory mask shape {tuple(memory_mask.shape)} does not match the memory "
                                 f"{tuple(memory.shape[:2])}")
            memory_extended = extended_attention_mask(memory_mask, dtype)
        attentions, cross_attentions = [None] * self.num_layers, [None] * self.num_layers
        for index in layers:
            hidden, attentions[index], cross_attentions[index] = self.run_block(
                index, hidden, extended, memory, memory_extended, output_attentions, output_cross_attentions)
        outputs = (hidden,)
        if output_attentions:
            outputs += (tuple(attentions),)
        if output_cross_attentions:
            outputs += (tuple(cross_attentions),)
        return outputs if len(outputs) > 1 else hidden

    # ------------------------------------------------------------------ roles
    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The unimodal text encoder (official ``mode="text"``): ``(B, L)`` ids -> ``(B, L, H)``; SIMLA:
        every layer, cross-attention skipped; ALBEF: the text layers ``0..fusion_layer-1``."""
        return self.encode(self.embed(input_ids), attention_mask, layers=self.text_layers)

    def fuse(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], image: torch.Tensor,
             image_mask: Optional[torch.Tensor] = None, output_attentions: bool = False,
             output_cross_attentions: bool = False, text_states: Optional[torch.Tensor] = None):
        """The multimodal encoder (ITM, MLM, PSL, retrieval re-ranking, Grad-CAM): the caption (ids, possibly
        MLM-masked) given the image tokens ``image`` ``(B, 1 + N, H)``. Returns ``(B, L, H)`` (then the
        self-attention maps with ``output_attentions``, then the cross-attention maps with
        ``output_cross_attentions``; tuples indexed by layer, see :meth:`encode`).

        SIMLA (official ``mode="multimodal"``): the caption's embeddings through all layers again, each
        cross-attending to the image; ``text_states`` is not used (the pass never starts from the text
        encoder's output). ALBEF: the text layers, then the fusion layers cross-attending to the image
        (``mode="multi_modal"``); ``text_states``, the text encoder's output for exactly these ids and mask
        (:meth:`encode_text`), skips recomputing the text layers (``mode="fusion"``, :meth:`fuse_text`)."""
        if self.layout == ALBEF_LAYOUT and text_states is not None:
            return self.fuse_text(text_states, attention_mask, image, image_mask, output_attentions,
                                  output_cross_attentions)
        return self.encode(self.embed(input_ids), attention_mask, memory=image, memory_mask=image_mask,
                           output_attentions=output_attentions, output_cross_attentions=output_cross_attentions)

    def fuse_text(self, text_states: torch.Tensor, attention_mask: Optional[torch.Tensor], image: torch.Tensor,
                  image_mask: Optional[torch.Tensor] = None, output_attentions: bool = False,
                  output_cross_attentions: bool = False):
        """ALBEF's fusion encoder alone (``mode="fusion"`` on ``encoder_embeds``): the text encoder's output
        ``(B, L, H)`` through layers ``fusion_layer..L-1``, each cross-attending to ``image``. The SIMLA
        layout has no such pass (its multimodal encoder starts from the embeddings: use :meth:`fuse`)."""
        if self.layout != ALBEF_LAYOUT:
            raise ValueError("fuse_text: the SIMLA layout's multimodal pass starts from the caption's embeddings, "
                             "not from the text encoder's output; call fuse(input_ids, ...) (or build with "
                             "model_config.simla.layout: albef)")
        return self.encode(text_states, attention_mask, memory=image, memory_mask=image_mask,
                           output_attentions=output_attentions, output_cross_attentions=output_cross_attentions,
                           layers=self.fusion_layers)

    def reconstruct_image(self, image: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: Optional[torch.Tensor] = None,
                          image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MIM direction (paper §2.3; appendix §1.2, item 3): image tokens ``(B, 1 + N, H)`` (from the masked
        image) as queries - BERT position embeddings and LayerNorm added, self-attention among them -
        cross-attending to the caption's embedding-layer output. Returns ``(B, 1 + N, H)``; the MIM head
        reads positions 1..N. SIMLA layout only: ALBEF has no image-queries direction."""
        self.require_simla_layout("MIM (reconstruct_image)")
        text_memory = self.embed(input_ids)
        return self.encode(self.embed(inputs_embeds=image), image_mask, memory=text_memory,
                           memory_mask=attention_mask)

    def require_simla_layout(self, what: str) -> None:
        """A clear error for a pass that only the shared stream has (MIM's image queries read every layer's
        cross-attention; ALBEF's text layers have none)."""
        if self.layout != SIMLA_LAYOUT:
            raise ValueError(f"{what} needs model_config.simla.layout: simla (every layer with cross-attention); "
                             f"this encoder is built with layout: {self.layout}, which has no MIM (ALBEF's text "
                             "layers have no cross-attention): set model_config.simla.mim: false")

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None,
                mode: str = TEXT) -> torch.Tensor:
        """``mode="text"``: :meth:`encode_text`; ``mode="multimodal"``: :meth:`fuse` (needs ``image``)."""
        if mode == TEXT:
            return self.encode_text(input_ids, attention_mask)
        if mode == MULTIMODAL:
            if image is None:
                raise ValueError("mode='multimodal' needs the image tokens (image=...)")
            return self.fuse(input_ids, attention_mask, image, image_mask)
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


# ---------------------------------------------------------------------- parameter counts
def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(image_size: int = 256, layout: str = SIMLA_LAYOUT,
                     fusion_layer: int = ALBEF_FUSION_LAYER) -> Dict[str, int]:
    """Exact base-size parameter counts of ``layout`` (``simla``, or ``albef``: no ViT mask token, cross-attention
    in layers ``fusion_layer``..11, ALBEF's heads), built on the meta device (no weights are downloaded)."""
    from mmf_multilevel.methods.simla.vision import SIMLAImageEncoder

    simla = layout == SIMLA_LAYOUT
    with torch.device("meta"):
        vision = SIMLAImageEncoder(image_size=image_size, pretrained=False, mask_token=simla)
        text = SIMLATextEncoder.from_config(base_bert_config(), layout=layout, fusion_layer=fusion_layer)
    layers = text.fusion_layers
    counts = {
        ("vision (ViT-B/16 at %d, with the MIM mask token)" if simla else "vision (ViT-B/16 at %d)") % image_size:
            _count(vision),
        "text embeddings (word + position + LayerNorm)": _count(text.text.embeddings),
        "12 BERT layers (self-attention + FFN)": _count(text.blocks),
        ("12 cross-attention blocks" if simla else
         f"{len(layers)} cross-attention blocks (layers {layers[0]}-{layers[-1]})"): _count(text.cross_attention),
    }
    counts["text/multimodal encoder"] = _count(text)
    counts["encoders total"] = counts["text/multimodal encoder"] + _count(vision)
    try:
        from mmf_multilevel.methods.simla.pretraining import SIMLAPretrainingHeads
    except ImportError:
        return counts
    with torch.device("meta"):
        heads = SIMLAPretrainingHeads(base_bert_config(), vision_width=vision.hidden_size, mim_head=simla,
                                      concept_head=simla)
        heads.tie_to(text.word_embeddings)
    for name, module in heads.named_children():
        counts[f"head {name}" + (" (decoder tied to the word embeddings)" if name == "mlm" else "")] = (
            _count(module) - (module.decoder.weight.numel() if name == "mlm" else 0))
    counts["head temperature"] = heads.temp.numel()
    counts["heads total"] = _count(nn.ModuleList([text, heads])) - counts["text/multimodal encoder"]
    counts["all (encoders + heads)"] = counts["encoders total"] + counts["heads total"]
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", action="store_true", help="print the exact base-size parameter counts")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--layout", choices=LAYOUTS, default=SIMLA_LAYOUT,
                        help="simla (default): the shared stream; albef: ALBEF's text (6) + fusion (6) layers, its "
                             "heads (no MIM, no concept head)")
    args = parser.parse_args(argv)
    if not args.counts:
        parser.print_help()
        return 0
    for name, value in parameter_counts(args.image_size, args.layout).items():
        print(f"{value:>13,}  {name}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
