"""The local web page (``mmf_ml_serve``): its answers equal the predictor's on the same image and text, bad input is
answered with a message and the server keeps serving, nothing of a request stays on disk, no server path is
readable through it; and, as a person uses it, a headless chromium uploads a demo image, asks a question and reads
the answer and the picture from the page."""
import contextlib
import io
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers.mmf import ROOT
from mmf_multilevel.datasets import generate as gen

pytest.importorskip("fastapi", reason="the web page's packages are not installed (pip install -e '.[serve]')")

QUESTION = "what color is the circle?"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_data")
    gen.generate(root / "demo", num_images=6, progress=False)
    return root


def make_server(data, project="vqa", method="semvlp", overrides=(), regions=None, **kwargs):
    from mmf_multilevel.predict import load_predictor
    from mmf_multilevel.predict.serve import ModelServer, demo_image_table

    torch.manual_seed(0)
    predictor = load_predictor(f"{ROOT}/projects/{method}/demo/{project}.yaml", device="cpu", regions=regions,
                               overrides=[f"env.data_dir={data}", *overrides])
    return ModelServer(predictor, f"{method}-{project}", demo_image_table(str(data / "demo" / "images")), **kwargs)


@contextlib.contextmanager
def served(data, **kwargs):
    """``(server, its test client)`` of :func:`make_server`'s model; the server is closed on leaving."""
    server = make_server(data, **kwargs)
    try:
        yield server, client_of(server)
    finally:
        server.close()


def client_of(server):
    from fastapi.testclient import TestClient

    from mmf_multilevel.predict.serve import create_app

    return TestClient(create_app(server), raise_server_exceptions=False)


def png_header(width, height) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (its pixel data is cut short): what a decompression bomb
    looks like to a server that reads the header first."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def demo_file(data, index=0):
    return data / "demo" / "images" / f"demo_{index:06d}.jpg"


def test_answers_equal_the_predictors_and_bad_input_gets_a_message(data):
    with served(data) as (server, client):
        info = client.get("/api/info").json()
        assert info["task"] == "vqa" and info["visual"] == "regions" and not info["uploads"]
        assert "demo_000003.jpg" in info["demo_images"]
        for index in range(3):
            reply = client.post("/api/predict", data={"demo": f"demo_{index:06d}.jpg", "question": QUESTION})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            expected = server.predictor.vqa(None, QUESTION, top_k=5, image_id=f"demo_{index:06d}")
            assert body["answer"] == expected["answer"]
            assert [a["answer"] for a in body["top_k"]] == [a["answer"] for a in expected["top_k"]]
            assert body["score"] == pytest.approx(expected["score"], abs=1e-6)
            assert {"decode", "regions", "text", "model", "total"} <= set(body["profile"])
        bad = {
            "type a question": {"demo": "demo_000000.jpg", "question": "  "},
            "10,000 characters": {"demo": "demo_000000.jpg", "question": "x" * 10_000},
            "serves 'semvlp-vqa' only": {"demo": "demo_000000.jpg", "question": QUESTION, "model": "soho.base"},
            "no demo image named '../../README.md'": {"demo": "../../README.md", "question": QUESTION},
            "upload an image or pick a demo image": {"question": QUESTION},
        }
        for message, form in bad.items():
            reply = client.post("/api/predict", data=form)
            assert reply.status_code in (400, 404), (message, reply.text)
            assert message in reply.json()["error"], reply.json()
        # a region model without a detector reads its cache: an upload is refused with what to do instead
        reply = client.post("/api/predict", data={"question": QUESTION},
                            files={"image": ("mine.jpg", demo_file(data).read_bytes(), "image/jpeg")})
        assert reply.status_code == 400 and "--detector" in reply.json()["error"]
        # no path on the server is readable through the page
        for path in ("/api/demo/..%2F..%2FREADME.md", "/api/demo/%2Fetc%2Fpasswd", "/etc/passwd", "/api/demo/.."):
            reply = client.get(path)
            assert reply.status_code == 404 and b"root:" not in reply.content, path
        assert client.get("/api/demo/demo_000001.jpg").content == demo_file(data, 1).read_bytes()
        # and it still answers
        assert client.post("/api/predict", data={"demo": "demo_000001.jpg", "question": QUESTION}).status_code == 200
        assert os.listdir(server.temp_root) == []
    assert not os.path.exists(server.temp_root)


