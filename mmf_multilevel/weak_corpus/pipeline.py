"""The builder's stages over one work directory: prepare -> encode -> search -> link.

Work directory layout (every stage resumable after kill -9; a stage whose settings differ from
what the directory holds is refused, ``force=True`` rebuilds it)::

    corpus/   text.txt offsets.npy owners.json info.json     the cleaned corpus (row = corpus id)
    images/   images.jsonl images_offsets.npy tag_vocab.json images_info.json   valid images, tags, queries
    emb/      corpus.npy queries.npy (+ .manifest.json)       float16 SBERT embeddings (memmap)
    search/<index>-<metric>-k<K>[-noself]-<emb hash>/         running top-K state or ANN index
              result.npz                                      scores + corpus ids (Q x K)
    search/current.json                                       which result ``link`` uses
    link/<search tag>/ np_*.json phrases.npy tags.npy part_*.jsonl   noun phrases, their embeddings, output parts
"""
import json
import os
import shutil
import time

import numpy as np

from mmf_multilevel.weak_corpus import inputs as inp
from mmf_multilevel.weak_corpus._util import (
    AtomicFile,
    Report,
    RetrievalError,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
)

DEFAULTS = {
    "top_k": 5,
    "sbert": "paraphrase-MiniLM-L6-v2",
    "link_sbert": None,
    "spacy": "en_core_web_sm",
    "index": "flat",
    "metric": "cosine",
    "device": "auto",
    "batch_size": 64,
    "exclude_self": False,
    "query_mode": "ranked",
    "min_conf": inp.DEFAULT_MIN_CONF,
    "min_area": inp.DEFAULT_MIN_AREA,
    "object_vocab": None,
    "lowercase": False,
    "text_field": None,
    "link_threshold": 0.5,
    "keep_no_phrase": False,
    "chunk_rows": 16384,
    "shard_rows": 1_000_000,
    "query_block": 65536,
    "search_backend": "auto",
    "nlist": None,
    "nprobe": 32,
    "hnsw_m": 32,
    "ef_construction": 80,
    "ef_search": 128,
    "recall_sample": 1000,
    "clip_top_k": False,
    "spacy_batch_size": 256,
    "np_chunk_rows": 8192,
    "spacy_processes": 1,
    "part_rows": 10000,
    "force": False,
    "quiet": False,
}


class Settings:
    """Options of a run: :data:`DEFAULTS` overridden by keyword arguments (unknown names are an error)."""

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(DEFAULTS) - {"features", "corpus", "out", "work"})
        if unknown:
            raise TypeError(f"unknown builder options {unknown}")
        for key, value in DEFAULTS.items():
            setattr(self, key, value if kwargs.get(key) is None else kwargs[key])
        self.features = kwargs.get("features")
        self.corpus = kwargs.get("corpus")
        self.out = kwargs.get("out")
        self.work = kwargs.get("work") or (self.out + ".work" if self.out else None)
        if not self.work:
            raise RetrievalError("a work directory is needed: pass --work DIR (or --out, whose <out>.work is used)")
        if self.top_k < 1:
            raise RetrievalError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0 < self.link_threshold < 1:
            raise RetrievalError(f"--link-threshold must be in (0, 1), got {self.link_threshold}")


