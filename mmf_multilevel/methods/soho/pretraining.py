"""SOHO's pre-training (paper §3.3, Eq. 6-9; §4.1 and Appendix A.2 for the batch layout).

* heads (:class:`SOHOPretrainingHeads`): ``mlm`` (BERT's LM head, decoder tied to the word
  embeddings), ``mvm`` (BERT's head transform + a linear layer over the ``k`` dictionary entries) and
  ``itm`` (a binary classifier on the pooled [CLS]);
* :func:`draw_mvm_mask` - Masked Visual Modeling's masking (§3.3): a dictionary id present in the
  image is chosen and **every** cell mapped to it is masked, so a masked cell cannot copy its label
  from a neighbour that shares the id;
* :func:`compose_itm_pairs` - each image with two of its captions (matched) and two captions of
  other images of the batch (mismatched) (§4.1, Appendix A.2);
* :func:`unmasked_text` - the dataset's masked words put back (the image-text matching pass reads the
  unmasked text, so "masked" never tells "matched");
* :func:`pretraining_losses` - MLM (Eq. 6) and MVM (Eq. 7) on matched pairs only, ITM (Eq. 8) on all,
  equal weights (Eq. 9).
"""
from typing import Dict, Optional

import torch
from torch import nn

from mmf_multilevel.modules.heads import ITMHead, MLMHead, RegionClassificationHead, itm_loss, mlm_loss
from mmf_multilevel.modules.masking import IGNORE_INDEX

__all__ = ["MVM_MODES", "SOHOPretrainingHeads", "draw_mvm_mask", "mvm_labels", "compose_itm_pairs", "unmasked_text",
           "pretraining_losses"]

MVM_MODES = ("ratio", "single_id")


class SOHOPretrainingHeads(nn.Module):
    """``mlm`` (tied to the word embeddings), ``mvm`` (transform + ``Linear(c, k)``), ``itm`` (2-way)."""

    def __init__(self, network, vd_size: int):
        super().__init__()
        config = network.config
        self.mlm = MLMHead.from_config(config).tie_to(network.text.word_embeddings)
        self.mvm = RegionClassificationHead(config.hidden_size, int(vd_size), hidden_act=config.hidden_act,
                                            layer_norm_eps=config.layer_norm_eps,
                                            initializer_range=config.initializer_range)
        self.itm = ITMHead(config.hidden_size, 2, initializer_range=config.initializer_range)
        self.vd_size = int(vd_size)