def test_a_pixel_model_takes_uploads_and_refuses_what_is_not_a_usable_image(data):
    with served(data, method="soho", max_upload_bytes=200_000) as (server, client):
        assert client.get("/api/info").json()["uploads"]
        image = demo_file(data, 2).read_bytes()
        reply = client.post("/api/predict", data={"question": QUESTION}, files={"image": ("shapes.jpg", image, "image/jpeg")})
        assert reply.status_code == 200, reply.text
        expected = server.predictor.vqa(image, QUESTION, top_k=5)
        assert reply.json()["answer"] == expected["answer"]
        assert reply.json()["image"]["name"] == "uploaded image 'shapes.jpg'"
        cases = {
            "not an image file": ("notes.jpg", b"this is text, not a picture"),
            "20,000 x 20,000 pixels": ("huge.png", png_header(20_000, 20_000)),
            "empty file": ("empty.png", b""),
        }
        for message, (name, payload) in cases.items():
            reply = client.post("/api/predict", data={"question": QUESTION}, files={"image": (name, payload, "image/png")})
            assert reply.status_code == 400 and message in reply.json()["error"], (message, reply.text)
            assert str(data) not in reply.json()["error"] and server.temp_root not in reply.json()["error"]
        reply = client.post("/api/predict", data={"question": QUESTION},
                            files={"image": ("big.bmp", b"\0" * 300_000, "image/bmp")})
        assert reply.status_code == 413 and "MB" in reply.json()["error"]
        assert client.post("/api/predict", data={"question": QUESTION},
                           files={"image": ("shapes.jpg", image, "image/jpeg")}).json()["answer"] == expected["answer"]
        assert os.listdir(server.temp_root) == []


def test_a_matching_model_ranks_the_captions_by_the_predictors_scores(data):
    with served(data, project="retrieval_coco") as (server, client):
        captions = ["a red circle", "two blue squares and a triangle", "a green diamond"]
        reply = client.post("/api/predict", data={"demo": "demo_000004.jpg", "captions": "\n".join(captions) + "\n\n"})
        assert reply.status_code == 200, reply.text
        ranked = reply.json()["captions"]
        expected = {c: server.predictor.match(None, c, image_id="demo_000004")["score"] for c in captions}
        assert [item["text"] for item in ranked] == sorted(captions, key=lambda c: -expected[c])
        for item in ranked:
            assert item["score"] == pytest.approx(expected[item["text"]], abs=1e-6)
        reply = client.post("/api/predict", data={"demo": "demo_000004.jpg", "question": QUESTION})
        assert reply.status_code == 400 and "captions" in reply.json()["error"]
        reply = client.post("/api/predict", data={"demo": "demo_000004.jpg", "captions": "\n".join(["a"] * 17)})
        assert reply.status_code == 400 and "at most 16" in reply.json()["error"]


def test_with_no_image_one_caption_ranks_the_demo_images_as_the_predictor_retrieves_them(data):
    with served(data, project="retrieval_coco") as (server, client):
        reply = client.post("/api/predict", data={"captions": "a red circle"})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        ids = [f"demo_{index:06d}" for index in range(6)]
        expected = server.predictor.retrieve_images("a red circle", image_ids=ids, top_k=5)
        assert [item["image"] for item in body["images"]] == [f"{ids[r['index']]}.jpg" for r in expected["results"]]
        assert [item["score"] for item in body["images"]] == pytest.approx([r["score"] for r in expected["results"]],
                                                                           abs=1e-6)
        assert body["gallery_size"] == 6 and body["image"]["name"] == f"demo image {body['images'][0]['image']!r}"
        assert body["picture"].startswith("data:image/png;base64,") and body["picture_text"] == "a red circle"
        reply = client.post("/api/predict", data={"captions": "a red circle\na blue square"})
        assert reply.status_code == 400 and "ranks the demo images for one caption; got 2 lines" in reply.json()["error"]
        assert os.listdir(server.temp_root) == []


def test_a_pre_training_model_is_served_as_a_matching_model(data):
    with served(data, project="pretrain") as (server, client):
        assert client.get("/api/info").json()["task"] == "match"
        reply = client.post("/api/predict", data={"demo": "demo_000002.jpg", "captions": "a red circle\na green star"})
        assert reply.status_code == 200, reply.text
        for item in reply.json()["captions"]:
            expected = server.predictor.match(None, item["text"], image_id="demo_000002")
            assert item["score"] == pytest.approx(expected["score"], abs=1e-6)


