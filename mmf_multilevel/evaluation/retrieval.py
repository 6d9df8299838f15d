"""Image-text retrieval evaluation: ranks with ties, R@K / RSUM, all-pairs and two-stage scoring.

Scores form a matrix ``S[i, t]`` (image i, text t); ``gt[i, t]`` marks matching pairs (an image
has several captions, a caption one image).

*Ranks and ties.* The rank of a query is the number of non-matching candidates that score at
least as high as its best-scoring match (0 = the match is first). Ties therefore count against
the model (``ties="pessimistic"``, the default): a model that gives every pair the same score
gets R@K = 0, not the R@K of whatever order the sort happened to leave. The usual evaluation
scripts take ``argsort`` positions, which breaks ties by index order and can report a constant
model as perfect when the matches happen to come first. ``ties="optimistic"`` counts only
strictly higher candidates (an upper bound); the truth for any tie-breaking lies between.

*Scoring.* :func:`all_pair_scores` scores every (image, text) pair with a matching function in
chunks of at most ``chunk_size`` pairs. :func:`two_stage_scores` first ranks with embeddings
(contrastive similarity) and re-scores only each query's top ``k`` candidates with the matching
function (as ALBEF-style models do); the other entries are ``-inf``, and i2t / t2i get separate
matrices because their top-k sets differ.

*Distributed.* :func:`distributed_ranks` computes the ranks when each process holds the score
rows of a shard of the images: per text, the best matching score is combined with an
``all_reduce(MAX)`` and the counts of images scoring at least as high with ``all_reduce(SUM)``,
so no process ever holds the whole matrix.
"""
import math

import torch

TIES = ("pessimistic", "optimistic")


def _check(scores, gt):
    if scores.dim() != 2 or gt.shape != scores.shape:
        raise ValueError(f"scores and gt must be matrices of one shape, got {tuple(scores.shape)} and {tuple(gt.shape)}")
    gt = gt.bool()
    if not gt.any(dim=1).all():
        raise ValueError(f"{int((~gt.any(dim=1)).sum())} image(s) have no matching text")
    if not gt.any(dim=0).all():
        raise ValueError(f"{int((~gt.any(dim=0)).sum())} text(s) have no matching image")
    return gt


