"""The contract of a method whose retrieval ranks with uni-modal embeddings (SIMLA's ITC features, MVPTR's VSC
vectors): a :class:`DualEncoder`, which :meth:`MethodModel.retrieval_encoders
<mmf_multilevel.methods.base.MethodModel.retrieval_encoders>` returns.

One object serves the method's own gallery ranking (``python -m mmf_multilevel.methods.<method>.retrieval``,
:func:`mmf_multilevel.evaluation.retrieval.rank_gallery`) and the predictor's
(:mod:`mmf_multilevel.predict.retrieve`), so both rank with the same code:

* :meth:`DualEncoder.encode_images` / :meth:`DualEncoder.encode_texts`: a collated batch of the dataset's visual
  (text) sample fields -> *embeddings*, a dict of tensors whose first dimension is the batch's items. Any
  selection of rows of embeddings (one item for a cache entry, a query's top-k candidates) is again embeddings
  (:func:`select_rows`, :func:`concat_rows`);
* :meth:`DualEncoder.similarity`: images x texts, the first-stage score;
* :meth:`DualEncoder.match`: the matching head's score of pairs, row ``p`` of the image embeddings with row ``p``
  of the texts';
* :attr:`DualEncoder.rerank`: ``(texts per image query, images per text query)`` that the method's evaluation
  re-scores with :meth:`~DualEncoder.match` (:func:`~mmf_multilevel.evaluation.retrieval.two_stage_scores`), or
  None when the similarity alone ranks.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = ["DualEncoder", "select_rows", "concat_rows", "Embeddings"]

#: one side's embeddings: tensors whose first dimension is the items
Embeddings = Dict[str, torch.Tensor]


class DualEncoder:
    """A method's uni-modal encoders, its first-stage similarity and its matching head (see the module docstring)."""

    #: ``(texts per image, images per text)`` re-scored by :meth:`match`; None: the similarity alone ranks
    rerank: Optional[Tuple[int, int]] = None
    #: how the method ranks, in words (the paper's section)
    description: str = ""

    def encode_images(self, batch) -> Embeddings:
        raise NotImplementedError

    def encode_texts(self, batch) -> Embeddings:
        raise NotImplementedError

    def similarity(self, images: Embeddings, texts: Embeddings) -> torch.Tensor:
        """``(images, texts)`` first-stage scores."""
        raise NotImplementedError

    def match(self, images: Embeddings, texts: Embeddings) -> torch.Tensor:
        """``(P,)`` matching-head scores of the pairs (image row ``p``, text row ``p``), float."""
        raise NotImplementedError


def select_rows(embeddings: Embeddings, index) -> Embeddings:
    """The rows ``index`` (a LongTensor, moved to each tensor's device) of every tensor."""
    return {name: value[index.to(value.device)] for name, value in embeddings.items()}


def concat_rows(parts: Sequence[Embeddings]) -> Embeddings:
    """The embeddings of ``parts`` one after the other (every part holds the same names)."""
    parts = list(parts)
    if not parts:
        raise ValueError("concat_rows: no embeddings")
    names = list(parts[0])
    for part in parts[1:]:
        if list(part) != names:
            raise ValueError(f"concat_rows: embeddings named {list(part)} and {names}")
    return {name: torch.cat([part[name] for part in parts]) for name in names}