class Builder:
    """Runs the stages; ``report`` collects problems and figures for the final summary."""

    def __init__(self, settings, report=None):
        self.s = settings
        self.report = report or Report(quiet=settings.quiet)
        self.work = os.path.abspath(settings.work)
        os.makedirs(self.work, exist_ok=True)
        self._models = {}
        self._device = None
        self.timings = {}

    # ------------------------------------------------------------------ helpers
    def log(self, message):
        self.report.say(message)

    def d(self, *parts):
        return os.path.join(self.work, *parts)

    @property
    def device(self):
        if self._device is None:
            from mmf_multilevel.weak_corpus.encoders import resolve_device

            self._device = resolve_device(self.s.device)
        return self._device

    def sbert(self, name):
        if name not in self._models:
            from mmf_multilevel.weak_corpus.encoders import load_sbert

            self._models[name] = load_sbert(name, self.device, log=self.log)
        return self._models[name]

    def _timed(self, stage, fn):
        start = time.perf_counter()
        out = fn()
        self.timings[stage] = round(time.perf_counter() - start, 3)
        return out

    def _force_clear(self, *parts):
        if self.s.force:
            path = self.d(*parts)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)

    # ------------------------------------------------------------------ prepare
    def prepare_corpus(self):
        if not self.s.corpus:
            if os.path.exists(self.d("corpus", "info.json")):
                return read_json(self.d("corpus", "info.json"))
            raise RetrievalError(f"{self.work}: no prepared corpus here; pass --corpus FILE")
        self._force_clear("corpus")
        info = inp.prepare_corpus(self.s.corpus, self.d("corpus"), self.report, lowercase=self.s.lowercase, text_field=self.s.text_field)
        if info["rows"] == 0:
            raise RetrievalError(f"--corpus {self.s.corpus}: no usable sentence (all lines empty or invalid)")
        self.report.note("corpus_rows", info["rows"])
        return info

    def prepare_images(self):
        if not self.s.features:
            if os.path.exists(self.d("images", "images_info.json")):
                return read_json(self.d("images", "images_info.json"))
            raise RetrievalError(f"{self.work}: no prepared images here; pass --features FILE")
        self._force_clear("images")
        info = inp.prepare_images(
            self.s.features, self.d("images"), self.report, object_vocab=self.s.object_vocab, query_mode=self.s.query_mode,
            min_conf=self.s.min_conf, min_area=self.s.min_area,
        )
        if info["images"] == 0:
            raise RetrievalError(f"--features {self.s.features}: no image with tags (see the warnings above)")
        self.report.note("images_read", info["images"])
        if info.get("query_filter_fallbacks"):
            self.report.note("query_filter_fallbacks", info["query_filter_fallbacks"])
        return info

    # ------------------------------------------------------------------ encode
    def encode(self):
        """Prepare what was given (corpus and/or images) and encode it."""
        from mmf_multilevel.weak_corpus.embed import encode_to_memmap

        did = False
        if self.s.corpus or os.path.exists(self.d("corpus", "info.json")):
            info = self.prepare_corpus()
            corpus = inp.CorpusText(self.d("corpus"))
            try:
                self._timed("encode_corpus", lambda: encode_to_memmap(
                    self.d("emb"), "corpus", info["rows"], corpus.texts, lambda: self.sbert(self.s.sbert), self.s.sbert,
                    batch_size=self.s.batch_size, chunk_rows=self.s.chunk_rows, desc="encode corpus", source=info["signature"], force=self.s.force,
                ))
            finally:
                corpus.close()
            did = True
        if self.s.features or os.path.exists(self.d("images", "images_info.json")):
            info = self.prepare_images()
            store = inp.ImageStore(self.d("images"))
            try:
                self._timed("encode_queries", lambda: encode_to_memmap(
                    self.d("emb"), "queries", len(store), store.queries, lambda: self.sbert(self.s.sbert), self.s.sbert,
                    batch_size=self.s.batch_size, chunk_rows=self.s.chunk_rows, desc="encode queries", source=info["signature"], force=self.s.force,
                ))
            finally:
                store.close()
            did = True
        if not did:
            raise RetrievalError("encode: pass --corpus and/or --features (or a --work directory that holds them)")

    # ------------------------------------------------------------------ search
    def embeddings_fingerprint(self):
        """A short hash of both embedding stages' settings (inputs, model, rows): results of other embeddings never mix."""
        import hashlib

        parts = [read_json(self.d("emb", f"{name}.manifest.json")).get("settings") for name in ("corpus", "queries")]
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]

    def search_tag(self):
        """``<index>-<metric>-k<K>[-noself]-<embeddings fingerprint>``: one folder per search setting."""
        return f"{self.s.index}-{self.s.metric}-k{self.s.top_k}{'-noself' if self.s.exclude_self else ''}-{self.embeddings_fingerprint()}"

    def _excluded(self, image_ids):
        """(Q x m) corpus rows owned by each query image (-2 padded) for --exclude-self."""
        owners = inp.CorpusText(self.d("corpus"))
        try:
            owner_of_row = owners.owners()
        finally:
            owners.close()
        if owner_of_row is None:
            raise RetrievalError(
                f"--exclude-self: the corpus {read_json(self.d('corpus', 'info.json'))['signature']['path']} gives no 'image_id' per sentence; "
                "it needs a .jsonl corpus whose records carry the image_id of the image they describe"
            )
        rows_of = {}
        for row, owner in enumerate(owner_of_row):
            if owner is not None:
                rows_of.setdefault(owner, []).append(row)
        own = [rows_of.get(str(image_id), []) for image_id in image_ids]
        m = max((len(r) for r in own), default=0)
        excluded = np.full((len(own), m), -2, dtype=np.int64)
        for i, rows in enumerate(own):
            excluded[i, : len(rows)] = rows
        self.report.note("self_captions_excluded", int(sum(len(r) for r in own)))
        return excluded

    def search(self):
        from mmf_multilevel.weak_corpus import search as srch
        from mmf_multilevel.weak_corpus.embed import open_embeddings

        for name in ("corpus", "queries"):
            manifest = self.d("emb", f"{name}.manifest.json")
            if not (os.path.exists(manifest) and read_json(manifest).get("complete")):
                raise RetrievalError(f"{self.work}: the {name} embeddings are not finished; run the encode step first")
        if self.s.index not in srch.INDEXES:
            raise RetrievalError(f"--index must be one of {srch.INDEXES}, got {self.s.index!r}")
        if self.s.metric not in srch.METRICS:
            raise RetrievalError(f"--metric must be one of {srch.METRICS}, got {self.s.metric!r}")
        base = open_embeddings(self.d("emb", "corpus.npy"))
        queries = open_embeddings(self.d("emb", "queries.npy"))
        excluded = None
        if self.s.exclude_self:
            store = inp.ImageStore(self.d("images"))
            try:
                excluded = self._excluded(store.ids())
            finally:
                store.close()
        m = 0 if excluded is None else excluded.shape[1]
        k = self.s.top_k
        n = base.shape[0]
        if n - m < k:
            message = (
                f"the corpus has {n} usable sentences{f' ({m} may be excluded as an image’s own)' if m else ''}, fewer than --top-k {k}"
            )
            if not self.s.clip_top_k:
                raise RetrievalError(message + "; use a larger corpus, a smaller --top-k, or --clip-top-k to retrieve as many as there are")
            k = max(1, n - m)
            self.report.problem("corpus_smaller_than_k", message + f"; --clip-top-k: retrieving {k}")
        self.report.note("top_k", k)
        tag = self.search_tag()
        state = self.d("search", tag)
        self._force_clear("search", tag)
        result_path = os.path.join(state, "result.npz")
        kk = min(n, k + m)
        backend = self.s.search_backend
        if backend == "auto":
            backend = "torch" if self.device.startswith("cuda") else "faiss"
        settings = {"index": self.s.index, "metric": self.s.metric, "k": k, "exclude_self": self.s.exclude_self, "backend": backend}
        if not os.path.exists(result_path):
            def run():
                if self.s.index == "flat":
                    return srch.exact_search(
                        base, queries, kk, self.s.metric, self.s.shard_rows, self.s.query_block, backend, self.device, state_dir=state
                    )
                index = srch.build_ann_index(
                    base, self.s.index, self.s.metric, state, self.s.shard_rows, self.s.nlist, self.s.hnsw_m, self.s.ef_construction
                )
                scores, ids = srch.ann_search(index, self.s.index, queries, kk, self.s.metric, state, self.s.nprobe, self.s.ef_search, self.s.query_block)
                sample = min(self.s.recall_sample, queries.shape[0])
                if sample > 0:
                    rng = np.random.default_rng(0)
                    rows = np.sort(rng.choice(queries.shape[0], size=sample, replace=False))
                    _, exact_ids = srch.exact_search(base, np.asarray(queries[rows]), kk, self.s.metric, self.s.shard_rows, self.s.query_block, "faiss", "cpu", desc="recall check")
                    recall = srch.recall_at_k(ids[rows], exact_ids)
                    settings[f"recall@{kk}_vs_exact"] = round(recall, 4)
                    self.log(f"{self.s.index}: recall@{kk} against exact search on {sample} queries = {recall:.4f}")
                return scores, ids

            scores, ids = self._timed("search", run)
            scores, ids = srch.exclude_rows(scores, ids, excluded, k, self.s.metric)
            atomic_write_bytes(result_path, _npz(scores=scores.astype(np.float32), ids=ids, settings=np.array(json.dumps(settings))))
        else:
            settings = json.loads(str(np.load(result_path)["settings"]))
        for key, value in settings.items():
            if key.startswith("recall@"):
                self.report.note(key, value)
        atomic_write_json(self.d("search", "current.json"), {"tag": tag, "settings": settings})
        return result_path

    # ------------------------------------------------------------------ link
    def _search_result(self):
        """The search result ``link`` uses (``search/current.json``): its tag, corpus ids and scores (Q x K)."""
        current_path = self.d("search", "current.json")
        if not os.path.exists(current_path):
            raise RetrievalError(f"{self.work}: no search result here; run the search step first")
        current = read_json(current_path)
        result = np.load(self.d("search", current["tag"], "result.npz"))
        ids, scores = result["ids"], result["scores"]
        return current["tag"], ids, scores

    def _open_images(self, results):
        """The prepared images, refused unless there is one per search result (``results`` of them)."""
        images = inp.ImageStore(self.d("images"))
        if len(images) != results:
            images.close()
            raise RetrievalError(f"{self.work}: {len(images)} images but {results} search results; rerun the search step with --force")
        return images

    def _noun_phrases(self, corpus, rows, state):
        """The noun phrases of the corpus ``rows`` (spaCy, resumable in ``state``): ``{row: [phrase, ...]}``."""
        from mmf_multilevel.weak_corpus import link as lk
        from mmf_multilevel.weak_corpus.encoders import load_spacy

        return self._timed("noun_phrases", lambda: lk.extract_noun_phrases(
            lambda part: [corpus.text(r) for r in part], rows.tolist(), lambda: load_spacy(self.s.spacy, log=self.log), state,
            chunk_rows=self.s.np_chunk_rows, batch_size=self.s.spacy_batch_size, settings={"spacy": self.s.spacy},
            n_process=self.s.spacy_processes,
        ))

    def _encode_link_texts(self, state, phrase_list, tag_list, link_model):
        """Encode the noun phrases and the tags into ``state``; -> (phrase vectors, row-normalised tag vectors)."""
        from mmf_multilevel.weak_corpus import link as lk
        from mmf_multilevel.weak_corpus.embed import encode_to_memmap, open_embeddings

        self._timed("encode_phrases", lambda: encode_to_memmap(
            state, "phrases", len(phrase_list), lambda a, b: phrase_list[a:b], lambda: self.sbert(link_model), link_model,
            batch_size=self.s.batch_size, chunk_rows=self.s.chunk_rows, desc="encode noun phrases", source=len(phrase_list),
        ))
        encode_to_memmap(
            state, "tags", len(tag_list), lambda a, b: tag_list[a:b], lambda: self.sbert(link_model), link_model,
            batch_size=self.s.batch_size, chunk_rows=self.s.chunk_rows, desc="encode tags", source=len(tag_list),
        )
        phrase_vecs = open_embeddings(os.path.join(state, "phrases.npy"))  # float16 memmap, rows normalised on use
        tag_vecs = lk.normalize_rows(open_embeddings(os.path.join(state, "tags.npy")))
        return phrase_vecs, tag_vecs

    def _report_dropped(self, dropped):
        """Count and announce the images left out because no retrieved sentence has a noun phrase."""
        if dropped:
            self.report.counts["images_without_noun_phrase"] = dropped
            self.report.say(
                f"note: {dropped} image(s) dropped because none of their retrieved sentences has a noun phrase"
                + ("" if self.s.keep_no_phrase else " (keep them with --keep-no-phrase)")
            )

    def _write_output(self, parts):
        """Concatenate the output ``parts`` into ``--out`` and copy the tag vocabulary beside it."""
        with AtomicFile(self.s.out) as out:
            for part in parts:
                with open(part, encoding="utf-8") as f:
                    shutil.copyfileobj(f, out)
        vocab_path = _beside(self.s.out, ".tag_vocab.json")
        shutil.copyfile(self.d("images", "tag_vocab.json"), vocab_path + ".tmp")
        os.replace(vocab_path + ".tmp", vocab_path)

    def link(self):
        from mmf_multilevel.weak_corpus import link as lk

        if not self.s.out:
            raise RetrievalError("link: pass --out FILE.jsonl")
        tag, ids, scores = self._search_result()
        images = self._open_images(ids.shape[0])
        corpus = inp.CorpusText(self.d("corpus"))
        state = self.d("link", tag)
        self._force_clear("link", tag)
        link_model = self.s.link_sbert or self.s.sbert
        try:
            rows = np.unique(ids[ids >= 0])
            phrases_of = self._noun_phrases(corpus, rows, state)
            phrase_list = sorted({p for plist in phrases_of.values() for p in plist})
            tag_list = images.tags()
            phrase_vecs, tag_vecs = self._encode_link_texts(state, phrase_list, tag_list, link_model)
            phrase_index = {p: i for i, p in enumerate(phrase_list)}
            tag_index = {t: i for i, t in enumerate(tag_list)}
            image = _part_cached(images, self.s.part_rows)

            def make(i):
                valid = ids[i] >= 0
                rows_i, scores_i = ids[i][valid], scores[i][valid]
                if not any(phrases_of.get(int(r)) for r in rows_i) and not self.s.keep_no_phrase:
                    return None
                texts = [corpus.text(int(r)) for r in rows_i]
                return lk.build_record(image(i), rows_i, scores_i, texts, phrases_of, tag_index, tag_vecs, phrase_index, phrase_vecs, self.s.link_threshold)

            settings = {"threshold": self.s.link_threshold, "keep_no_phrase": self.s.keep_no_phrase, "link_sbert": link_model, "spacy": self.s.spacy}
            parts, counts = self._timed("link", lambda: lk.write_parts(images, self.s.part_rows, state, make, settings))
        finally:
            corpus.close()
            images.close()
        written = sum(c[0] for c in counts.values())
        dropped = sum(c[1] for c in counts.values())
        self._report_dropped(dropped)
        self._write_output(parts)
        self.report.note("records_written", written)
        self.report.note("images_dropped_no_noun_phrase", dropped)
        self.report.note("noun_phrases_unique", len(phrase_list))
        self.report.note("retrieved_sentences_unique", int(len(rows)))
        self.report.note("output", os.path.abspath(self.s.out))
        return self.s.out

    # ------------------------------------------------------------------ all
    def build(self):
        if not self.s.features or not self.s.corpus or not self.s.out:
            raise RetrievalError("build needs --features, --corpus and --out")
        self.encode()
        self.search()
        return self.link()

    def summary(self):
        out = self.report.summary()
        out["seconds"] = self.timings
        out["work"] = self.work
        return out

    def write_summary(self):
        summary = self.summary()
        if self.s.out:
            atomic_write_json(_beside(self.s.out, ".summary.json"), summary)
        return summary


def _beside(out, suffix):
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + suffix


def _part_cached(images, part_rows):
    """``image(i)``: the record of image ``i``, read with the rest of its output part (one read per part)."""
    cache = {"start": -1, "records": []}

    def image(i):
        start = (i // part_rows) * part_rows
        if cache["start"] != start:
            cache["records"] = images.slice(start, min(len(images), start + part_rows))
            cache["start"] = start
        return cache["records"][i - start]

    return image


def _npz(**arrays):
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def build(features, corpus, out, **options):
    """Library entry point: the whole build; returns the summary dict."""
    builder = Builder(Settings(features=features, corpus=corpus, out=out, **options))
    builder.build()
    return builder.write_summary()