def test_an_nlvr2_model_reads_two_images_and_a_statement(data):
    statement = "the left image has more circles than the right image"
    with served(data, project="nlvr2", pictures=False) as (server, client):
        info = client.get("/api/info").json()
        assert info["task"] == "nlvr2" and not info["signals"]
        form = {"demo": "demo_000001.jpg", "demo2": "demo_000004.jpg", "statement": statement}
        reply = client.post("/api/predict", data=form)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        expected = server.predictor.nlvr2(None, None, statement, left_image_id="demo_000001",
                                          right_image_id="demo_000004")
        assert body["label"] is expected["label"]
        assert body["probability"] == pytest.approx(expected["probability"], abs=1e-6)
        assert body["image2"]["name"] == "demo image 'demo_000004.jpg'" and "picture" not in body
        # the pair swapped is another query
        swapped = client.post("/api/predict", data={**form, "demo": form["demo2"], "demo2": form["demo"]}).json()
        assert swapped["probability"] != pytest.approx(body["probability"], abs=1e-9)
        bad = {
            "give a first (left) and a second (right) image": {"demo": "demo_000001.jpg", "statement": statement},
            "statement: type a statement about the two images": {**form, "statement": " "},
            "(the question box is for VQA models)": {**form, "question": "what color?"},
            "no demo image named 'nope.jpg'": {**form, "demo2": "nope.jpg"},
        }
        for message, fields in bad.items():
            reply = client.post("/api/predict", data=fields)
            assert reply.status_code in (400, 404) and message in reply.json()["error"], (message, reply.text)
    vqa = make_server(data)
    try:
        reply = client_of(vqa).post("/api/predict", data={"demo": "demo_000001.jpg", "demo2": "demo_000002.jpg",
                                                          "question": QUESTION})
        assert reply.status_code == 400 and "only NLVR2 models read a second image" in reply.json()["error"]
        reply = client_of(vqa).post("/api/predict", data={"demo": "demo_000001.jpg", "expression": "the red one"})
        assert reply.status_code == 400
        assert reply.json()["error"] == ("this is a VQA model: type a question about the image (the expression box "
                                         "is for grounding models)")
    finally:
        vqa.close()


@pytest.mark.parametrize("method,project", [("muvla", "refcoco_plus"), ("simla", "refcoco_plus_weak")])
def test_a_grounding_model_draws_the_box_the_predictor_chooses(method, project, data):
    expression = "the red circle on the left"
    with served(data, project=project, method=method) as (server, client):
        assert client.get("/api/info").json()["task"] == "ground"
        reply = client.post("/api/predict", data={"demo": "demo_000003.jpg", "expression": expression})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        if server.predictor.visual == "pixels":
            expected = server.predictor.ground(str(demo_file(data, 3)), expression, image_id="demo_000003", top_k=5)
        else:
            expected = server.predictor.ground(None, expression, image_id="demo_000003", top_k=5)
        assert body["box"] == pytest.approx(expected["box"]) and body["score"] == pytest.approx(expected["score"])
        assert [item["index"] for item in body["top_k"]] == [item["index"] for item in expected["top_k"]]
        assert body["picture"].startswith("data:image/png;base64,") and "alignment" not in body
        assert body["profile"]["drawing"] > 0
        # SIMLA's own signal (Grad-CAM) beside the box; μ-VLA has none
        assert ("signal" in body) is (method == "simla"), body.get("signal_error")
        if method == "simla":  # an upload has no id: its proposals are not in the region cache, which is named
            reply = client.post("/api/predict", data={"expression": expression},
                                files={"image": ("mine.jpg", demo_file(data, 3).read_bytes(), "image/jpeg")})
            error = reply.json()["error"]
            assert reply.status_code == 400 and "the region cache regions.lmdb has no regions" in error, error
            assert str(data) not in error and "/tmp" not in error
        assert os.listdir(server.temp_root) == []


