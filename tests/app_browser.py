#!/usr/bin/env python
"""Drive the Gradio app (vit_t5_dsi/search/app.py) in headless Chromium: the browser test uses it, and so does the
README screenshot.

    python tests/app_browser.py --model dsi_demo_output --query "a large red circle in the top left" --top_k 5 \\
        --screenshot docs/app_screenshot.png

Needs Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them) and selenium (the test extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL_PREFIX = "Running on local URL:"


def browser_missing() -> str | None:
    """Why a headless Chromium cannot be driven here, or None when it can."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install chromium chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningApp:
    """`python -m vit_t5_dsi.search.app --model MODEL` in a child process on 127.0.0.1, its port given the way hosting
    platforms give it (GRADIO_SERVER_PORT); `url` once it serves, `stop()` at the end."""

    def __init__(self, model: str, *extra: str, timeout: float = 180):
        self.port = free_port()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vit_t5_dsi.search.app", "--model", model, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_PORT": str(self.port),
                 "GRADIO_SERVER_NAME": "127.0.0.1"})
        self.output: list[str] = []
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + timeout
        self.url = None
        while self.url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the app did not start serving:\n" + "".join(self.output[-40:]))
            if URL_PREFIX in line:
                self.url = line.split(URL_PREFIX, 1)[1].strip()
        self.seconds_to_serve = time.perf_counter() - self.started

    def _pump(self, lines: queue.Queue) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            lines.put(line)
        lines.put(None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def headless_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,900"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def search_in_browser(driver, url: str, query: str, k: int, screenshot: str | None = None,
                      timeout: float = 60) -> tuple[list[str], str]:
    """Type `query`, set top-k, press Search; the image keys the gallery shows (in order) and the page's message."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea"))
    top_k = driver.find_element(By.CSS_SELECTOR, "#top-k input[type=number]")
    top_k.send_keys(Keys.CONTROL, "a")
    top_k.send_keys(str(k), Keys.TAB)
    box.send_keys(query)
    driver.find_element(By.CSS_SELECTOR, "#search").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message").text.strip())
    message = driver.find_element(By.CSS_SELECTOR, "#message").text
    captions = [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#results .caption-label")]
    images = driver.find_elements(By.CSS_SELECTOR, "#results .thumbnail-item img")
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                              image) for image in images))
    if screenshot:
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        driver.save_screenshot(screenshot)
    keys = [caption.split(" · ")[0] for caption in captions]
    if len(images) != len(keys):
        raise AssertionError(f"{len(images)} images but {len(keys)} captions in the gallery")
    return keys, message


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dsi_demo_output")
    parser.add_argument("--query", default="a large red circle in the top left")
    parser.add_argument("--top_k", "--k", dest="top_k", type=int, default=5, help="Images to ask for (--k: old name).")
    parser.add_argument("--screenshot", default="docs/app_screenshot.png")
    parser.add_argument("--expect", default=None, help="An image key the gallery must show (exit 1 otherwise).")
    args = parser.parse_args(argv)
    problem = browser_missing()
    if problem:
        parser.error(problem)
    with RunningApp(args.model) as app:
        print(f"app serving at {app.url} {app.seconds_to_serve:.1f} s after launch")
        driver = headless_chromium()
        try:
            started = time.perf_counter()
            keys, message = search_in_browser(driver, app.url, args.query, args.top_k, args.screenshot)
            print(f"first search in the browser: {time.perf_counter() - started:.2f} s (page load included)")
        finally:
            driver.quit()
    print(message)
    print("gallery:", ", ".join(keys))
    print("screenshot:", args.screenshot)
    if len(keys) != args.top_k:
        print(f"expected {args.top_k} images in the gallery, got {len(keys)}", file=sys.stderr)
        return 1
    if args.expect and args.expect not in keys:
        print(f"{args.expect} is not among the results", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
