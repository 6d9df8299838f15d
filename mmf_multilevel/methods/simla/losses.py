"""SIMLA's pre-training losses as pure functions on tensors (paper §2.2-§2.4, Eqs. 1-9).

Nothing here owns parameters or runs an encoder: the model computes features, logits and attention maps,
and these functions turn them into the losses of the full objective (paper Eq. 10):
``L = L_itc^mod + L_xmm^mod + L_itm + L_PSL^mod``, all weighted 1 (the official ``Pretrain.py`` sums
``loss_mlm + loss_itm + loss_ita + loss_mim + loss_pseudo``).

* :func:`itc_loss` - image-text contrastive learning with the memory queues and momentum distillation
  (Eqs. 1-4);
* :func:`sample_hard_negatives`, :func:`itm_pair_indices`, :func:`itm_labels`, :func:`itm_loss` - image-text
  matching with in-batch hard negatives "following ALBEF" (Eq. 5);
* :func:`distilled_token_loss`, :func:`mlm_loss`, :func:`mim_loss` - the two halves of cross-modality
  reconstruction, each distilled from the momentum heads (Eqs. 6-7);
* :func:`psl_targets`, :func:`psl_loss` - pseudo-labelled keyword prediction (Eqs. 8-9; appendix §3).

Where the paper leaves the computation open, the official code (``models/simla/pretrain.py``, class
``SIMLA.forward``) is followed, with the deviations named in each docstring.
"""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from mmf_multilevel.modules.masking import IGNORE_INDEX

__all__ = ["ITCOutput", "itc_loss", "sample_hard_negatives", "itm_pair_indices", "itm_labels", "itm_loss",
           "distilled_token_loss", "mlm_loss", "mim_loss", "psl_targets", "psl_loss",
           "PSL_K_PER_HEAD", "PSL_NUM_LABELS", "IGNORE_INDEX", "ITM_MATCH"]

#: the ITM class of a matched pair (official ``itm_labels = [1] * B + [0] * 2B``)
ITM_MATCH = 1
#: the official code takes the top 4 positions of every head's [CLS] row (paper appendix §3: "k = 4") ...
PSL_K_PER_HEAD = 4
#: ... and keeps the 5 positions most heads voted for
PSL_NUM_LABELS = 5


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is of a lower precision (teacher probabilities of bf16/fp16 logits)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Row-wise H(targets, softmax(logits)) = -sum_j targets_j log softmax(logits)_j, shape ``logits[:-1]``."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1)


