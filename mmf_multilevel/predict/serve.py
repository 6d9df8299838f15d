"""``mmf_ml_serve``: a local web page to try a model. Upload an image or pick a demo image, and ask what the model's
head answers, with the answer's scores, the pictures and the seconds of each stage:

* a VQA model: a question; the answer and the top-k answers;
* an image-text matching model (``retrieval``, or a ``pretraining`` model's ITM head): captions, ranked for the
  image; or, with no image, one caption and the demo images ranked for it (:meth:`Predictor.retrieve_images`);
* an NLVR2 model: a second image and a statement; true or false with its probability;
* a grounding model (``refcoco``, SIMLA's ``grounding``, ``visual_bert_grounding``): a referring expression; the
  chosen proposal drawn on the image with the runner-up proposals.

The pictures: the alignment picture (the image's boxes and, per word, the visual units it attends to), and, for a
method with a grounding signal of its own (MVPTR's phrase-region scores, SIMLA's Grad-CAM, SOHO's dictionary ids),
that signal's picture (:meth:`Predictor.signal_picture`).

    mmf_ml_serve --config projects/semvlp/demo/vqa.yaml --checkpoint save/semvlp_demo/vqa/semvlp_final.pth \\
        --demo-images data/demo/images env.data_dir=$PWD/data
    # then open http://127.0.0.1:8000

The model is loaded once, as ``mmf_ml_predict`` loads it (:func:`~mmf_multilevel.predict.load_predictor`, the same
``--model`` / ``--config`` / ``--checkpoint`` / ``--regions`` / ``--detector`` options), and every request goes
through the same :class:`~mmf_multilevel.predict.Predictor`, so the page answers what the command answers.

Built on FastAPI (an ASGI app served by uvicorn) with one plain HTML page (``page.html``: no front-end build, no
script or style from another site): the page needs one form, one JSON endpoint and an image, which is all
FastAPI has to give; gradio would bring a front-end framework and a few hundred MB of dependencies for the same.

What the server guards:

* it binds 127.0.0.1 unless ``--host`` says otherwise;
* an upload is read into memory (Starlette spools a large one to an unnamed temporary file, deleted when the
  request ends), at most ``--max-upload-mb``; an image of more than ``--max-pixels`` pixels is refused from its
  header, before decoding; a file that is not an image, an empty or over-long question, too many captions and
  an unknown model or demo image name, and a field the model's task does not read are answered with a message
  (HTTP 400) the page shows;
* the pictures are drawn into a per-request folder inside the server's own temporary folder, sent inline (a
  ``data:`` URL) and deleted with the folder before the answer leaves;
* no path on the server is readable through the page: demo images are served by name from the list the server
  was started with, error messages name the upload by its client-side name, and any server path in a message
  (a region cache the predictor read, say) is reduced to its file name (:func:`public_message`);
* one request runs the model at a time (a lock); a request that waits longer than ``--busy-seconds`` is answered
  503 ("busy, try again"), and a failure inside the model is answered 500 with its message while the server
  keeps serving.
"""
import argparse
import base64
import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from mmf_multilevel.predict.inputs import MAX_TEXT_CHARS, PredictInputError

