"""``load_predictor`` and :class:`Predictor`: a registered method's model on raw inputs, through the processors its
run config gives the dataset it was trained on.

The model is built as ``mmf_run`` builds it (:func:`mmf_multilevel.compat.launcher.load_run_config` and
:func:`mmf_multilevel.methods.base.load_method_model`); the query goes through the config's first dataset's own
processors (MMF's ``build_processors`` on ``dataset_config.<dataset>.processors``, as the dataset's
``init_processors`` builds them) and into the sample fields that dataset builds:

* pixel methods (SOHO, SIMLA; a ``*_images`` dataset with an ``image_processor``): the image decoded with the
  dataset's decode options, then :func:`mmf_multilevel.datasets.images.processed_image_fields` in its
  evaluation pipeline;
* region methods (SemVLP, μ-VLA, MVPTR): the image's regions from the ``image -> regions`` stage
  (:mod:`.regions`; by default the dataset's own region cache), then
  :func:`mmf_multilevel.datasets.base.region_record_fields`;
* the text: :func:`mmf_multilevel.datasets.base.tokenize` with the dataset's text processor.

MVPTR's datasets lay the text out as ``[CLS] words phrases [SEP]`` and add the image's tags; the predictor lays a
query out with the same code (:class:`~mmf_multilevel.methods.mvptr.data.MVPTRQueryInputs`): a raw text has no
concept-tool line, so it is read without phrases, as the datasets read a text their phrase file lacks.

So a prediction equals the model's output on the dataset's own sample of the same image and text, which is what
``mmf_run ... run_type=test`` scores.

:meth:`Predictor.align` gives the text's attention to the model's visual units from the model's own attention
(:class:`~.align.Alignment`); :meth:`Predictor.picture` draws it (:mod:`.pictures`).

:meth:`Predictor.retrieve_images` / :meth:`Predictor.retrieve_texts` rank a gallery of images or captions for one
query as the method's retrieval evaluation ranks (:mod:`.retrieve`).
"""
import contextlib
import glob
import os
import time
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mmf_multilevel.predict.align import Alignment, alignment_summary, cell_boxes, region_boxes
from mmf_multilevel.predict.inputs import PredictInputError, QueryImage, checked_text, optional_id, read_image
from mmf_multilevel.predict.regions import RegionCache, RegionSource

__all__ = ["Predictor", "load_predictor", "resolve_model", "PredictInputError", "Alignment"]

#: head types that answer questions from a classifier or a ranking over the dataset's answer vocabulary
VQA_HEAD_TYPES = ("classification", "vqa")
#: head types with an image-text matching head (a retrieval model's, or pre-training's ITM head on the clean pair:
#: :meth:`MethodModel.match_logits <mmf_multilevel.methods.base.MethodModel.match_logits>`)
MATCH_HEAD_TYPES = ("retrieval", "pretraining")
CONFIG_PATTERN = "*.yaml"


def resolve_model(name_or_config: str, checkpoint: Optional[str] = None, data_dir: Optional[str] = None):
    """``(config path, checkpoint path or None)`` of a run config file (with ``checkpoint`` as given), a folder
    holding one ``*.yaml`` run config and one checkpoint, or a model zoo name (downloaded into such a folder)."""
    from mmf_multilevel.zoo.zoo import CHECKPOINT_PATTERNS, ZooEntryError, download_model

    name_or_config = os.fspath(name_or_config)
    if os.path.isfile(name_or_config):
        if not name_or_config.endswith((".yaml", ".yml")):
            raise PredictInputError(f"--config {name_or_config}: expected a run config (.yaml), as mmf_run reads; "
                                    "pass the weights with --checkpoint")
        return name_or_config, checkpoint
    if os.path.isdir(name_or_config):
        folder = name_or_config
    elif os.sep in name_or_config or name_or_config.endswith((".yaml", ".yml")):
        raise FileNotFoundError(f"--model {name_or_config}: no such file or folder")
    else:
        try:
            folder = download_model(name_or_config, data_dir)
        except ZooEntryError as error:
            raise PredictInputError(f"--model {name_or_config}: not a file, a folder or a model zoo name ({error})"
                                    ) from None
    configs = sorted(glob.glob(os.path.join(folder, CONFIG_PATTERN)))
    if len(configs) != 1:
        raise PredictInputError(f"{folder}: expected exactly one run config ({CONFIG_PATTERN}) beside the checkpoint, "
                                f"found {[os.path.basename(p) for p in configs]}")
    if checkpoint is None:
        found = sorted(p for pattern in CHECKPOINT_PATTERNS for p in glob.glob(os.path.join(folder, pattern)))
        if len(found) != 1:
            raise PredictInputError(f"{folder}: expected exactly one checkpoint ({', '.join(CHECKPOINT_PATTERNS)}), "
                                    f"found {[os.path.basename(p) for p in found]}; pass --checkpoint")
        checkpoint = found[0]
    return configs[0], checkpoint