# ---------------------------------------------------------------------- ITC
class ITCOutput(NamedTuple):
    loss: torch.Tensor
    #: online image features against [momentum text features of the batch ; text queue], over τ: ``(B, B + M)``
    sim_i2t: torch.Tensor
    #: online text features against [momentum image features of the batch ; image queue], over τ
    sim_t2i: torch.Tensor


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
             text_feat_m: torch.Tensor, image_queue: torch.Tensor, text_queue: torch.Tensor,
             temp: torch.Tensor, alpha: float, image_ids: Optional[torch.Tensor] = None,
             queue_ids: Optional[torch.Tensor] = None) -> ITCOutput:
    """The distilled image-text contrastive loss ``L_itc^mod = (1 - α) L_itc + α L'_itc`` (paper Eqs. 1-4).

    ``image_feat``/``text_feat``: the online unit-norm features g_v(v_cls), g_l(l_cls) ``(B, D)``;
    ``image_feat_m``/``text_feat_m``: the momentum features g'_v, g'_l of the same batch ``(B, D)``;
    ``image_queue``/``text_queue``: Q^img, Q^txt ``(D, M)`` (before this step's enqueue); ``temp``: τ.

    The candidates of an image are ``[text_feat_m ; Q^txt]`` (B + M of them), of a text
    ``[image_feat_m ; Q^img]``; p^{i2t} = softmax(S / τ) over them (Eq. 1). The momentum distribution p_m
    is Eq. 1 with momentum features on both sides (Eq. 4). Since the cross-entropy is linear in its
    target, ``(1 - α) H(y, p) + α H(p_m, p) = H((1 - α) y + α p_m, p)``, which is how the official code
    computes it: ``targets = α softmax(sim_m) + (1 - α) y``, ``loss = (H_i2t + H_t2i) / 2`` averaged over
    the batch (Eq. 2's ½). y is one-hot on the diagonal of the batch block (the pair itself). With
    ``image_ids`` ``(B,)`` (and ``queue_ids`` ``(M,)`` for the queued features, ALBEF's retrieval
    fine-tuning), y is instead uniform over every candidate with the same image id.

    The teacher side (momentum features, queues, τ in the targets) carries no gradient. Returns the loss and
    the online similarity matrices (ITM's hard-negative sampling reads their batch block)."""
    alpha = _check_alpha(alpha)
    batch, dim = image_feat.shape
    for name, feat in (("text_feat", text_feat), ("image_feat_m", image_feat_m), ("text_feat_m", text_feat_m)):
        if tuple(feat.shape) != (batch, dim):
            raise ValueError(f"itc_loss: {name} has shape {tuple(feat.shape)}, expected image_feat's {(batch, dim)}")
    if image_queue.dim() != 2 or image_queue.shape != text_queue.shape or image_queue.size(0) != dim:
        raise ValueError(f"itc_loss: the queues must both be ({dim}, M); got {tuple(image_queue.shape)} and "
                         f"{tuple(text_queue.shape)}")
    text_all = torch.cat([text_feat_m.detach().t(), text_queue.detach()], dim=1)
    image_all = torch.cat([image_feat_m.detach().t(), image_queue.detach()], dim=1)
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    with torch.no_grad():
        if image_ids is None:
            hard = torch.zeros_like(sim_i2t)
            hard[:, :batch] = torch.eye(batch, dtype=hard.dtype, device=hard.device)
        else:
            ids = image_ids.reshape(-1, 1)
            pool = ids.t() if queue_ids is None else torch.cat([ids.t(), queue_ids.reshape(1, -1).to(ids)], dim=1)
            if pool.size(1) != sim_i2t.size(1):
                raise ValueError(f"itc_loss: {pool.size(1)} candidate ids for {sim_i2t.size(1)} candidates "
                                 "(pass queue_ids for the queued features)")
            hard = (ids == pool).to(sim_i2t.dtype)
            hard = hard / hard.sum(dim=1, keepdim=True)
        if alpha > 0:
            t = temp.detach() if torch.is_tensor(temp) else temp
            soft_i2t = F.softmax(image_feat_m.detach() @ text_all / t, dim=1)
            soft_t2i = F.softmax(text_feat_m.detach() @ image_all / t, dim=1)
            targets_i2t = alpha * soft_i2t + (1 - alpha) * hard
            targets_t2i = alpha * soft_t2i + (1 - alpha) * hard
        else:
            targets_i2t = targets_t2i = hard
    loss_i2t = _soft_cross_entropy(sim_i2t, targets_i2t).mean()
    loss_t2i = _soft_cross_entropy(sim_t2i, targets_t2i).mean()
    return ITCOutput((loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i)


# ---------------------------------------------------------------------- ITM
@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, image_ids: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None):
    """In-batch hard negatives for ITM (paper §2.2: "We mine in-batch hard negatives for each image and text
    in a pair following ALBEF").

    ``sim_i2t``/``sim_t2i``: the ITC similarities (already over τ) of :func:`itc_loss`, ``(B, B + M)`` or
    ``(B, B)``; only the local batch block ``[:, :B]`` is read. For every image b one negative text is drawn
    with probability ∝ exp(sim_i2t[b, j]) over j != b, and for every text b one negative image ∝
    exp(sim_t2i[b, j]) (the official code: ``softmax(sim[:, :bs])`` with the diagonal zeroed, one
    ``torch.multinomial`` per row). The softmax is taken over the allowed entries only (the excluded ones
    set to -inf first), which is the same distribution after ``multinomial``'s normalisation but cannot
    underflow to an all-zero row when τ is small. With ``image_ids`` ``(B,)`` every pair of the same image
    is excluded too (ALBEF's retrieval fine-tuning); pre-training passes none.

    Returns ``(neg_text_for_image, neg_image_for_text)``, two ``(B,)`` long index tensors into the batch."""
    batch = sim_i2t.size(0)
    if sim_t2i.size(0) != batch or sim_i2t.size(1) < batch or sim_t2i.size(1) < batch:
        raise ValueError(f"sample_hard_negatives: similarities {tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)} "
                         "must both be (B, >= B)")
    excluded = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
    if image_ids is not None:
        ids = image_ids.reshape(-1, 1).to(sim_i2t.device)
        excluded = excluded | (ids == ids.t())
    if bool(excluded.all(dim=1).any()):
        raise ValueError("sample_hard_negatives: a pair has no allowed negative in the local batch (batch of one, "
                         "or every caption of one image); ITM needs at least two images per rank")
    weights_i2t = F.softmax(sim_i2t[:, :batch].float().masked_fill(excluded, float("-inf")), dim=1)
    weights_t2i = F.softmax(sim_t2i[:, :batch].float().masked_fill(excluded, float("-inf")), dim=1)
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return neg_text, neg_image