def query_ranks(scores, gt, ties="pessimistic"):
    """Rank of each row's best match among the row's non-matching candidates. ``scores``: Q x C."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    scores = scores.float()
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    best = torch.where(gt, scores, neg_inf).max(dim=1, keepdim=True).values
    beats = scores >= best if ties == "pessimistic" else scores > best
    return (beats & ~gt).sum(dim=1)


def ranks(scores, gt, ties="pessimistic"):
    """(i2t ranks per image, t2i ranks per text) of a full score matrix."""
    gt = _check(scores, gt)
    return query_ranks(scores, gt, ties), query_ranks(scores.t(), gt.t(), ties)


def recall_at(rank, ks=(1, 5, 10)):
    """{k: % of queries whose rank < k}."""
    rank = torch.as_tensor(rank)
    if rank.numel() == 0:
        raise ValueError("no queries: the retrieval gallery is empty")
    return {k: 100.0 * float((rank < k).float().mean()) for k in ks}


def retrieval_metrics(i2t_rank, t2i_rank, ks=(1, 5, 10)):
    """``ir_r1 ... tr_r10`` (text→image = image retrieval "ir", image→text = text retrieval "tr"), ``rsum``."""
    tr = recall_at(i2t_rank, ks)
    ir = recall_at(t2i_rank, ks)
    out = {f"tr_r{k}": v for k, v in tr.items()}
    out.update({f"ir_r{k}": v for k, v in ir.items()})
    out["rsum"] = sum(tr.values()) + sum(ir.values())
    return out


def all_pair_scores(num_images, num_texts, match_fn, chunk_size=4096, image_rows=None, progress=None):
    """``S[i, t] = match_fn(image_idx, text_idx)`` over all pairs, at most ``chunk_size`` pairs per call.

    ``match_fn(image_idx: LongTensor P, text_idx: LongTensor P) -> FloatTensor P``. ``image_rows``
    restricts the rows (a shard of the images); the result then has ``len(image_rows)`` rows.
    """
    rows = torch.arange(num_images) if image_rows is None else torch.as_tensor(image_rows, dtype=torch.long)
    if num_texts == 0 or rows.numel() == 0:
        raise ValueError(f"empty retrieval gallery: {rows.numel()} images x {num_texts} texts")
    out = torch.empty(rows.numel(), num_texts)
    total = rows.numel() * num_texts
    for start in range(0, total, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, total))
        r, t = flat // num_texts, flat % num_texts
        out[r, t] = match_fn(rows[r], t).float().cpu()
        if progress is not None:
            progress(flat.numel())
    return out


def two_stage_scores(image_embeds, text_embeds, match_fn, k=128, chunk_size=4096, k_t2i=None, similarity=None):
    """(i2t matrix, t2i matrix): contrastive top-k per query, re-scored by ``match_fn``; others ``-inf``.

    ``k`` texts per image (i2t) and ``k_t2i`` images per text (default ``k``; MVPTR: 128 and 64), clipped
    to the gallery. Embeddings are L2-normalised here (or ``similarity`` (images x texts) is given).
    A pair among the candidates of both directions is scored once.
    """
    if similarity is None:
        if image_embeds.numel() == 0 or text_embeds.numel() == 0:
            raise ValueError(f"empty retrieval gallery: {image_embeds.shape[0]} images x {text_embeds.shape[0]} texts")
        img = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
        similarity = img @ txt.t()
    sim = similarity.float()
    n_img, n_txt = sim.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"empty retrieval gallery: {n_img} images x {n_txt} texts")
    k_i2t, k_t2i = int(k), int(k if k_t2i is None else k_t2i)
    if k_i2t < 1 or k_t2i < 1:
        raise ValueError(f"two-stage retrieval: k must be >= 1, got {k_i2t} texts per image / {k_t2i} images per text")
    top_texts = sim.topk(min(k_i2t, n_txt), dim=1).indices  # images x k
    top_images = sim.t().topk(min(k_t2i, n_img), dim=1).indices  # texts x k
    i2t_flat = torch.arange(n_img).unsqueeze(1) * n_txt + top_texts
    t2i_flat = top_images * n_txt + torch.arange(n_txt).unsqueeze(1)
    pairs = torch.unique(torch.cat([i2t_flat.reshape(-1), t2i_flat.reshape(-1)]))
    image_idx, text_idx = pairs // n_txt, pairs % n_txt
    values = torch.empty(pairs.numel())
    for start in range(0, pairs.numel(), chunk_size):
        end = start + chunk_size
        values[start:end] = match_fn(image_idx[start:end], text_idx[start:end]).float().cpu()
    scored = torch.full((n_img * n_txt,), float("-inf"))
    scored[pairs] = values
    i2t = torch.full((n_img * n_txt,), float("-inf"))
    t2i = torch.full((n_img * n_txt,), float("-inf"))
    i2t[i2t_flat.reshape(-1)] = scored[i2t_flat.reshape(-1)]
    t2i[t2i_flat.reshape(-1)] = scored[t2i_flat.reshape(-1)]
    return i2t.view(n_img, n_txt), t2i.view(n_img, n_txt)


def rank_gallery(similarity, gt, match_fn, mode="two_stage", k=128, k_t2i=None, chunk_size=4096):
    """R@1/5/10 both ways and RSUM of a gallery (``similarity`` and ``gt``: images x texts) ranked by
    ``mode``: ``similarity`` (the embedding similarity alone), ``two_stage`` (each query's top ``k`` /
    ``k_t2i`` re-scored by ``match_fn``, :func:`two_stage_scores`) or ``all_pairs`` (``match_fn`` on every
    pair); plus ``pairs_fused`` (pairs ``match_fn`` scored) and ``seconds``."""
    import time

    started = time.perf_counter()
    fused = [0]

    def counted(image_idx, text_idx):
        fused[0] += image_idx.numel()
        return match_fn(image_idx, text_idx)

    if mode == "similarity":
        i2t = t2i = similarity
    elif mode == "two_stage":
        i2t, t2i = two_stage_scores(None, None, counted, k=k, k_t2i=k_t2i, chunk_size=chunk_size, similarity=similarity)
    elif mode == "all_pairs":
        i2t = t2i = all_pair_scores(similarity.size(0), similarity.size(1), counted, chunk_size)
    else:
        raise ValueError(f"mode must be similarity, two_stage or all_pairs, got {mode!r}")
    metrics = retrieval_metrics(query_ranks(i2t, gt), query_ranks(t2i.t(), gt.t()))
    metrics.update(pairs_fused=fused[0], seconds=time.perf_counter() - started)
    return metrics


def distributed_ranks(shard_scores, shard_gt, ties="pessimistic", group=None):
    """Ranks when this process holds the score rows of a shard of the images.

    ``shard_scores`` / ``shard_gt``: (images of this shard) x (all texts). Returns (i2t ranks of
    this shard's images, t2i ranks of every text - identical on all processes). Without an
    initialised process group this is :func:`ranks` on the one shard.
    """
    import torch.distributed as dist

    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    gt = shard_gt.bool()
    scores = shard_scores.float()
    i2t = query_ranks(scores, gt, ties) if scores.shape[0] else torch.zeros(0, dtype=torch.long)
    neg_inf = torch.tensor(float("-inf"))
    best = torch.where(gt, scores, neg_inf).max(dim=0).values if scores.shape[0] else torch.full((scores.shape[1],), float("-inf"))
    has_match = gt.any(dim=0).long()
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(has_match, op=dist.ReduceOp.SUM, group=group)
    if not bool((has_match > 0).all()):
        raise ValueError(f"{int((has_match == 0).sum())} text(s) have no matching image")
    beats = scores >= best if ties == "pessimistic" else scores > best
    counts = (beats & ~gt).sum(dim=0)
    if distributed:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return i2t, counts


def shard_rows(num_images, rank, world_size):
    """The image rows a process scores: a contiguous, near-equal shard."""
    per = math.ceil(num_images / world_size)
    return torch.arange(rank * per, min((rank + 1) * per, num_images))