__all__ = ["ModelServer", "ServeError", "create_app", "main", "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_UPLOAD_MB = 20
MAX_PIXELS = 40_000_000
MAX_CAPTIONS = 16
BUSY_SECONDS = 60.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
LOG = logging.getLogger("mmf_ml_serve")


class ServeError(ValueError):
    """A request the server answers with ``status`` and this message (shown on the page)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


#: an absolute path in a message (at least one folder): replaced by its last part before the page shows it
SERVER_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"():,/]+/)+([^\s'\"():,/]+)")


def public_message(message: str) -> str:
    """``message`` as the page may show it: every absolute path on the server reduced to its file name (a
    predictor's error names the region cache or image file it read; the page names no server path)."""
    return SERVER_PATH.sub(r"\1", message)


def demo_image_table(folder: Optional[str], limit: int = 200) -> Dict[str, str]:
    """``{file name: path}`` of the images directly in ``folder`` (sorted, at most ``limit``): the only files the
    page can name."""
    if folder is None:
        return {}
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--demo-images {folder}: no such folder (a folder of images the page offers)")
    names = sorted(name for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name)))
    if not names:
        raise FileNotFoundError(f"--demo-images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return {name: os.path.join(folder, name) for name in names[:limit]}


def image_pixels(data: bytes, where: str, max_pixels: int) -> None:
    """Refuses an image of more than ``max_pixels`` pixels from its header, before anything is decoded. Pillow's
    own decompression-bomb check is lifted for the header read only (the caller holds the model's lock, the only
    place the server decodes images), so the message can give the image's size."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # not an image: read_image says so with the decoder's words
        return
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if width * height > max_pixels:
        raise ServeError(f"{where}: the image is {width:,} x {height:,} pixels ({width * height:,}); this server "
                         f"takes at most {max_pixels:,} pixels (--max-pixels)")


class ModelServer:
    """The work behind the page, without the web framework: one :class:`~mmf_multilevel.predict.Predictor`,
    the demo images it may name, the limits, the lock and the temporary folder."""

    def __init__(self, predictor, name: str, demo_images: Optional[Dict[str, str]] = None, pictures: bool = True,
                 max_upload_bytes: int = MAX_UPLOAD_MB * 2 ** 20, max_pixels: int = MAX_PIXELS,
                 max_captions: int = MAX_CAPTIONS, busy_seconds: float = BUSY_SECONDS, top_k: int = 5,
                 detects: Optional[bool] = None):
        from mmf_multilevel.predict.predictor import MATCH_HEAD_TYPES, VQA_HEAD_TYPES
        from mmf_multilevel.predict.tasks import GROUND_HEAD_TYPES, NLVR2_HEAD_TYPES, REGION_SCORER_METHODS

        self.predictor = predictor
        self.name = name
        self.demo_images = dict(demo_images or {})
        self.pictures = bool(pictures) and hasattr(predictor, "picture")
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        self.max_captions = int(max_captions)
        self.busy_seconds = float(busy_seconds)
        self.top_k = int(top_k)
        if predictor.head_type in GROUND_HEAD_TYPES or predictor.method in REGION_SCORER_METHODS:
            self.task = "ground"
        elif predictor.head_type in VQA_HEAD_TYPES:
            self.task = "vqa"
        elif predictor.head_type in MATCH_HEAD_TYPES:
            self.task = "match"
        elif predictor.head_type in NLVR2_HEAD_TYPES:
            self.task = "nlvr2"
        else:
            raise PredictInputError(f"{name}: the page asks VQA models (training_head_type in {list(VQA_HEAD_TYPES)}), "
                                    f"matching models ({list(MATCH_HEAD_TYPES)}), NLVR2 models "
                                    f"({list(NLVR2_HEAD_TYPES)}) and grounding models ({list(GROUND_HEAD_TYPES)}); "
                                    f"this {predictor.method} model is {predictor.head_type!r}")
        #: the method's own grounding signal is drawn beside the alignment picture
        self.signals = self.pictures and getattr(predictor.model, "signal_module", None) is not None
        # region methods without a detector read the regions of the images the region cache holds, by image id
        from mmf_multilevel.predict.regions import RegionCache

        if detects is None:
            detects = predictor.visual == "pixels" or not isinstance(predictor.region_source, RegionCache)
        self.detects = bool(detects)
        self._lock = threading.Lock()
        self._temp = tempfile.TemporaryDirectory(prefix="mmf_ml_serve-")
        self.temp_root = self._temp.name

    def close(self) -> None:
        self._temp.cleanup()

    def info(self) -> dict:
        return {"model": self.name, "method": self.predictor.method, "task": self.task,
                "visual": self.predictor.visual, "uploads": self.detects, "pictures": self.pictures,
                "signals": self.signals,
                "demo_images": sorted(self.demo_images),
                "limits": {"upload_mb": round(self.max_upload_bytes / 2 ** 20, 1), "pixels": self.max_pixels,
                           "text_chars": MAX_TEXT_CHARS, "captions": self.max_captions}}

    def demo_image(self, name: str) -> str:
        """The path of the demo image ``name`` (a key of the table the server was started with)."""
        path = self.demo_images.get(name)
        if path is None:
            raise ServeError(f"no demo image named {name[:80]!r} (the page offers {len(self.demo_images)})", 404)
        return path

    @contextlib.contextmanager
    def _turn(self):
        if not self._lock.acquire(timeout=self.busy_seconds):
            raise ServeError(f"the model is busy with other requests (waited {self.busy_seconds:g} s); try again", 503)
        try:
            yield
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ a request
    def _texts(self, fields: Dict[str, Optional[str]]) -> List[str]:
        """The request's text(s) for this model's task: the one field it reads, non-empty; any other text field
        given is refused with the field this model reads instead."""
        wanted = TEXT_FIELDS[self.task]
        for field, value in fields.items():
            if field != wanted and value and value.strip():
                raise ServeError(f"this is {TASK_WORDS[self.task]} model: {PROMPTS[self.task]} (the {field} box is "
                                 f"for {FIELD_MODELS[field]} models)")
        value = fields.get(wanted)
        if self.task != "match":
            if value is None or not value.strip():
                raise ServeError(f"{wanted}: {PROMPTS[self.task]}")
            return [value]
        texts = [line.strip() for line in (value or "").splitlines() if line.strip()]
        if not texts:
            raise ServeError("captions: give at least one caption (one per line)")
        if len(texts) > self.max_captions:
            raise ServeError(f"captions: {len(texts)} lines; at most {self.max_captions} per request")
        return texts

    def _image(self, upload: Optional[bytes], upload_name: Optional[str], demo: Optional[str], which: str = "image"):
        """``(encoded bytes, how messages name it, image id or None)`` of the request's image (``which``: the
        first image, or NLVR2's ``second image``), or None when the request gives none."""
        if upload is not None and demo:
            raise ServeError(f"{which}: give an uploaded image or a demo image, not both")
        if upload is not None:  # an empty one is refused by the decoder ("empty file (0 bytes)")
            shown = os.path.basename(upload_name or "")[:80] or "upload"
            if not self.detects:
                raise ServeError(f"uploaded image {shown!r}: this {self.predictor.method} model reads regions from "
                                 "its region cache, which holds the demo images only; pick a demo image, or start "
                                 "the server with --detector to detect regions on uploads")
            return upload, f"uploaded image {shown!r}", None
        if demo:
            path = self.demo_image(demo)
            with open(path, "rb") as handle:
                data = handle.read()
            return data, f"demo image {demo!r}", self._demo_id(demo)
        return None

    def _demo_id(self, name: str) -> Optional[str]:
        """The image id a demo image is queried with: its file name's stem, the key of the demo region cache (a
        region model reading that cache; a pixel model's proposals for grounding), or None for a region model that
        detects regions itself (its detector keys its cache by the image's SHA-256)."""
        if self.detects and self.predictor.visual == "regions":
            return None
        return os.path.splitext(name)[0]

    def answer(self, question: Optional[str] = None, captions: Optional[str] = None, upload: Optional[bytes] = None,
               upload_name: Optional[str] = None, demo: Optional[str] = None, model: Optional[str] = None,
               statement: Optional[str] = None, expression: Optional[str] = None, upload2: Optional[bytes] = None,
               upload2_name: Optional[str] = None, demo2: Optional[str] = None) -> dict:
        """The page's answer to one request, as a JSON-able dict; :class:`ServeError` for a bad request."""
        start = time.perf_counter()
        if model and model != self.name:
            raise ServeError(f"model {model[:80]!r}: this server serves {self.name!r} only")
        texts = self._texts({"question": question, "captions": captions, "statement": statement,
                             "expression": expression})
        for payload in (upload, upload2):
            if payload is not None and len(payload) > self.max_upload_bytes:
                raise ServeError(f"the upload is {len(payload) / 2 ** 20:.1f} MB or more; at most "
                                 f"{self.max_upload_bytes / 2 ** 20:.1f} MB", 413)
        first = self._image(upload, upload_name, demo)
        second = self._image(upload2, upload2_name, demo2, "second image")
        if self.task == "nlvr2":
            if first is None or second is None:
                raise ServeError("images: NLVR2 reads a pair; give a first (left) and a second (right) image, each "
                                 "uploaded or picked from the demo images")
        elif second is not None:
            raise ServeError(f"second image: only NLVR2 models read a second image; this is {TASK_WORDS[self.task]} "
                             "model")
        retrieving = self.task == "match" and first is None
        if first is None and not retrieving:
            raise ServeError("image: upload an image or pick a demo image")
        if retrieving:
            if not self.demo_images:
                raise ServeError("image: upload an image or pick a demo image (this server has no demo images to "
                                 "rank for a caption)")
            if len(texts) != 1:
                raise ServeError(f"captions: with no image the page ranks the demo images for one caption; got "
                                 f"{len(texts)} lines (pick an image to rank captions)")
        with self._turn(), tempfile.TemporaryDirectory(dir=self.temp_root, prefix="request-") as folder:
            profile: Dict[str, float] = {}
            result = {"model": self.name, "method": self.predictor.method, "task": self.task}
            if retrieving:
                query, image_id = self._retrieve(texts[0], result, profile)
            else:
                query, image_id = self._decoded(first, result, profile, "image")
                if self.task == "vqa":
                    self._vqa(query, texts[0], image_id, result, profile)
                elif self.task == "match":
                    self._match(query, texts, image_id, result, profile)
                elif self.task == "nlvr2":
                    other, other_id = self._decoded(second, result, profile, "image2")
                    self._nlvr2(query, image_id, other, other_id, texts[0], result, profile)
                else:
                    self._ground(query, texts[0], image_id, result, profile, folder)
            if self.pictures and self.task in ("vqa", "match"):
                self._pictures(query, result["picture_text"], image_id, result, profile, folder)
        profile["total"] = time.perf_counter() - start
        result["profile"] = {stage: round(seconds, 4) for stage, seconds in profile.items()}
        return result

    # ------------------------------------------------------------------ the tasks
    def _add(self, profile: Dict[str, float], rename: Optional[Dict[str, str]] = None) -> None:
        """The predictor's last call's stages into ``profile`` (decoding is timed here, once per image)."""
        for stage, seconds in self.predictor.profile.items():
            if stage != "decode":
                key = (rename or {}).get(stage, stage)
                profile[key] = profile.get(key, 0.0) + seconds

    def _decoded(self, image, result, profile, key):
        data, where, image_id = image
        image_pixels(data, where, self.max_pixels)
        decode_start = time.perf_counter()
        query = self.predictor._decode_image(data, where)
        profile["decode"] = profile.get("decode", 0.0) + time.perf_counter() - decode_start
        result[key] = {"name": where, "width": query.picture.size[0], "height": query.picture.size[1]}
        return query, image_id

    def _vqa(self, query, question, image_id, result, profile) -> None:
        answer = self.predictor.vqa(query, question, top_k=self.top_k, image_id=image_id)
        self._add(profile)
        result.update(question=question, answer=answer["answer"], score=answer["score"], top_k=answer["top_k"],
                      picture_text=question)

    def _match(self, query, texts, image_id, result, profile) -> None:
        scored = []
        for text in texts:
            match = self.predictor.match(query, text, image_id=image_id)
            self._add(profile)
            scored.append({"text": text, "score": match["score"], "probability": match["probability"]})
        scored.sort(key=lambda item: -item["score"])
        result.update(captions=scored, picture_text=scored[0]["text"])

    def _retrieve(self, text, result, profile):
        """The demo images ranked for ``text``; returns the best one, decoded, for the pictures."""
        names = sorted(self.demo_images)
        if self.detects:
            ranked = self.predictor.retrieve_images(text, [self.demo_images[n] for n in names], top_k=self.top_k)
        else:
            ranked = self.predictor.retrieve_images(text, image_ids=[self._demo_id(n) for n in names],
                                                    top_k=self.top_k)
        self._add(profile)
        # a dual encoder lists the images past its re-ranked top k by similarity, with score None
        images = [{"rank": item["rank"], "image": names[item["index"]], "score": item["score"],
                   "similarity": item.get("similarity")} for item in ranked["results"]]
        result.update(text=text, images=images, gallery_size=ranked["gallery_size"], scoring=ranked["scoring"],
                      picture_text=text)
        return self._decoded(self._image(None, None, images[0]["image"]), result, profile, "image")

    def _nlvr2(self, left, left_id, right, right_id, statement, result, profile) -> None:
        answer = self.predictor.nlvr2(left, right, statement, left_image_id=left_id, right_image_id=right_id)
        self._add(profile)
        result.update(statement=statement, label=answer["label"], probability=answer["probability"],
                      score=answer["score"])

    def _ground(self, query, expression, image_id, result, profile, folder) -> None:
        from mmf_multilevel.predict.tasks import ground_picture

        png = os.path.join(folder, "grounding.png")
        if self.pictures:
            answer = ground_picture(self.predictor, query, expression, png, image_id=image_id, top_k=self.top_k)
        else:
            answer = self.predictor.ground(query, expression, image_id=image_id, top_k=self.top_k)
        self._add(profile)
        result.update(expression=expression, box=answer["box"], score=answer["score"], label=answer["label"],
                      top_k=[{key: item[key] for key in ("index", "box", "score", "label")} for item in answer["top_k"]],
                      picture_text=expression)
        if self.pictures:
            result["picture"] = _data_url(png)
        if self.signals:
            self._signal(query, expression, image_id, result, profile, folder)

    def _pictures(self, query, text, image_id, result, profile, folder) -> None:
        png = os.path.join(folder, "alignment.png")
        summary = self.predictor.picture(query, text, png, image_id=image_id)
        self._add(profile, PICTURE_STAGES)
        result["picture"] = _data_url(png)
        result["alignment"] = {key: value for key, value in summary.items()
                               if key not in ("png", "html", "picture", "path")}
        if self.signals:
            self._signal(query, text, image_id, result, profile, folder)

    def _signal(self, query, text, image_id, result, profile, folder) -> None:
        """The method's own grounding signal's picture; a signal this model cannot give (e.g. SIMLA's Grad-CAM
        layer outside the model) is said on the page beside the answer, not as a failed request."""
        png = os.path.join(folder, "signal.png")
        try:
            self.predictor.signal_picture(query, text, png, image_id=image_id)
        except (PredictInputError, ValueError) as error:
            result["signal_error"] = public_message(str(error))
            return
        self._add(profile, {"model": "signal", "text": "signal", "regions": "signal", "pixels": "signal",
                            "drawing": "signal drawing"})
        result["signal"] = _data_url(png)


#: the text field each task reads; what a sentence calls the model; what the page asks for
TEXT_FIELDS = {"vqa": "question", "match": "captions", "nlvr2": "statement", "ground": "expression"}
TASK_WORDS = {"vqa": "a VQA", "match": "an image-text matching", "nlvr2": "an NLVR2", "ground": "a grounding"}
PROMPTS = {"vqa": "type a question about the image", "match": "give captions, one per line",
           "nlvr2": "type a statement about the two images", "ground": "type an expression that names one thing "
                                                                       "in the image"}
FIELD_MODELS = {"question": "VQA", "captions": "matching", "statement": "NLVR2", "expression": "grounding"}
#: the predictor's stages while it draws the alignment picture, as the page names them
PICTURE_STAGES = {"model": "alignment", "text": "alignment", "regions": "alignment", "pixels": "alignment"}


def _data_url(png_path: str) -> str:
    with open(png_path, "rb") as handle:
        return "data:image/png;base64," + base64.b64encode(handle.read()).decode("ascii")


def create_app(server: ModelServer):
    """The FastAPI app of the page: ``GET /`` (the page), ``GET /api/info``, ``GET /api/demo/{name}`` (a demo
    image, by name) and ``POST /api/predict`` (a multipart form: ``image`` or ``demo``; NLVR2's ``image2`` or
    ``demo2``; the task's text: ``question``, ``captions``, ``statement`` or ``expression``; optional ``model``)."""
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    app = FastAPI(title="mmf_ml_serve", docs_url=None, redoc_url=None, openapi_url=None)
    with open(PAGE, encoding="utf-8") as handle:
        page = handle.read()

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError):
        return JSONResponse({"error": public_message(str(error))}, status_code=error.status)

    @app.exception_handler(PredictInputError)
    async def input_error(request: Request, error: PredictInputError):
        return JSONResponse({"error": public_message(str(error))}, status_code=400)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > server.max_upload_bytes + 2 ** 20:
            return JSONResponse({"error": f"the request is {int(length) / 2 ** 20:.1f} MB; uploads of at most "
                                          f"{server.max_upload_bytes / 2 ** 20:.1f} MB are taken"}, status_code=413)
        try:
            return await call_next(request)
        except Exception as error:  # the model failed on this input: say so, keep serving
            LOG.exception("request %s failed", request.url.path)
            return JSONResponse({"error": public_message(f"the model failed on this input ({type(error).__name__}: "
                                                         f"{error})")}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page)

    @app.get("/api/info")
    def info():
        return server.info()

    @app.get("/api/demo/{name}")
    def demo_image(name: str):
        return FileResponse(server.demo_image(name))

    def uploaded(image: Optional[UploadFile]):
        if image is None or not image.filename:
            return None, None
        # one byte past the limit is enough for answer() to refuse it
        return image.file.read(server.max_upload_bytes + 1), image.filename

    @app.post("/api/predict")
    def predict(image: Optional[UploadFile] = File(None), demo: Optional[str] = Form(None),
                image2: Optional[UploadFile] = File(None), demo2: Optional[str] = Form(None),
                question: Optional[str] = Form(None), captions: Optional[str] = Form(None),
                statement: Optional[str] = Form(None), expression: Optional[str] = Form(None),
                model: Optional[str] = Form(None)):
        upload, upload_name = uploaded(image)
        upload2, upload2_name = uploaded(image2)
        return server.answer(question=question, captions=captions, statement=statement, expression=expression,
                             upload=upload, upload_name=upload_name, demo=demo or None, upload2=upload2,
                             upload2_name=upload2_name, demo2=demo2 or None, model=model or None)

    return app