def itm_pair_indices(neg_text: torch.Tensor, neg_image: torch.Tensor):
    """The 3B (text, image) pairs of the ITM forward, as the official code orders them: B positives
    ``(text_b, image_b)``, then B pairs ``(text_b, image_neg(b))`` (a negative image for every text), then
    B pairs ``(text_neg(b), image_b)`` (a negative text for every image). Returns ``(text_index,
    image_index)``, two ``(3B,)`` long tensors into the batch; labels: :func:`itm_labels`."""
    batch = neg_text.numel()
    own = torch.arange(batch, device=neg_text.device)
    text_index = torch.cat([own, own, neg_text.reshape(-1)])
    image_index = torch.cat([own, neg_image.reshape(-1).to(own.device), own])
    return text_index, image_index


def itm_labels(batch_size: int, device=None) -> torch.Tensor:
    """``[1] * B + [0] * 2B`` (class 1 = matched, :data:`ITM_MATCH`), the order of :func:`itm_pair_indices`."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = ITM_MATCH
    return labels


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """``L_itm`` (paper Eq. 5): the two-class cross-entropy of the ITM head's ``(3B, 2)`` logits on the
    pairs of :func:`itm_pair_indices` against :func:`itm_labels`, averaged over the 3B pairs."""
    if logits.dim() != 2 or logits.size(1) != 2 or logits.size(0) % 3:
        raise ValueError(f"itm_loss needs (3B, 2) logits (B positives, then 2B negatives); got {tuple(logits.shape)}")
    return F.cross_entropy(logits, itm_labels(logits.size(0) // 3, logits.device))


# ---------------------------------------------------------------------- XMM (MLM + MIM)
def distilled_token_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                         alpha: float, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(1 - α) H(y, p) + α H(p_m, p)`` averaged over the positions whose label is not ``ignore_index``
    (one half of paper Eq. 7).

    ``logits`` ``(..., V)`` student; ``labels`` ``(...)`` token ids, ``ignore_index`` where no loss is taken;
    ``teacher_logits`` ``(..., V)`` of the momentum model (p_m = their softmax; may be None when α = 0).
    Both terms average over the same positions, as the official code does (``CrossEntropyLoss`` for the
    hard term, ``loss_distill[labels != -100].mean()`` for the soft one). The soft term's ``log_softmax`` is
    over the vocabulary axis (the official ``med.py`` ``BertForMaskedLM`` takes it over ``dim=1``, the
    sequence axis of a ``(B, L, V)`` tensor; its MIM term and ALBEF's ``xbert.py`` use the vocabulary axis).
    With no labelled position the loss is 0 (still connected to ``logits``), not NaN."""
    alpha = _check_alpha(alpha)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    keep = labels != ignore_index
    if not bool(keep.any()):
        return logits.sum() * 0.0
    student = logits[keep]
    loss = F.cross_entropy(student, labels[keep])
    if alpha == 0:
        return loss
    if teacher_logits is None or teacher_logits.shape != logits.shape:
        raise ValueError("distilled_token_loss: alpha > 0 needs teacher_logits of the logits' shape")
    soft = F.softmax(_at_least_float32(teacher_logits.detach()[keep]), dim=-1).to(student.dtype)
    distill = _soft_cross_entropy(student, soft).mean()
    return (1 - alpha) * loss + alpha * distill


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor],
             alpha: float) -> torch.Tensor:
    """``(1 - α) L_MLM + α L'_MLM`` (paper Eqs. 6-7): ``logits`` ``(B, L, V)`` of the MLM head on the
    multimodal pass over the masked caption, ``labels`` ``(B, L)`` (original ids at masked positions, -100
    elsewhere), ``teacher_logits`` the momentum text encoder's on the same masked caption with the momentum
    image embeddings."""
    return distilled_token_loss(logits, labels, teacher_logits, alpha)


