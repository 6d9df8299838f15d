"""Noun phrases of the retrieved sentences and their links to the image's regions (paper §3.3.2).

For each unique tag ``o`` of an image and each retrieved sentence j (official code; the paper says word2vec):

    s(o, j)  = max_k cos(E(o), E(np_jk))          a(o, j) = argmax_k
    s'(o, j) = s / t  if s > t  else 0            (t = 0.5: s' is 0 or in (1, 2])

with E the SBERT encoder (the one used for retrieval unless told otherwise). A sentence without
noun phrases gives s' = 0 for every tag. Every region takes the values of its own tag (regions with
the same tag link to the same phrase). ``objects_cs_arg`` is -1 where a region is unlinked (s' = 0).
"""
import json
import os

import numpy as np

from mmf_multilevel.weak_corpus._util import AtomicFile, Manifest, progress, read_json, remove_stale_temps

DEFAULT_THRESHOLD = 0.5


def normalize_rows(x):
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def link_tags(tag_vecs, phrase_vecs, threshold=DEFAULT_THRESHOLD):
    """Tag -> best-phrase links of one image.

    ``tag_vecs``: (T, D) L2-normalised embeddings of the image's unique tags.
    ``phrase_vecs``: K arrays (P_j, D), L2-normalised embeddings of sentence j's noun phrases
    (P_j may be 0). Returns ``(scores, args)`` of shape (T, K): s' (0 = unlinked) and the index of
    the linked phrase in sentence j's list (-1 = unlinked).
    """
    t = tag_vecs.shape[0]
    scores = np.zeros((t, len(phrase_vecs)), dtype=np.float32)
    args = np.full((t, len(phrase_vecs)), -1, dtype=np.int64)
    for j, p in enumerate(phrase_vecs):
        if p.shape[0] == 0 or t == 0:
            continue
        sims = tag_vecs @ p.T
        best = sims.argmax(axis=1)
        s = sims[np.arange(t), best]
        linked = s > threshold
        scores[linked, j] = s[linked] / threshold
        args[linked, j] = best[linked]
    return scores, args


def extract_noun_phrases(texts_of_rows, rows, nlp_factory, state_dir, chunk_rows=8192, batch_size=256, settings=None, n_process=1):
    """spaCy noun chunks of the corpus ``rows`` (sorted unique ids), chunk files + manifest; returns {row: [phrases]}."""
    os.makedirs(state_dir, exist_ok=True)
    remove_stale_temps(state_dir)
    rows = [int(r) for r in rows]
    import hashlib

    digest = hashlib.sha1(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()
    manifest = Manifest(os.path.join(state_dir, "noun_phrases.manifest.json"), "noun phrases", {"rows_sha1": digest, "n": len(rows), "chunk_rows": chunk_rows, **(settings or {})})
    n_chunks = (len(rows) + chunk_rows - 1) // chunk_rows
    todo = [c for c in range(n_chunks) if not manifest.is_done(c)]
    if todo:
        nlp = nlp_factory()
        from mmf_multilevel.weak_corpus.encoders import noun_chunks

        done_rows = len(rows) - sum(min(chunk_rows, len(rows) - c * chunk_rows) for c in todo)
        with progress(total=len(rows), initial=done_rows, desc="spaCy noun chunks", unit="doc") as bar:
            for c in todo:
                part = rows[c * chunk_rows : (c + 1) * chunk_rows]
                phrases = noun_chunks(nlp, texts_of_rows(part), batch_size=batch_size, n_process=n_process)
                with AtomicFile(os.path.join(state_dir, f"np_{c:05d}.json")) as f:
                    json.dump({"rows": part, "phrases": phrases}, f, ensure_ascii=False)
                manifest.mark_done(c)
                bar.update(len(part))
    out = {}
    for c in range(n_chunks):
        data = read_json(os.path.join(state_dir, f"np_{c:05d}.json"))
        out.update(zip(data["rows"], data["phrases"]))
    if not manifest.complete:
        manifest.mark_complete()
    return out


def build_record(image, caption_rows, caption_scores, texts, phrases_of, tag_index, tag_vecs, phrase_index, phrase_vecs, threshold=DEFAULT_THRESHOLD, decimals=4):
    """The output record (README) of one image.

    ``caption_rows``/``caption_scores``/``texts``: its retrieved corpus ids, scores and sentences (rank
    order); ``tag_vecs`` are L2-normalised, ``phrase_vecs`` may be raw (a float16 memmap): the rows
    used are normalised here.
    """
    objects = image["objects"]
    unique_tags = list(dict.fromkeys(objects))
    tv = tag_vecs[[tag_index[t] for t in unique_tags]]
    nps = [phrases_of.get(int(r), []) for r in caption_rows]
    pv = [normalize_rows(phrase_vecs[[phrase_index[p] for p in plist]]) if plist else np.zeros((0, tag_vecs.shape[1]), np.float32) for plist in nps]
    s, a = link_tags(tv, pv, threshold)
    pos = {t: i for i, t in enumerate(unique_tags)}
    rows = [pos[t] for t in objects]
    return {
        "image_id": image["image_id"],
        "captions": texts,
        "caption_ids": [int(r) for r in caption_rows],
        "retrieval_scores": [round(float(x), 6) for x in caption_scores],
        "query": image["query"],
        "objects": objects,
        "objects_ids": image["objects_ids"],
        "noun_phrases": nps,
        "objects_cs": np.round(s[rows].astype(np.float64), decimals).tolist(),
        "objects_cs_arg": a[rows].tolist(),
    }


def write_parts(images, part_rows, state_dir, make_record, settings):
    """Write records in parts (``part_00000.jsonl`` ...), each listed in the manifest when complete.

    ``make_record(image_index)`` returns a record or ``None`` (image dropped). Returns the part
    paths in order and the per-part counts of written/dropped records.
    """
    os.makedirs(state_dir, exist_ok=True)
    remove_stale_temps(state_dir)
    manifest = Manifest(os.path.join(state_dir, "parts.manifest.json"), "link", {**settings, "images": len(images), "part_rows": part_rows})
    n_parts = max(1, (len(images) + part_rows - 1) // part_rows)
    todo = [p for p in range(n_parts) if not manifest.is_done(p)]
    done_rows = len(images) - sum(max(0, min(part_rows, len(images) - p * part_rows)) for p in todo)
    counts = dict(manifest.extra.get("counts", {}))
    with progress(total=len(images), initial=done_rows, desc="link phrases", unit="img") as bar:
        for p in todo:
            written = dropped = 0
            with AtomicFile(os.path.join(state_dir, f"part_{p:05d}.jsonl")) as f:
                for i in range(p * part_rows, min(len(images), (p + 1) * part_rows)):
                    record = make_record(i)
                    if record is None:
                        dropped += 1
                    else:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        written += 1
                    bar.update(1)
            counts[str(p)] = [written, dropped]
            manifest.mark_done(p, counts=counts)
    return [os.path.join(state_dir, f"part_{p:05d}.jsonl") for p in range(n_parts)], counts