def test_a_method_with_its_own_signal_sends_its_picture_with_the_answer(data):
    import base64

    from PIL import Image

    with served(data, method="soho") as (server, client):
        assert client.get("/api/info").json()["signals"]
        reply = client.post("/api/predict", data={"question": QUESTION},
                            files={"image": ("shapes.jpg", demo_file(data, 2).read_bytes(), "image/jpeg")})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        png = base64.b64decode(body["signal"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).size[0] > 100 and png != base64.b64decode(body["picture"].split(",", 1)[1])
        assert "signal" in body["profile"] and "signal_error" not in body
    semvlp = make_server(data)
    try:
        body = client_of(semvlp).post("/api/predict", data={"demo": "demo_000001.jpg", "question": QUESTION}).json()
        assert "signal" not in body and "signal_error" not in body and body["picture"]
    finally:
        semvlp.close()


def test_concurrent_requests_are_answered_one_model_call_at_a_time_and_a_failure_does_not_stop_the_server(data):
    import httpx

    from mmf_multilevel.predict.serve import start_in_thread

    server = make_server(data)
    uvicorn_server, thread, url = start_in_thread(server)
    try:
        assert url.startswith("http://127.0.0.1:")
        expected = {i: server.predictor.vqa(None, QUESTION, image_id=f"demo_{i:06d}")["answer"] for i in range(4)}
        inside, most = [0], [0]
        original = server.predictor.vqa

        def counted(*args, **kwargs):  # how many model calls run at once
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            try:
                return original(*args, **kwargs)
            finally:
                inside[0] -= 1

        server.predictor.vqa = counted

        def ask(index):
            return httpx.post(f"{url}/api/predict", data={"demo": f"demo_{index:06d}.jpg", "question": QUESTION},
                              timeout=120)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, [0, 1, 2, 3] * 2))
        assert [r.status_code for r in replies] == [200] * 8
        assert [r.json()["answer"] for r in replies] == [expected[i] for i in [0, 1, 2, 3] * 2]
        assert most[0] == 1
        # a request that waits longer than busy_seconds is told so
        server.busy_seconds = 0.01

        def slow(*args, **kwargs):
            time.sleep(0.5)
            return original(*args, **kwargs)

        server.predictor.vqa = slow
        with ThreadPoolExecutor(3) as pool:
            codes = sorted(r.status_code for r in pool.map(ask, [0, 1, 2]))
        assert codes[0] == 200 and 503 in codes
        server.busy_seconds = 60

        def broken(*args, **kwargs):
            raise RuntimeError("a kernel failed")

        server.predictor.vqa = broken
        reply = ask(0)
        assert reply.status_code == 500 and "a kernel failed" in reply.json()["error"]
        server.predictor.vqa = original
        assert ask(1).json()["answer"] == expected[1]
        assert os.listdir(server.temp_root) == []
    finally:
        server.predictor.vqa = original
        uvicorn_server.should_exit = True
        thread.join(30)
        server.close()