def mim_loss(logits: torch.Tensor, visual_tokens: torch.Tensor, mask: torch.Tensor,
             teacher_logits: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """``(1 - α) L_MIM + α L'_MIM`` (paper Eqs. 6-7): ``logits`` ``(B, N, 8192)`` of the MIM head at the
    image positions 1..N of the masked-image pass, ``visual_tokens`` ``(B, N)`` the dVAE tokens of the
    image, ``mask`` ``(B, N)`` bool, True where the patch was masked (the loss is taken there only),
    ``teacher_logits`` the momentum model's on the same masked image."""
    if mask.shape != visual_tokens.shape or mask.dtype != torch.bool:
        raise ValueError(f"mim_loss: mask must be a bool tensor of the tokens' shape {tuple(visual_tokens.shape)}; "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    labels = visual_tokens.masked_fill(~mask, IGNORE_INDEX)
    return distilled_token_loss(logits, labels, teacher_logits, alpha)


# ---------------------------------------------------------------------- PSL
@torch.no_grad()
def psl_targets(attention: torch.Tensor, input_ids: torch.Tensor, vocab_size: int,
                attention_mask: Optional[torch.Tensor] = None, excluded_ids: Sequence[int] = (),
                cls_token_id: Optional[int] = None, k_per_head: int = PSL_K_PER_HEAD,
                num_labels: int = PSL_NUM_LABELS, replicate_official: bool = False) -> torch.Tensor:
    """The multi-hot pseudo-labels y^PSL ``(B, vocab_size)`` (paper §2.4; appendix §3).

    ``attention``: the last layer's self-attention probabilities of the (momentum, official code)
    multimodal pass ``(B, heads, L, L)``; row 0 is the multimodal [CLS]'s. The paper takes "the top k most
    attended positions using the 0-th row" with k = 4. The official code does it per head: every head
    votes for its ``k_per_head`` = 4 most attended positions, the ``num_labels`` = 5 positions with the
    most votes are kept, and their token ids become the targets.

    Default: positions that cannot be keywords are excluded *before* the voting - padding (``attention_mask``
    0), the first position ([CLS]) and every position holding one of ``excluded_ids`` (pass [CLS], [SEP],
    [PAD]) - and only positions with at least one vote are kept, so a short caption gives fewer labels and
    special tokens never become labels. Ties in the vote go to the position with the larger head-averaged
    [CLS] attention.

    ``replicate_official=True``: the official computation exactly - votes over all positions, the top
    ``num_labels`` counts whatever they are (a [SEP] or [PAD] can be chosen), then the ``cls_token_id``
    column cleared; ties broken by ``torch.topk``."""
    if attention.dim() != 4 or attention.size(2) != attention.size(3):
        raise ValueError(f"psl_targets needs (B, heads, L, L) attention probabilities; got {tuple(attention.shape)}")
    batch, heads, length, _ = attention.shape
    if tuple(input_ids.shape) != (batch, length):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} do not match the attention maps {(batch, length)}")
    if int(k_per_head) < 1 or int(num_labels) < 1:
        raise ValueError(f"k_per_head ({k_per_head}) and num_labels ({num_labels}) must be positive")
    cls_row = attention[:, :, 0].float()  # (B, heads, L)
    targets = torch.zeros(batch, int(vocab_size), device=input_ids.device)
    if replicate_official:
        k = min(int(k_per_head), length)
        picks = cls_row.reshape(batch * heads, length).topk(k, dim=-1).indices.reshape(batch, -1)
        votes = torch.zeros(batch, length, dtype=torch.long, device=picks.device)
        votes.scatter_add_(1, picks, torch.ones_like(picks))
        positions = votes.topk(min(int(num_labels), length), dim=-1).indices
        targets.scatter_(1, input_ids.gather(1, positions), 1.0)
        if cls_token_id is not None:
            targets[:, int(cls_token_id)] = 0
        return targets
    allowed = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
    allowed[:, 0] = False
    if attention_mask is not None:
        allowed &= attention_mask.to(allowed.device).bool()
    for token in set(excluded_ids) | ({int(cls_token_id)} if cls_token_id is not None else set()):
        allowed &= input_ids != int(token)
    scores = cls_row.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    k = min(int(k_per_head), length)
    top = scores.topk(k, dim=-1)
    votes = torch.zeros(batch, heads, length, device=scores.device)
    votes.scatter_(2, top.indices, torch.isfinite(top.values).float())  # an excluded position gets no vote
    votes = votes.sum(dim=1)  # (B, L)
    mean_attention = cls_row.mean(dim=1)  # in [0, 1]: orders positions of equal votes only
    rank = (votes + mean_attention / 2).masked_fill(votes == 0, float("-inf"))
    chosen = rank.topk(min(int(num_labels), length), dim=-1)
    keep = torch.isfinite(chosen.values)
    tokens = input_ids.gather(1, chosen.indices)
    rows = torch.arange(batch, device=tokens.device).unsqueeze(1).expand_as(tokens)
    targets[rows[keep], tokens[keep]] = 1.0
    return targets


def psl_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor],
             alpha: float) -> torch.Tensor:
    """``L_PSL^mod`` (paper Eqs. 8-9): ``(1 - α) BCE(σ(p), y^PSL) + α BCE(σ(p), σ(p_m))``, each averaged
    over the batch and the V vocabulary entries (Eq. 8's 1/V), as the official code's two
    ``binary_cross_entropy_with_logits`` terms.

    ``logits`` ``(B, V)``: the concept head on the online image feature; ``targets`` ``(B, V)`` the
    multi-hot :func:`psl_targets`; ``teacher_logits`` ``(B, V)``: the momentum concept head on the momentum
    image feature (σ of them are the soft pseudo-labels; no gradient). Eq. 9 calls the second term a K-L
    divergence; it is this soft-target binary cross-entropy."""
    alpha = _check_alpha(alpha)
    if logits.shape != targets.shape:
        raise ValueError(f"psl_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    hard = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    if alpha == 0:
        return hard
    if teacher_logits is None or teacher_logits.shape != logits.shape:
        raise ValueError("psl_loss: alpha > 0 needs teacher_logits of the logits' shape")
    soft = torch.sigmoid(_at_least_float32(teacher_logits.detach())).to(logits.dtype)
    return (1 - alpha) * hard + alpha * F.binary_cross_entropy_with_logits(logits, soft)
