"""The rendered report in a real headless Chromium: no console errors, no network, every image decodes.

Chromium is driven through its DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4), so the test needs nothing beyond the standard library and the
``chromium`` package. Without Chromium the test skips, except under CI (env ``CI`` set),
where a missing browser is a failure.

The report comes from a real tiny workflow run (``test_report.build_study``, made once per
session) that includes a variant that diverges, so NaN and "diverged" cells are rendered too. A
screenshot lands in the test's temporary directory and, if ``ACTGRAD_SCREENSHOT_DIR`` is set,
there as well.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import in_ci

pytestmark = pytest.mark.browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    env = os.environ.get("ACTGRAD_CHROMIUM")
    if env:
        return env
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    path = find_chromium()
    if path:
        return path
    if in_ci():
        pytest.fail("headless Chromium is required under CI but was not found "
                    "(apt-get install -y chromium, or set ACTGRAD_CHROMIUM)")
    pytest.skip("chromium is not installed (apt-get install -y chromium); CI is not set, so skipping")


class Chromium:
    """A headless Chromium spoken to over the DevTools protocol on a pipe (NUL-separated JSON)."""

    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="actgrad-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds():  # Chromium reads commands on fd 3 and writes replies to fd 4
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     preexec_fn=child_fds, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._inbox: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._inbox.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                message, buf = buf.split(b"\0", 1)
                self._inbox.put(json.loads(message))

    def _pump(self, deadline: float) -> None:
        try:
            message = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return
        if message is None:
            raise RuntimeError(f"Chromium closed the DevTools pipe:\n{self.stderr_tail()}")
        if "id" in message:
            self._replies[message["id"]] = message
        else:
            self.events.append(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        mid = self._next_id
        message = {"id": mid, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while mid not in self._replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {method} within {self.timeout}s:\n{self.stderr_tail()}")
            self._pump(deadline)
        reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def wait_for(self, method: str, session: str | None = None) -> dict:
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and (session is None or event.get("sessionId") == session):
                    return event
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} event within {self.timeout}s:\n{self.stderr_tail()}")
            self._pump(deadline)

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]

    def open_page(self, url: str, width: int = 1400, height: int = 1000) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self.send(method, session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired", session)
        return session

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, session: str, path: Path, clip: dict | None = None) -> Path:
        params = {"format": "png"}
        if clip:
            params.update(clip=dict(clip, scale=1), captureBeyondViewport=True)
        data = self.send("Page.captureScreenshot", params, session=session)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, failed loads and any request that is not file: or data:."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                  for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log error: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
            elif m == "Network.requestWillBeSent":
                url = p.get("request", {}).get("url", "")
                if not url.startswith(("file:", "data:", "about:")):
                    out.append("network request: " + url[:200])
            elif m == "Network.loadingFailed":
                out.append("failed load: " + json.dumps(p)[:300])
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


IMAGES_JS = """
(async () => {
  const imgs = [...document.images];
  const results = await Promise.all(imgs.map(async (img) => {
    let decoded = true;
    try { await img.decode(); } catch (e) { decoded = false; }
    return {id: (img.closest('figure') || img).id || img.alt, decoded, complete: img.complete,
            width: img.naturalWidth, height: img.naturalHeight, data: img.src.startsWith('data:image/png;base64,')};
  }));
  return {images: results, title: document.title, h1: document.querySelector('h1')?.textContent,
          height: document.documentElement.scrollHeight,
          links: [...document.querySelectorAll('a[href^="#"]')].map(a => a.getAttribute('href'))
                   .filter(h => h.length > 1 && !document.getElementById(h.slice(1))),
          external: [...document.querySelectorAll('[src],[href]')]
                   .map(e => e.getAttribute('src') || e.getAttribute('href'))
                   .filter(u => /^(https?:)?\\/\\//.test(u))};
})()
"""


@pytest.fixture(scope="module")
def chromium_binary():
    return require_chromium()


@pytest.fixture(scope="module")
def rendered_report(tmp_path_factory, names_path, chromium_binary):
    from test_report import build_study  # one real tiny workflow run, shared with test_report.py

    return build_study(tmp_path_factory.mktemp("report-study"), names_path)


def inspect_page(binary: str, html: Path, shots: Path) -> tuple[dict, list[str], list[Path]]:
    """Load ``html``; return what the page says about itself, the problems seen, and screenshots."""
    browser = Chromium(binary)
    try:
        session = browser.open_page(html.resolve().as_uri())
        page = browser.evaluate(session, IMAGES_JS)
        paths = [browser.screenshot(session, shots / f"{html.stem}.png")]
        # and one further down: the per-variant sections (with the diverged variant) when there are any
        top = browser.evaluate(session, "(document.getElementById('variants') || document.body)"
                                        ".getBoundingClientRect().top + scrollY")
        if top > 0:
            paths.append(browser.screenshot(session, shots / f"{html.stem}-variants.png",
                                            clip={"x": 0, "y": top, "width": 1400, "height": 1400}))
        return page, browser.problems(), paths
    finally:
        browser.close()


def broken_images(page: dict) -> list[dict]:
    return [i for i in page["images"] if not (i["decoded"] and i["complete"] and i["width"] > 0 and i["height"] > 0)]


def test_report_loads_cleanly_in_chromium(chromium_binary, rendered_report, tmp_path):
    page, problems, shots = inspect_page(chromium_binary, rendered_report["report"], tmp_path)

    assert problems == [], "the page reported problems:\n" + "\n".join(problems)
    images = page["images"]
    assert len(images) >= rendered_report["n_figures"], f"expected every figure as an <img>, got {len(images)}"
    assert broken_images(page) == [], "images that did not decode"
    assert all(i["data"] for i in images), "every image is an embedded PNG"
    assert page["external"] == [], f"external references: {page['external']}"
    assert page["links"] == [], f"in-page links without a target: {page['links']}"
    assert page["h1"].strip() == rendered_report["title"]
    assert page["height"] > 3000, "the page rendered far shorter than its content"

    assert len(shots) == 2
    for png in shots:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{png} is not a real screenshot"
    out = os.environ.get("ACTGRAD_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for png in shots:
            shutil.copy(png, Path(out) / png.name)


def test_the_check_catches_a_broken_page(chromium_binary, tmp_path):
    """The same check on a page with a broken image, a console error and a network request fails."""
    page_file = tmp_path / "broken.html"
    page_file.write_text("""<!DOCTYPE html><html><head><title>broken</title></head><body><h1>broken</h1>
<img id="bad" alt="bad" src="data:image/png;base64,iVBORw0KGgoAAAAN">
<img id="remote" alt="remote" src="http://127.0.0.1:9/x.png">
<a href="#nowhere">dangling</a>
<script>console.error("something is wrong")</script></body></html>""")
    page, problems, _ = inspect_page(chromium_binary, page_file, tmp_path)
    assert any("console.error: something is wrong" in p for p in problems), problems
    assert any("127.0.0.1:9" in p for p in problems), problems
    assert {i["id"] for i in broken_images(page)} == {"bad", "remote"}
    assert page["external"] == ["http://127.0.0.1:9/x.png"] and page["links"] == ["#nowhere"]


def test_chromium_is_required_under_ci(monkeypatch):
    """Under CI a missing browser fails the test instead of skipping it."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("ACTGRAD_CHROMIUM", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="required under CI"):
        require_chromium()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_chromium()