def start_in_thread(server: ModelServer, host: str = DEFAULT_HOST, port: int = 0):
    """``(uvicorn server, thread, url)``: the page served from a daemon thread (``port`` 0: a free port), for tests
    and notebooks; stop it with ``uvicorn_server.should_exit = True; thread.join()``."""
    import uvicorn

    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning", lifespan="off")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uvicorn_server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"mmf_ml_serve did not start on {host}:{port}")
        time.sleep(0.05)
    bound = uvicorn_server.servers[0].sockets[0].getsockname()[1]
    return uvicorn_server, thread, f"http://{host}:{bound}"


def _parser():
    from mmf_multilevel.predict.cli import add_model_arguments, add_region_arguments

    parser = argparse.ArgumentParser(prog="mmf_ml_serve", description=(
        "A local web page to try a model on an uploaded or demo image: the answer with its scores, the alignment "
        "picture and each stage's seconds."))
    add_model_arguments(parser)
    add_region_arguments(parser)
    parser.add_argument("--demo-images", default=None, help="a folder of images the page offers to pick")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"the address to bind (default {DEFAULT_HOST}: "
                                                             "this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--top-k", type=int, default=5, help="answers listed with their scores (VQA)")
    parser.add_argument("--no-pictures", action="store_true", help="answer without the alignment picture")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="the largest upload taken")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="the largest image taken, in pixels")
    parser.add_argument("--busy-seconds", type=float, default=BUSY_SECONDS,
                        help="how long a request waits for the model before it is answered 'busy'")
    parser.add_argument("opts", nargs="*", help="config overrides, as for mmf_run (env.data_dir=...)")
    return parser