def test_the_command_refuses_a_wrong_model_name_with_a_message(data, capsys):
    from mmf_multilevel.predict.serve import main

    assert main(["--model", "no_such_model.base", f"env.data_dir={data}"]) == 2
    assert "not a file, a folder or a model zoo name" in capsys.readouterr().err
    assert main(["--config", str(data / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["--config", f"{ROOT}/projects/semvlp/demo/vqa.yaml", "--demo-images", str(data / "nowhere"),
                 f"env.data_dir={data}"]) == 2
    assert "--demo-images" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the browser
def chromium():
    from mmf_multilevel.predict.browser import BrowserMissing, chromium

    try:
        return chromium()
    except BrowserMissing as missing:
        pytest.skip(str(missing))


def test_a_person_uploads_an_image_asks_and_reads_the_answer_and_the_picture(data, tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (run scripts/install.sh)")
    from selenium.webdriver.common.by import By

    from helpers.extract import TINY_FEATURE_DIM, tiny_opts
    from mmf_multilevel.predict import DetectorRegions
    from mmf_multilevel.predict.browser import ask
    from mmf_multilevel.predict.serve import start_in_thread

    browser = chromium()
    torch.set_num_threads(1)
    detector = DetectorRegions("butd_r101", random_init=0, opts=tiny_opts("butd_r101"), min_boxes=2, max_boxes=6)
    server = make_server(data, regions=detector, overrides=[f"model_config.semvlp.feature_dim={TINY_FEATURE_DIM}",
                                                            f"dataset_config.vqa2.feature_dim={TINY_FEATURE_DIM}"])
    uvicorn_server, thread, url = start_in_thread(server)
    try:
        image = demo_file(data, 3)
        answer, error = ask(browser, url, image=image, question=QUESTION)
        assert error is None, error
        expected = server.predictor.vqa(str(image), QUESTION, top_k=5)
        assert answer == expected["answer"]
        scores = browser.find_elements(By.CSS_SELECTOR, "#scores tbody tr")
        assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in scores] == [a["answer"] for a in expected["top_k"]]
        stages = [row.find_elements(By.TAG_NAME, "td")[0].text for row in
                  browser.find_elements(By.CSS_SELECTOR, "#profile tbody tr")]
        assert {"decode", "regions", "model", "total"} <= set(stages)
        if server.pictures:
            picture = browser.find_element(By.ID, "picture")
            assert picture.is_displayed() and picture.get_attribute("src").startswith("data:image/png;base64,")
            assert browser.execute_script("return arguments[0].naturalWidth", picture) > 100
        browser.save_screenshot(str(tmp_path / "page.png"))
        from PIL import Image

        assert Image.open(tmp_path / "page.png").size[0] >= 1000
        # bad input shows on the page and the page keeps working
        answer, error = ask(browser, url, demo="demo_000001.jpg", question=" ")
        assert answer is None and "type a question" in error
        answer, error = ask(browser, url, image=tmp_path / "page.png", demo="demo_000001.jpg", question=QUESTION)
        assert answer is None and "not both" in error
        answer, error = ask(browser, url, demo="demo_000001.jpg", question=QUESTION)
        assert error is None and answer == server.predictor.vqa(str(demo_file(data, 1)), QUESTION)["answer"]
        assert os.listdir(server.temp_root) == []
    finally:
        browser.quit()
        uvicorn_server.should_exit = True
        thread.join(30)
        server.close()


def test_a_person_asks_the_nlvr2_grounding_and_retrieval_pages(data):
    """The page lays itself out for the model's task and shows each task's answer: a statement about two demo
    images, an expression's box with the grounding picture, and the demo images ranked for a caption."""
    from selenium.webdriver.common.by import By

    from mmf_multilevel.predict.browser import ask
    from mmf_multilevel.predict.serve import start_in_thread

    browser = chromium()
    statement = "there are more circles on the left"
    cases = [
        (dict(project="nlvr2", pictures=False), dict(demo="demo_000001.jpg", demo2="demo_000005.jpg", statement=statement),
         lambda p: "true" if p.nlvr2(None, None, statement, left_image_id="demo_000001",
                                     right_image_id="demo_000005")["label"] else "false"),
        (dict(project="refcoco_plus", method="muvla"), dict(demo="demo_000003.jpg", expression="the red circle"),
         lambda p: "box [" + ", ".join(str(round(v)) for v in p.ground(None, "the red circle",
                                                                      image_id="demo_000003")["box"]) + "]"),
        (dict(project="retrieval_coco"), dict(captions="a red circle"),
         lambda p: "demo_{:06d}.jpg".format(p.retrieve_images("a red circle", image_ids=[
             f"demo_{i:06d}" for i in range(6)], top_k=1)["results"][0]["index"])),
    ]
    try:
        for settings, form, expected in cases:
            server = make_server(data, **settings)
            uvicorn_server, thread, url = start_in_thread(server)
            try:
                answer, error = ask(browser, url, **form)
                assert error is None, error
                assert answer.startswith(expected(server.predictor)), (settings, answer)
                hidden = {task: not browser.find_element(By.ID, field).is_displayed() for task, field in
                          (("vqa", "question"), ("nlvr2", "statement"), ("ground", "expression"))}
                assert sum(not h for h in hidden.values()) == (server.task != "match"), hidden
                assert browser.find_element(By.ID, "demo-image2").is_displayed() is (server.task == "nlvr2")
                picture = browser.find_element(By.ID, "picture")
                assert picture.is_displayed() is server.pictures
                if server.task == "match":
                    thumbs = browser.find_elements(By.CSS_SELECTOR, "#scores img.thumb")
                    assert len(thumbs) == 5 and thumbs[0].get_attribute("alt") == answer.split(" ")[0]
            finally:
                uvicorn_server.should_exit = True
                thread.join(30)
                server.close()
    finally:
        browser.quit()


def test_messages_name_no_server_path():
    from mmf_multilevel.predict.serve import public_message

    assert public_message("the region cache /srv/data/demo/regions.lmdb has no regions for image "
                          "'/home/u/x.jpg' (size 3/4)") == ("the region cache regions.lmdb has no regions for image "
                                                            "'x.jpg' (size 3/4)")
    assert public_message("read /var/cache/mmf_ml_serve-1/request-2/alignment.png: image/png") == ("read alignment.png: "
                                                                                                   "image/png")


def test_png_header_helper_describes_the_size_it_claims():
    from PIL import Image

    with Image.open(io.BytesIO(png_header(300, 200))) as image:
        assert image.size == (300, 200)