def load_predictor(name_or_config, checkpoint: Optional[str] = None, overrides: Sequence[str] = (),
                   regions: Union[None, str, RegionSource] = None, device: Optional[str] = None,
                   data_dir: Optional[str] = None) -> "Predictor":
    """A :class:`Predictor` for a run config (``checkpoint``: its weights; none: as built), a folder with a run
    config and a checkpoint, or a model zoo name. ``overrides``: as for ``mmf_run`` (``env.data_dir=...``).
    ``regions`` (region methods): a region cache path or a :class:`~.regions.RegionSource`; default: the
    dataset's own region cache."""
    from mmf_multilevel.compat.launcher import load_run_config
    from mmf_multilevel.methods.base import load_method_model

    config_path, checkpoint = resolve_model(name_or_config, checkpoint, data_dir)
    config = load_run_config(config_path, list(overrides))
    model = load_method_model(config, config.get("model"), checkpoint)
    return Predictor(model, config, regions=regions, device=device)


class Predictor:
    """One model and its dataset's processors: :meth:`vqa` and :meth:`match` on raw inputs, :meth:`align` and
    :meth:`picture` for the text's attention to the image."""

    def __init__(self, model, config, regions: Union[None, str, RegionSource] = None, device: Optional[str] = None):
        from mmf.utils.build import build_processors

        from mmf_multilevel.datasets.base import masks_text

        names = [n.strip() for n in str(config.get("datasets") or "").split(",") if n.strip()]
        if not names or names[0] not in (config.get("dataset_config") or {}):
            raise PredictInputError(f"the config's datasets ({config.get('datasets')!r}) name no dataset_config "
                                    "section: the predictor takes its processors from the first dataset's")
        self.config = config
        self.method = str(config.model)
        self.dataset_name = names[0]
        self.dataset_config = config.dataset_config[self.dataset_name]
        where = f"dataset_config.{self.dataset_name}.processors"
        if "processors" not in self.dataset_config:
            raise PredictInputError(f"{where} is not set: the predictor reads the dataset's processors")
        # built afresh (no registry key): the dataset's init_processors call, without reusing another run's
        processors = build_processors(self.dataset_config.processors, None, data_dir=self.dataset_config.data_dir)
        if "text_processor" not in processors:
            raise PredictInputError(f"{where} has no text_processor")
        self.text_processor = processors["text_processor"]
        if masks_text(self.text_processor):
            # a pre-training dataset's masked_token processor: this instance is the predictor's own, and a query's
            # words are never masked (set on MMF's processor itself: its Processor wrapper only reads through)
            getattr(self.text_processor, "processor", self.text_processor)._probability = 0.0
        self.answer_processor = processors.get("answer_processor")
        self.image_processor = processors.get("image_processor")
        self.visual = "pixels" if self.image_processor is not None else "regions"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.head_type = getattr(model, "head_type", None)
        self._regions = regions
        self._region_source = None
        self._mvptr_inputs = None
        self._mvptr_layout = _lays_out_mvptr(self.dataset_name)
        #: seconds per stage of the last call (``decode``, ``regions`` or ``pixels``, ``text``, ``model``; and
        #: ``drawing`` for :meth:`picture`)
        self.profile = {}
        if self.visual == "regions":
            from mmf_multilevel.datasets.base import REGION_DEFAULTS, setting_or_default

            self.max_features = int(setting_or_default(self.dataset_config, "max_features", REGION_DEFAULTS))
            self.feature_dim = self.dataset_config.get("feature_dim")

    # ------------------------------------------------------------------ inputs
    @property
    def region_source(self) -> RegionSource:
        if self._region_source is None:
            source = self._regions
            if source is None:
                from mmf_multilevel.datasets.base import data_path, split_entry

                paths = split_entry(self.dataset_config, "features", "test", self.dataset_name)
                paths = [paths] if isinstance(paths, str) else list(paths)
                source = data_path(paths[0], self.dataset_config.get("data_dir"))
            self._region_source = RegionCache(source) if isinstance(source, (str, os.PathLike)) else source
        return self._region_source

    @property
    def mvptr_inputs(self):
        """MVPTR's query layout (text and tags) with this dataset's settings, for an ``mvptr_*`` dataset."""
        if self._mvptr_inputs is None:
            from mmf_multilevel.methods.mvptr.data import MVPTRQueryInputs

            self._mvptr_inputs = MVPTRQueryInputs(
                self.dataset_name, self.dataset_config, self.text_processor,
                object_names=lambda: self.region_source.object_names(),
                source=f"the region source {getattr(self.region_source, 'path', type(self.region_source).__name__)}")
        return self._mvptr_inputs

    @contextlib.contextmanager
    def _stage(self, name: str):
        """Adds the wall time of the block to ``self.profile[name]`` (CUDA work synchronised first)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.profile[name] = self.profile.get(name, 0.0) + time.perf_counter() - start

    def _decode(self, image, where) -> QueryImage:
        with self._stage("decode"):
            return self._decode_image(image, where)

    def _decode_image(self, image, where) -> QueryImage:
        from mmf_multilevel.datasets.images import IMAGE_DEFAULTS

        def get(key):
            return self.dataset_config.get(key, IMAGE_DEFAULTS[key])

        background = get("alpha_background")
        return read_image(image, where, exif_transpose=bool(get("exif_transpose")),
                          alpha_background=None if background is None else tuple(background),
                          min_side=int(get("min_image_side")))

    def visual_sample(self, image=None, image_id=None, where: str = "image"):
        """A ``Sample`` with the query image's visual fields, as the dataset's ``attach_visual`` fills them."""
        return self._visual(image, image_id, where)[0]

    def _visual(self, image, image_id, where):
        """``(sample, the decoded QueryImage or None, the region record or None)`` of the query image."""
        from mmf.common.sample import Sample

        sample = Sample()
        image_id = optional_id(image_id)
        record = None
        if self.visual == "pixels":
            from mmf_multilevel.datasets.images import processed_image_fields

            if image is None:
                raise PredictInputError(f"{where}: {self.method} reads pixels; give an image (a path, encoded bytes or "
                                        "a PIL.Image)")
            query = self._decode(image, where)
            with self._stage("pixels"):
                processed_image_fields(self.image_processor, query.picture, sample, "image", train=False,
                                       image_id=image_id)
        else:
            from mmf_multilevel.datasets.base import region_record_fields

            query = self._decode(image, where) if image is not None else None
            with self._stage("regions"):
                record = self.region_source(query, image_id)
                source = getattr(self.region_source, "path", type(self.region_source).__name__)
                sample.image_feature_0, sample.image_info_0 = region_record_fields(
                    record, image_id or (query.sha256 if query else "?"), self.max_features, self.feature_dim, source)
                if self._mvptr_layout:  # the image's tags in MVPTR's visual encoder
                    self.mvptr_inputs.add_query_tags(record, sample)
        sample.id = torch.tensor(0, dtype=torch.long)
        return sample, query, record

    def text_fields(self, text: str, where: str = "text") -> dict:
        from mmf_multilevel.datasets.base import tokenize

        with self._stage("text"):
            text = checked_text(text, where)
            if self._mvptr_layout:
                return dict(self.mvptr_inputs.text_sample(text))
            return tokenize(self.text_processor, text)

    def _batch(self, samples):
        """``samples`` collated as MMF collates a test batch, on the model's device."""
        from mmf.common.sample import SampleList

        batch = SampleList(list(samples))
        batch.dataset_name = self.dataset_name
        batch.dataset_type = "test"
        return batch.to(self.device)

    def _run_model(self, call, samples):
        """``call(batch)`` on ``samples`` collated as a test batch, timed as the ``model`` stage."""
        batch = self._batch(samples)
        with warnings.catch_warnings(), self._stage("model"):
            warnings.filterwarnings("ignore", message=".*has not field 'targets'.*")
            return call(batch)

    @torch.no_grad()
    def forward(self, samples):
        """The model's output on ``samples`` collated as MMF collates a test batch."""
        return self._run_model(self.model, samples)

    def _require(self, task: str, head_types) -> None:
        if self.head_type not in head_types:
            raise PredictInputError(f"{task} needs a {self.method} model with training_head_type in {list(head_types)}; "
                                    f"this one is {self.head_type!r} (model_config.{self.method}.training_head_type "
                                    f"of the run config)")

    # ------------------------------------------------------------------ tasks
    def vqa(self, image=None, question: str = "", top_k: int = 5, image_id=None) -> dict:
        """The answer to ``question`` about ``image`` (a path, encoded bytes or a ``PIL.Image``; region methods may
        name the image by ``image_id`` in the region cache instead), with the ``top_k`` answers and their scores
        (the model's ``scores`` as ``mmf_run`` evaluates them: logits, or SIMLA's answer log-likelihoods)."""
        self.profile = {}
        self._require("vqa", VQA_HEAD_TYPES)
        if self.answer_processor is None:
            raise PredictInputError(f"dataset_config.{self.dataset_name}.processors has no answer_processor: vqa "
                                    "needs a question-answering project")
        if not isinstance(top_k, int) or top_k < 1:
            raise PredictInputError(f"top_k: expected a positive integer, got {top_k!r}")
        text = self.text_fields(question, "question")
        sample = self.visual_sample(image, image_id)
        sample.update(text)
        sample.question_id = torch.tensor(0, dtype=torch.long)
        scores = self.forward([sample])["scores"][0].float().cpu()
        vocabulary = int(self.answer_processor.get_vocab_size())
        if scores.numel() != vocabulary:
            raise PredictInputError(f"the model scores {scores.numel()} answers but the answer vocabulary of "
                                    f"dataset_config.{self.dataset_name} has {vocabulary}: not the config it was "
                                    "trained with")
        ranked = ranked_answers(scores, min(top_k, vocabulary))
        answers = [{"answer": self.answer_processor.idx2word(index), "score": score} for index, score in ranked]
        return {"question": question, "answer": answers[0]["answer"], "score": answers[0]["score"],
                "top_k": answers, "scores": scores}

    def match(self, image=None, text: str = "", image_id=None) -> dict:
        """How well ``text`` matches ``image``: the matching head's score (:func:`mmf_multilevel.metrics.
        pair_match_scores`: a 2-way head's log-odds, or a single logit); ``probability`` is its sigmoid. A
        ``retrieval`` model scores as ``mmf_run``'s retrieval evaluation ranks pairs; a ``pretraining`` model with
        its image-text matching head on the clean pair (:meth:`MethodModel.match_logits
        <mmf_multilevel.methods.base.MethodModel.match_logits>`)."""
        from mmf_multilevel.metrics import pair_match_scores

        self.profile = {}
        self._require("match", MATCH_HEAD_TYPES)
        fields = self.text_fields(text, "text")
        sample = self.visual_sample(image, image_id)
        sample.update(fields)
        # a gallery pair, as the retrieval datasets' evaluation samples are
        sample.pair_image_index = torch.tensor(0, dtype=torch.long)
        sample.pair_text_index = torch.tensor(0, dtype=torch.long)
        with torch.no_grad():
            logits = self._run_model(self.model.match_logits, [sample])
        score = float(pair_match_scores(logits.float().cpu())[0])
        return {"text": text, "score": score, "probability": float(torch.sigmoid(torch.tensor(score)))}

    def align(self, image=None, text: str = "", image_id=None) -> Alignment:
        """The attention of ``text``'s word pieces to the model's visual units of ``image`` (a path, encoded bytes or
        a ``PIL.Image``; region methods may name it by ``image_id`` instead), read from the layer the method names
        (:meth:`MethodModel.alignment <mmf_multilevel.methods.base.MethodModel.alignment>`): an
        :class:`~.align.Alignment` with each unit's box in the image's pixels. Any head type; no head runs."""
        self.profile = {}
        fields = self.text_fields(text, "text")
        sample, query, _ = self._visual(image, image_id, "image")
        sample.update(fields)
        out = self._run_model(self.model.alignment, [sample])
        picture = np.asarray(query.picture.convert("RGB"), dtype=np.uint8) if query is not None else None
        columns = np.flatnonzero(out["visual_valid"].bool().cpu().numpy())  # the real units; padding dropped
        if self.visual == "pixels":
            size = tuple(query.picture.size)
            grid, cell = out["grid"], out["cell"]
            boxes = cell_boxes(grid, cell, [int(n) for n in sample["image_size"]], size)
            name = "patch" if self.method == "simla" else "cell"
            units = [f"{name} {r},{c}" for r, c in (divmod(k, int(grid[1])) for k in range(len(boxes)))]
            labels = None
        else:
            info = sample["image_info_0"]
            count = int(info["max_features"])
            if columns.tolist() != list(range(count)):
                raise RuntimeError(f"{self.method}.alignment marks units {columns.tolist()} real but the region record "
                                   f"has {count} regions")
            width, height = int(info["image_width"]), int(info["image_height"])
            size = tuple(query.picture.size) if query is not None else (width, height)
            boxes = region_boxes(info["bbox"][:count].numpy(), width, height, size)
            units = [f"region {k}" for k in range(count)]
            labels = self._region_labels(info, count)
        ids = sample["input_ids"]
        structural = self._structural_ids()
        rows = [row for row, position in enumerate(out["text_positions"].tolist()) if int(ids[position]) not in structural]
        positions = [int(out["text_positions"][row]) for row in rows]
        weights = out["weights"].float().cpu().numpy()[rows][:, columns]
        return Alignment(method=self.method, text=text, tokens=self._tokens([int(ids[p]) for p in positions]),
                         weights=weights.astype(np.float32), boxes=np.asarray(boxes)[columns],
                         units=[units[k] for k in columns], labels=[labels[k] for k in columns] if labels else None,
                         picture=picture, size=(int(size[0]), int(size[1])), source=str(out["source"]))

    def picture(self, image=None, text: str = "", png_path: str = "", html_path: Optional[str] = None,
                image_id=None, top: int = 3) -> dict:
        """:meth:`align`, then its picture written to ``png_path`` (and a self-contained HTML page to ``html_path``)
        by :func:`~.pictures.write_alignment`; ``profile`` times the stages, the drawing as ``drawing``. Returns
        ``{"picture", "html", "alignment"}``: the paths and :func:`~.align.alignment_summary` (per word, its
        ``top`` units with weights and boxes)."""
        from mmf_multilevel.predict.pictures import check_paths, write_alignment

        check_paths(png_path, html_path)
        alignment = self.align(image, text, image_id)
        with self._stage("drawing"):
            paths = write_alignment(alignment, png_path, html_path, top=top)
        return {**paths, "alignment": alignment_summary(alignment, top)}

    def nlvr2(self, left_image=None, right_image=None, statement: str = "", left_image_id=None,
              right_image_id=None) -> dict:
        """Whether ``statement`` is true of the image pair, by an ``nlvr2`` head, the pair laid out as the config's
        NLVR2 dataset lays it out (:func:`.tasks.nlvr2`): ``{"statement", "label", "probability", "score",
        "scores"}``."""
        from mmf_multilevel.predict.tasks import nlvr2

        return nlvr2(self, left_image, right_image, statement, left_image_id, right_image_id)

    def ground(self, image=None, expression: str = "", image_id=None, top_k: int = 3) -> dict:
        """The proposal of ``image`` that ``expression`` refers to, chosen as ``refcoco_accuracy`` chooses it
        (:func:`.tasks.ground`): ``box`` ``[x0, y0, x1, y1]`` in the image's pixels, its ``score`` and the
        ``top_k`` proposals."""
        from mmf_multilevel.predict.tasks import ground

        return ground(self, image, expression, image_id, top_k)

    def retrieve_images(self, text: str = "", images=None, top_k: int = 5, cache=None, batch_size: int = 32,
                        image_ids=None, progress=None) -> dict:
        """A gallery of images ranked for ``text``: ``images`` a folder (every image file in it, sorted) or a list of
        paths, encoded bytes or PIL images; region methods may give ``image_ids`` of the region cache instead.
        Scored as the method's retrieval evaluation scores (the matching head on every pair, or its dual encoder's
        similarity and re-ranking), the gallery's embeddings kept in ``cache`` (a folder; dual encoders); see
        :mod:`.retrieve`. Returns the ``top_k`` best (``results``: ``rank``, ``image``, ``score``), ``gallery_size``
        and the ``skipped`` files."""
        from mmf_multilevel.predict.retrieve import retrieve_images

        return retrieve_images(self, text, images, top_k=top_k, cache=cache, batch_size=batch_size,
                               image_ids=image_ids, progress=progress)

    def retrieve_texts(self, image=None, texts=(), top_k: int = 5, cache=None, batch_size: int = 32,
                       image_id=None, progress=None) -> dict:
        """Captions ranked for ``image`` (region methods: or ``image_id``): ``texts`` a list or a ``.txt`` file,
        one a line; as :meth:`retrieve_images` otherwise (``results``: ``rank``, ``text``, ``score``)."""
        from mmf_multilevel.predict.retrieve import retrieve_texts

        return retrieve_texts(self, image, texts, top_k=top_k, cache=cache, batch_size=batch_size,
                              image_id=image_id, progress=progress)

    def signal(self, image=None, text: Optional[str] = None, image_id=None):
        """The method's own grounding signal of ``image`` and ``text`` (:mod:`.signals`: MVPTR's phrase-region scores,
        SIMLA's Grad-CAM per expression and word, SOHO's dictionary ids of the image's cells), computed by the method's
        picture module on this predictor's sample: a :class:`~.signals.Signal`. A method without one (SemVLP, μ-VLA)
        raises a :class:`PredictInputError` pointing to :meth:`picture`."""
        from mmf_multilevel.predict.signals import method_signal

        self.profile = {}
        return method_signal(self, image, text, image_id)

    def signal_picture(self, image=None, text: Optional[str] = None, png_path: str = "",
                       html_path: Optional[str] = None, image_id=None, top: int = 3) -> dict:
        """:meth:`signal`, then the method's own picture of it written to ``png_path`` (and a self-contained HTML page
        to ``html_path``); ``profile`` times the drawing as ``drawing``. Returns ``{"picture", "html", "signal"}``: the
        paths and the signal's summary (per phrase or word its ``top`` units, or the grid's ids)."""
        from mmf_multilevel.predict.pictures import check_paths
        from mmf_multilevel.predict.signals import write_signal

        check_paths(png_path, html_path)
        signal = self.signal(image, text, image_id)
        with self._stage("drawing"):
            paths = write_signal(signal, png_path, html_path, top)
        return {**paths, "signal": signal.summary(top)}

    # ------------------------------------------------------------------ tokens and labels
    @property
    def tokenizer(self):
        tokenizer = getattr(self.text_processor, "_tokenizer", None)
        if tokenizer is None:
            raise PredictInputError(f"dataset_config.{self.dataset_name}.processors.text_processor has no word-piece "
                                    "tokenizer (a bert_tokenizer processor): the alignment names its rows with it")
        return tokenizer

    def _structural_ids(self) -> set:
        tokenizer = self.tokenizer
        return {i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) if i is not None}

    def _tokens(self, ids) -> list:
        """Word pieces of ``ids``; an id past the tokenizer's vocabulary (an MVPTR phrase concept) is named by id."""
        size = len(self.tokenizer)
        return [self.tokenizer.convert_ids_to_tokens(i) if i < size else f"[concept {i}]" for i in ids]

    def _region_labels(self, info, count: int) -> Optional[list]:
        """The class names of the record's regions (``objects``), or None when it has none."""
        if "objects" not in info:
            return None
        names = self.region_source.object_names() or []
        return [names[i] if 0 <= i < len(names) else f"class {i}" for i in info["objects"][:count].tolist()]


def _lays_out_mvptr(dataset_name: str) -> bool:
    """Whether the registered dataset builds MVPTR's inputs (``mvptr_*``: phrases in the text, the image's tags)."""
    from mmf.common.registry import registry

    from mmf_multilevel.methods.mvptr.data import MVPTRInputs

    builder = registry.get_builder_class(dataset_name)
    dataset_class = getattr(builder, "dataset_class", None)
    return isinstance(dataset_class, type) and issubclass(dataset_class, MVPTRInputs)


def ranked_answers(scores: torch.Tensor, top_k: int):
    """``[(index, score)]`` of the ``top_k`` highest ``scores``, best first; answers a ranking left out
    (SIMLA's :data:`~mmf_multilevel.methods.simla.downstream.NOT_RANKED`) are not listed."""
    from mmf_multilevel.methods.simla.downstream import NOT_RANKED

    values, indices = scores.topk(top_k)
    ranked = [(int(i), float(v)) for v, i in zip(values, indices) if float(v) > NOT_RANKED]
    return ranked or [(int(indices[0]), float(values[0]))]