def _check_ratios(mode: str, ratio: float, max_ratio: float) -> None:
    if mode not in MVM_MODES:
        raise ValueError(f"model_config.soho.pretraining.mvm_mode must be one of {list(MVM_MODES)}, got {mode!r}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"model_config.soho.pretraining.mvm_mask_ratio must lie in (0, 1], got {ratio}")
    if not ratio <= max_ratio <= 1.0:
        raise ValueError(f"model_config.soho.pretraining.mvm_max_ratio must lie in [mvm_mask_ratio, 1], got {max_ratio}")


def draw_mvm_mask(ids: torch.Tensor, valid: torch.Tensor, mode: str = "ratio", ratio: float = 0.15,
                  max_ratio: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The cells to mask ``(N, l)`` bool, for each row's dictionary ``ids (N, l)`` over its real cells
    ``valid (N, l)``: whole ids, never a part of one, never a padding cell.

    The paper (§3.3) "first randomly select[s] an existing label index j, then replace[s] all visual
    embedding vectors in f⁻¹(j)"; how many ids and how large a share it leaves open.

    * ``single_id``: exactly one id per row, uniform among the ids whose cells stay within
      ``max_ratio`` of the row's real cells (the smallest id when none does);
    * ``ratio``: ids in a random order, each taken unless it would push the masked share past
      ``max_ratio``, until the share reaches ``ratio``; at least one id (the smallest when none fits).
    """
    _check_ratios(mode, float(ratio), float(max_ratio))
    if ids.shape != valid.shape or ids.dim() != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and valid {tuple(valid.shape)} must both be (rows, cells)")
    masked = torch.zeros_like(valid, dtype=torch.bool)
    cpu_ids, cpu_valid = ids.detach().cpu(), valid.detach().cpu().bool()
    for row in range(ids.size(0)):
        real = cpu_valid[row]
        total = int(real.sum())
        if total == 0:
            continue
        present, counts = torch.unique(cpu_ids[row][real], return_counts=True)
        order = torch.randperm(present.numel(), generator=generator)
        cap = max_ratio * total
        chosen, share = [], 0
        for position in order.tolist():
            count = int(counts[position])
            if share + count > cap + 1e-9:
                continue
            chosen.append(int(present[position]))
            share += count
            if mode == "single_id" or share >= ratio * total - 1e-9:
                break
        if not chosen:  # every id alone is over the cap (e.g. one id covers the image)
            chosen = [int(present[order[counts[order].argmin()]])]
        hit = torch.isin(cpu_ids[row], torch.tensor(chosen, dtype=cpu_ids.dtype)) & real
        masked[row] = hit.to(masked.device)
    return masked


def mvm_labels(ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """MVM targets: the dictionary id ``h_i`` at masked cells, ``IGNORE_INDEX`` elsewhere (§3.3)."""
    return torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))


def compose_itm_pairs(num_images: int, captions_per_image: int, num_positive: int = 2, num_negative: int = 2,
                      generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """The image-text pairs of one batch (§4.1, Appendix A.2: "an image will be paired with four texts
    ..., including two positive pairs and two negative pairs").

    The batch holds ``captions_per_image`` captions of each of its ``num_images`` images, caption ``c``
    of image ``i`` at flat index ``i * captions_per_image + c``. For every image: ``num_positive`` of its
    own captions, drawn without replacement (with replacement only when it has fewer), then
    ``num_negative`` captions of other images of the batch, each drawn uniformly from all of them.
    Returns ``pair_image_index``, ``pair_text_index`` (into the flat captions) and ``is_correct`` (1 =
    matched), each ``(num_images * (num_positive + num_negative),)``, image by image.
    """
    if num_negative > 0 and num_images < 2:
        raise ValueError("image-text matching needs at least 2 images per batch (negatives are other images' "
                         "captions); raise the batch size")
    if captions_per_image < 1 or num_positive < 0 or num_negative < 0:
        raise ValueError("captions_per_image must be positive, num_positive and num_negative non-negative")
    images, texts, labels = [], [], []
    for image in range(num_images):
        own = image * captions_per_image
        if num_positive <= captions_per_image:
            picks = torch.randperm(captions_per_image, generator=generator)[:num_positive]
        else:
            picks = torch.randint(captions_per_image, (num_positive,), generator=generator)
        texts += (picks + own).tolist()
        if num_negative:
            others = torch.randint((num_images - 1) * captions_per_image, (num_negative,), generator=generator)
            texts += (others + (others >= own).long() * captions_per_image).tolist()  # skip the own captions
        images += [image] * (num_positive + num_negative)
        labels += [1] * num_positive + [0] * num_negative
    return {"pair_image_index": torch.tensor(images), "pair_text_index": torch.tensor(texts),
            "is_correct": torch.tensor(labels)}


def unmasked_text(input_ids: torch.Tensor, lm_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """The text before the dataset's MLM corruption: the original id (the label) wherever one is
    predicted (``lm_labels >= 0``), the given id elsewhere."""
    if lm_labels is None:
        return input_ids
    return torch.where(lm_labels >= 0, lm_labels.to(input_ids.dtype), input_ids)


def pretraining_losses(heads: SOHOPretrainingHeads, itm_logits: torch.Tensor, is_matched: torch.Tensor,
                       masked_out: Optional[Dict[str, torch.Tensor]] = None, masked_rows: Optional[torch.Tensor] = None,
                       mlm_targets: Optional[torch.Tensor] = None,
                       mvm_targets: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """SOHO's losses (Eq. 9: ``L = L_MLM + L_MVM + L_ITM``, equal weights).

    * ``itm`` (Eq. 8): 2-way cross-entropy of ``itm_logits`` (``heads.itm`` on the pooled [CLS] of the
      matching pass) against ``is_matched`` over every pair;
    * ``mlm`` (Eq. 6) / ``mvm`` (Eq. 7): cross-entropy over the words / the dictionary ids of the
      masked pass ``masked_out`` (its rows are ``masked_rows`` of the pairs) at the positions whose
      target is not ``IGNORE_INDEX``, counted only on matched rows; mean over those positions.

    A loss with nothing to predict is a graph-connected zero. ``mvm_targets`` None leaves ``mvm`` out
    (no dictionary: the paper's "w/o VD" ablation).
    """
    is_matched = is_matched.view(-1).long()
    losses = {"itm": itm_loss(itm_logits, is_matched)}
    if masked_out is None:
        return losses
    rows = torch.arange(is_matched.numel(), device=is_matched.device) if masked_rows is None else masked_rows
    matched = (is_matched[rows] == 1).unsqueeze(1)
    if mlm_targets is not None:
        losses["mlm"] = _masked_prediction_loss(heads.mlm, masked_out["text"], mlm_targets, matched)
    if mvm_targets is not None:
        losses["mvm"] = _masked_prediction_loss(heads.mvm, masked_out["visual"], mvm_targets, matched)
    return losses


def _masked_prediction_loss(head: nn.Module, states: torch.Tensor, targets: torch.Tensor,
                            matched: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``head`` at the positions of matched rows with a target; only those
    positions go through the head (the vocabulary / dictionary projection), and with none of them
    ``mlm_loss`` gives its graph-connected zero."""
    labels = targets.masked_fill(~matched, IGNORE_INDEX)
    where = labels != IGNORE_INDEX
    return mlm_loss(head(states[where]), labels[where])