def build_server(args) -> ModelServer:
    from mmf_multilevel.predict.cli import region_source
    from mmf_multilevel.predict.predictor import load_predictor

    demo_images = demo_image_table(args.demo_images)
    with contextlib.redirect_stdout(sys.stderr):
        predictor = load_predictor(args.model or args.config, args.checkpoint, args.opts,
                                   regions=region_source(args), device=args.device)
    # a zoo name as given; a config by its last folders (projects/semvlp/demo/vqa.yaml -> semvlp/demo/vqa)
    name = args.model or "/".join(os.path.splitext(os.path.abspath(args.config))[0].split(os.sep)[-3:])
    return ModelServer(predictor, name, demo_images, pictures=not args.no_pictures,
                       max_upload_bytes=int(args.max_upload_mb * 2 ** 20), max_pixels=args.max_pixels,
                       busy_seconds=args.busy_seconds, top_k=args.top_k)


def main(argv=None) -> int:
    import uvicorn

    from mmf_multilevel.compat.launcher import ConfigError
    from mmf_multilevel.predict.cli import BatchLineError

    args = _parser().parse_args(argv)
    try:
        server = build_server(args)
    except (ConfigError, PredictInputError, BatchLineError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"mmf_ml_serve: error: {error}", file=sys.stderr)
        return 2
    try:
        print(f"mmf_ml_serve: {server.name} ({server.predictor.method}, {server.task}) on "
              f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
