"""Driving the page of ``mmf_ml_serve`` as a person does, in a headless Debian chromium through selenium and
Debian's chromedriver (``scripts/install.sh`` installs both; nothing is downloaded): the page's end-to-end test
and the screenshot in docs/ (``python -m mmf_multilevel.predict.browser``) use it.

    python -m mmf_multilevel.predict.browser --config projects/semvlp/demo/vqa.yaml \\
        --checkpoint save/semvlp_demo/vqa/semvlp_final.pth --demo-images data/demo/images \\
        --demo demo_000007.jpg --question "what color is the triangle?" --out docs/mmf_ml_serve.png \\
        env.data_dir=$PWD/data
"""
import argparse
import shutil
import sys
from typing import Optional, Tuple

__all__ = ["BrowserMissing", "chromium", "ask", "main"]


class BrowserMissing(RuntimeError):
    """chromium, chromedriver or selenium is not installed."""


def chromium(width: int = 1200, height: int = 1400):
    """A headless chromium (``selenium.webdriver.Chrome``) on Debian's binaries; :class:`BrowserMissing` names what
    is not installed."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissing("selenium is not installed (pip install -e '.[serve]')") from None
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        raise BrowserMissing("Debian's chromium and chromium-driver are not installed (scripts/install.sh installs "
                             "them with apt as root: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def ask(browser, url: str, image: Optional[str] = None, demo: Optional[str] = None, question: Optional[str] = None,
        captions: Optional[str] = None, wait: float = 300, statement: Optional[str] = None,
        expression: Optional[str] = None, image2: Optional[str] = None,
        demo2: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """Opens the page, fills its form as a person would (an upload and/or a demo image; NLVR2's second image; the
    question, the captions, the statement or the expression), presses the button and returns ``(answer shown,
    None)`` or ``(None, the error box's text)``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda b: b.execute_script("return document.getElementById('model-line')"
                                                                ".textContent.indexOf(':') > 0"))
    if image is not None:
        browser.find_element(By.ID, "image-file").send_keys(str(image))
    if demo is not None:
        Select(browser.find_element(By.ID, "demo-image")).select_by_value(demo)
    if image2 is not None:
        browser.find_element(By.ID, "image2-file").send_keys(str(image2))
    if demo2 is not None:
        Select(browser.find_element(By.ID, "demo-image2")).select_by_value(demo2)
    for field, text in (("question", question), ("captions", captions), ("statement", statement),
                        ("expression", expression)):
        if text is not None:
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(text)
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, wait).until(ec.any_of(ec.visibility_of_element_located((By.ID, "result")),
                                                 ec.visibility_of_element_located((By.ID, "error"))))
    error = browser.find_element(By.ID, "error")
    if error.is_displayed():
        return None, error.text
    return browser.find_element(By.ID, "answer").text, None


def _parser():
    from mmf_multilevel.predict.serve import _parser as serve_parser

    parser = argparse.ArgumentParser(prog="python -m mmf_multilevel.predict.browser", parents=[serve_parser()],
                                     add_help=False, conflict_handler="resolve",
                                     description="Serves a model, asks the page one question in a headless chromium "
                                                 "and saves a screenshot of the answer.")
    parser.add_argument("--demo", default=None, help="the demo image to pick (a file name in --demo-images)")
    parser.add_argument("--image", default=None, help="an image file to upload")
    parser.add_argument("--question", default=None)
    parser.add_argument("--captions", default=None, help="captions, one per line")
    parser.add_argument("--statement", default=None, help="NLVR2: a statement about --demo and --demo2")
    parser.add_argument("--expression", default=None, help="grounding: a referring expression")
    parser.add_argument("--demo2", default=None, help="NLVR2: the second demo image")
    parser.add_argument("--image2", default=None, help="NLVR2: a second image file to upload")
    parser.add_argument("--out", required=True, help="the screenshot (.png)")
    return parser


def main(argv=None) -> int:
    import os

    from mmf_multilevel.predict.serve import build_server, start_in_thread

    args = _parser().parse_args(argv)
    server = build_server(args)
    uvicorn_server, thread, url = start_in_thread(server)
    browser = chromium()
    try:
        answer, error = ask(browser, url, image=args.image, demo=args.demo, question=args.question,
                            captions=args.captions, statement=args.statement, expression=args.expression,
                            image2=args.image2, demo2=args.demo2)
        # the whole page, the picture included
        height = int(browser.execute_script("return document.documentElement.scrollHeight"))
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1200, "height": max(900, height + 40), "deviceScaleFactor": 1, "mobile": False})
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        browser.save_screenshot(args.out)
    finally:
        browser.quit()
        uvicorn_server.should_exit = True
        thread.join(30)
        server.close()
    print(f"answer: {answer}" if error is None else f"error: {error}")
    print(f"screenshot: {args.out}")
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
