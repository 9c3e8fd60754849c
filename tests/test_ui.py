"""/ui in headless Chromium, driven over the DevTools protocol on a pipe (no extra packages).

One server (test_serve's fixture: `sdstream serve --preload tiny --max-queue 1`), one browser, viewports set with
Emulation.setDeviceMetricsOverride. Screenshots of each viewport go to a folder under pytest's tmp dir and to
/tmp/ui-shots/. Skipped where /usr/bin/chromium is missing (apt-get install chromium).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import test_serve

httpx = pytest.importorskip("httpx")
server = test_serve.server  # its module fixture: a real `sdstream serve --preload tiny --max-queue 1` on a free port
serving = test_serve.serving  # (the one server is made by)

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path("/tmp/ui-shots")
VIEWPORTS = [(800, 1000), (1200, 900), (1920, 1080)]
INJECTED_RUN = "?prompt=a%20red%20circle&model=tiny&steps=4&seed=5&noise_mask_type=circle&inject_at_step=3&autorun=1"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)")


class DevTools:
    """Chromium with --remote-debugging-pipe: JSON messages, NUL-terminated, on fds 3 (in) and 4 (out)."""

    def __init__(self, url: str, profile: Path):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        # the child's ends numbered 10 or more, so bash can move them to 3 and 4 without a clash
        r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", url]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-', "bash", *args], pass_fds=(r, w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(r)
        os.close(w)
        self.buffer, self.next_id, self.session = b"", 0, None

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise TimeoutError(method)
            chunk = os.read(self.from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self.buffer += chunk

    def attach_page(self) -> None:
        deadline = time.monotonic() + 30
        while not (pages := [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]):
            assert time.monotonic() < deadline, "no page target"
            time.sleep(0.2)
        self.session = self.call("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.session = None
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_chrome)
        os.close(self.from_chrome)



@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """One headless Chromium for the module, attached to its page."""
    browser = DevTools("about:blank", tmp_path_factory.mktemp("chromium") / "profile")
    try:
        browser.attach_page()
        browser.call("Page.enable")  # without it, the script below is not run
        browser.call("Page.addScriptToEvaluateOnNewDocument", source=(
            "window.__errors = []; addEventListener('error', (e) => __errors.push(e.message));"
            "addEventListener('unhandledrejection', (e) => __errors.push(String(e.reason)));"))
        yield browser
    finally:
        browser.close()


@pytest.fixture(autouse=True)
def no_page_errors(page):
    """Each test ends with no uncaught error or rejected promise in the page."""
    yield
    assert run_js(page, "window.__errors") == []


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where screenshots go: a folder under pytest's tmp dir (and a copy in /tmp/ui-shots/)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    return tmp_path_factory.mktemp("ui-shots")


def run_js(page: DevTools, expression: str, timeout: float = 30):
    """EXPRESSION's value, promises awaited; a JavaScript exception fails the test."""
    reply = page.call("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                      awaitPromise=True)
    if "exceptionDetails" in reply:
        raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
    return reply["result"].get("value")


def wait_for(page: DevTools, expression: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := run_js(page, expression)):
        assert time.monotonic() < deadline, f"timed out waiting for {expression} ({shown(page)})"
        time.sleep(0.05)
    return value


def viewport(page: DevTools, width: int, height: int) -> None:
    page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    run_js(page, "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")


def open_ui(page: DevTools, url: str, query: str = "", size=(1200, 900)) -> None:
    """/ui?QUERY at SIZE, once its form is built (and, with autorun, once its run has ended)."""
    viewport(page, *size)
    run_js(page, "window.__before = 1")  # gone once the new document is in
    page.call("Page.navigate", url=url.replace("127.0.0.1", "localhost") + "/ui" + query)
    wait_for(page, "!window.__before && window.sdstream && window.sdstream.ready")
    if "autorun=1" in query:
        wait_for(page, "['done', 'error', 'idle'].includes(document.body.dataset.state)")


def screenshot(page: DevTools, shots: Path, name: str) -> None:
    data = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    (shots / name).write_bytes(data)
    shutil.copy(shots / name, SHOTS / name)


def state(page: DevTools) -> str:
    return run_js(page, "document.body.dataset.state")


def shown(page: DevTools) -> str:
    """What the page says: its state, status line and error (for assertion messages)."""
    return run_js(page, "`${document.body.dataset.state}: ${$('status').textContent} ${$('error').textContent}`")


def test_form_is_made_from_the_options(page, server):
    info = httpx.get(server + "/").json()
    open_ui(page, server)
    fields = {f["api"]: f for f in run_js(page, """sdstream.state.options.map((o) => {
        const e = document.getElementById(o.api);
        return e && {api: o.api, tag: e.tagName, type: e.type, min: e.min, max: e.max, disabled: e.disabled,
                     value: e.type === "file" ? null : e.value,
                     choices: e.tagName === "SELECT" ? [...e.options].map((x) => x.value) : null,
                     group: e.closest("details").dataset.group};
    })""")}
    assert set(fields) == {o["api"] for o in info["options"]}, "every option has its field, named by its API field"
    for o in info["options"]:
        f = fields[o["api"]]
        if o["kind"] in ("int", "float") and f["type"] == "number":
            assert [float(f["min"]), float(f["max"])] == o["range"], o["api"]
        if o["kind"] == "choice":
            assert f["choices"] == ([""] if o["default"] is None else []) + o["choices"], o["api"]
        if o["kind"] in ("int", "float") and o["default"] is not None:
            assert float(f["value"]) == o["default"], o["api"]
    assert f"{1 << 64}"[:-1] not in json.dumps(fields)  # the seed's range is too big for a number input
    assert fields["model"]["choices"] == info["available_models"] and fields["model"]["value"] == "tiny"
    assert fields["noise_mask_type"]["group"] == "Noise injection" and fields["eta"]["group"] == "Generation"
    # dependent fields: off while their partner is unset, and never sent without it
    off = {api for api, f in fields.items() if f["disabled"]}
    assert off == {"image_weight", "strength", "start_step", "inject_at_step", "noise_strength", "attention_words"}
    assert run_js(page, "sdstream.body()") == {"model": "tiny"}
    run_js(page, """(() => {
        const set = (id, v) => { const e = document.getElementById(id); e.value = v;
                                 e.dispatchEvent(new Event("change", {bubbles: true})); };
        set("scheduler", "euler"); set("noise_mask_type", "circle"); set("preview", "none");
        set("inject_at_step", "3, 5"); set("seed", "18446744073709551615"); set("steps", "8");
    })()""")
    off = run_js(page, "[...document.querySelectorAll('#form .field.off')].map((f) => f.dataset.api)")
    assert set(off) == {"image_weight", "strength", "start_step", "eta", "frame_source", "frames_every",
                        "attention_words"}
    sent = run_js(page, "sdstream.serialize()")
    assert json.loads(sent) == {"model": "tiny", "steps": 8, "scheduler": "euler", "seed": 2**64 - 1,
                                "noise_mask_type": "circle", "inject_at_step": [3, 5], "preview": "none"}
    assert '"seed":18446744073709551615' in sent  # digits kept, not rounded through a JS number
    # no choice list or limit the server declares is typed into the page
    html = httpx.get(server + "/ui").text
    names = {c for o in info["options"] for c in o["choices"] or ()} | set(info["schedulers"]) | set(info["masks"])
    for name in names - {"none"}:  # "none": the page's word for a choice left out
        assert f'"{name}"' not in html and f"'{name}'" not in html and f">{name}<" not in html, name
    for value in info["limits"].values():
        assert not re.search(rf"\b{value}\b", html), value


def test_run_thumbnails_injection_download_history_gif(page, server, shots):
    from PIL import Image, ImageChops, ImageStat

    open_ui(page, server, INJECTED_RUN)
    assert state(page) == "done", shown(page)
    wait_for(page, "$('frame').complete && $('frame').naturalWidth > 0")
    got = run_js(page, """({
        counter: $("counter").textContent, status: $("status").textContent, frame: $("frame").src,
        small: $("frame").classList.contains("small"), shownWidth: $("frame").getBoundingClientRect().width,
        thumbs: [...document.querySelectorAll("#strip .thumb")].map((t) => ({
            num: t.querySelector(".num").textContent, injected: !!t.querySelector(".inj"),
            src: t.querySelector("img").src})),
        download: $("download").hidden ? "" : $("download").href, name: $("download").download,
        history: [...document.querySelectorAll("#history .run")].map((r) => r.textContent),
        params: $("params").textContent, model: $("model").value,
    })""")
    assert got["counter"] == "step 4 / 4" and "seed 5" in got["status"] and got["model"] == "tiny"
    assert [t["num"] for t in got["thumbs"]] == ["1", "2", "3", "4"]
    assert [t["injected"] for t in got["thumbs"]] == [False, False, True, False]
    assert got["download"].startswith("data:image/png;base64,") and got["name"] == "sdstream-5.png"
    final = Image.open(io.BytesIO(base64.b64decode(got["download"].split(",", 1)[1])))
    assert final.format == "PNG" and final.size == (32, 32)
    assert got["frame"] == got["download"] and got["small"] and got["shownWidth"] >= 256  # scaled up, crisp
    assert len(got["history"]) == 1 and "5" in got["history"][0] and "a red circle" in got["history"][0]
    assert "Seed: 5" in got["params"] and "Noise injected at: 3" in got["params"]
    # a thumbnail shows its frame; clicked again, the final picture is back
    run_js(page, "document.querySelectorAll('#strip .thumb')[1].click()")
    assert run_js(page, "$('frame').src") == got["thumbs"][1]["src"]
    assert "step 2 / 4" in run_js(page, "$('caption').textContent")
    run_js(page, "document.querySelectorAll('#strip .thumb')[1].click()")
    assert run_js(page, "$('frame').src") == got["download"]
    # reuse seed
    run_js(page, "sdstream.state.controls.seed.set(null); $('reuse').click()")
    assert run_js(page, "$('seed').value") == "5"
    # a second run joins the history; clicking the first shows it again, with its own download
    run_js(page, "sdstream.state.controls.seed.set('6'); $('go').click()")
    wait_for(page, "document.body.dataset.state === 'done' && $('download').download === 'sdstream-6.png'")
    assert run_js(page, "$('history').children.length") == 2
    run_js(page, "$('history').children[1].click()")
    assert run_js(page, "[$('frame').src, $('download').download, $('strip').children.length]") == [
        got["download"], "sdstream-5.png", 4]
    # the GIF, made in the page: every frame then the final picture, the last frame close to the PNG
    gif = Image.open(io.BytesIO(base64.b64decode(run_js(page, "sdstream.gif()"))))
    assert gif.format == "GIF" and gif.size == (32, 32) and gif.n_frames == 5
    gif.seek(4)
    diff = ImageStat.Stat(ImageChops.difference(gif.convert("RGB"), final.convert("RGB"))).mean
    assert max(diff) < 4, diff
    screenshot(page, shots, "ui-run-1200x900.png")


OVERLAPS = """(() => {
    const box = (e) => e.getBoundingClientRect();
    const hit = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
    const view = box($("view")), strip = box($("strip")), go = box($("go"));
    const parts = [...$("view").children].filter((e) => { const b = box(e); return b.width > 0 && b.height > 0; });
    const stacked = parts.flatMap((e, i) => parts.slice(i + 1).filter((f) => hit(box(e), box(f)))
        .map((f) => `${e.id}/${f.id}`));
    const fields = [...document.querySelectorAll(
        "#form .field, #form input, #form select, #form textarea, #form label, #form button, #form summary")]
        .filter((e) => { const b = box(e); return b.width > 0 && b.height > 0; });
    return {
        fields: fields.length, thumbs: $("strip").children.length,
        covered: fields.filter((e) => hit(box(e), view) || hit(box(e), strip))
            .map((e) => e.id || e.dataset.api || e.tagName),
        stacked, go: [go.left, go.top, go.right, go.bottom], width: innerWidth, height: innerHeight,
        scrollWidth: document.documentElement.scrollWidth,
    };
})()"""


def test_layout_at_three_viewports(page, server, shots):
    open_ui(page, server, INJECTED_RUN)
    assert state(page) == "done", shown(page)
    for width, height in VIEWPORTS:
        viewport(page, width, height)
        for where in ("top", "bottom"):
            run_js(page, "window.scrollTo(0, 0)" if where == "top" else
                   "window.scrollTo(0, document.documentElement.scrollHeight)")
            run_js(page, "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
            got = run_js(page, OVERLAPS)
            at = f"{width}x{height}, scrolled to the {where}"
            assert got["fields"] > 40 and got["thumbs"] == 4, at
            assert got["covered"] == [], f"{at}: the output panel lies over {got['covered']}"
            assert got["stacked"] == [], f"{at}: in the output panel, one part lies over another: {got['stacked']}"
            assert got["scrollWidth"] <= width, f"{at}: the page scrolls sideways"
            left, top, right, bottom = got["go"]
            assert 0 <= left and right <= width and 0 <= top and bottom <= height, f"{at}: Generate is off screen {got}"
            if where == "top":
                screenshot(page, shots, f"ui-{width}x{height}.png")
    viewport(page, 1200, 900)
    page.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}])
    try:
        run_js(page, "window.scrollTo(0, 0)")
        screenshot(page, shots, "ui-dark-1200x900.png")
    finally:
        page.call("Emulation.setEmulatedMedia", features=[])


def test_failure_clears_the_last_run(page, server, shots):
    open_ui(page, server, INJECTED_RUN)
    assert state(page) == "done" and run_js(page, "$('strip').children.length") == 4, shown(page)
    run_js(page, "sdstream.state.controls.width.set('33'); $('go').click()")
    wait_for(page, "document.body.dataset.state === 'error'")
    after = run_js(page, """({
        frame: $("frame").hidden ? "" : $("frame").src, thumbs: $("strip").children.length,
        counter: $("counter").textContent, status: $("status").textContent, error: $("error").textContent,
        download: !$("download").hidden, result: !$("result").hidden, caption: $("caption").textContent,
        marked: [...document.querySelectorAll(".field.bad")].map((f) => f.dataset.api),
        bar: $("bar").firstElementChild.style.width, history: $("history").children.length,
    })""")
    assert after["frame"] == "" and after["thumbs"] == 0 and after["counter"] == "–" and after["caption"] == ""
    assert not after["download"] and not after["result"] and after["bar"] == "0%" and after["status"] == "failed"
    assert "width 33 is not a multiple of 2" in after["error"] and after["marked"] == ["width"]
    assert after["history"] == 1  # the earlier run stays in the history
    screenshot(page, shots, "ui-error-1200x900.png")


def test_stop_cancels_the_run(page, server, shots):
    cancelled = httpx.get(server + "/health").json()["queue"]["cancelled"]
    open_ui(page, server, "?model=tiny&steps=500&width=64&height=64&seed=1")
    run_js(page, "$('go').click()")
    wait_for(page, "$('strip').children.length >= 2")
    assert state(page) == "running" and run_js(page, "$('counter').textContent").startswith("step "), shown(page)
    screenshot(page, shots, "ui-running-1200x900.png")
    run_js(page, "$('stop').click()")
    wait_for(page, "document.body.dataset.state === 'idle'")
    assert run_js(page, "$('status').textContent").startswith("stopped at step")
    assert run_js(page, "!$('go').disabled && $('stop').disabled")
    deadline = time.monotonic() + 30
    while httpx.get(server + "/health").json()["queue"]["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "stopping did not cancel the run on the server"
        time.sleep(0.1)


def test_attention_map_beside_the_frame_live(page, server, shots):
    """attention + attention_words: while the run goes, the word's heat map of the step shown stands beside the
    frame (a square of its own, to its right); a pinned thumbnail shows its own step's map; a run without none."""
    query = "?prompt=a%20red%20circle&model=tiny&steps=500&width=64&height=64&seed=1&attention=1&attention_words=circle"
    open_ui(page, server, query)
    assert run_js(page, "sdstream.body()") == {"model": "tiny", "prompt": "a red circle", "steps": 500, "width": 64,
                                               "height": 64, "seed": 1, "attention": True, "attention_words": "circle"}
    run_js(page, "$('go').click()")
    wait_for(page, "$('strip').children.length >= 2 && document.querySelector('#stage .heatmap img')?.naturalWidth > 0")
    live = run_js(page, """(() => {
        const box = (e) => e.getBoundingClientRect(), h = document.querySelector("#stage .heatmap");
        const f = box($("frame")), m = box(h);
        return {state: document.body.dataset.state, words: [...document.querySelectorAll("#stage .heatmap")].length,
                word: h.dataset.word, caption: h.querySelector("figcaption").textContent,
                src: h.querySelector("img").src, beside: m.left >= f.right - 1 && Math.abs(m.top - f.top) < 2,
                square: Math.abs(m.width - f.width) < 2 && Math.abs(m.height - f.height) < 2 && f.width > 100};
    })()""")
    assert live["state"] == "running", shown(page)
    assert live["words"] == 1 and live["word"] == "circle" and live["caption"] == "attention to “circle”"
    assert live["src"].startswith("data:image/png;base64,") and live["beside"] and live["square"], live
    screenshot(page, shots, "ui-attention-1200x900.png")
    shutil.copy(shots / "ui-attention-1200x900.png", "/tmp/ui-attention.png")
    run_js(page, "$('stop').click()")
    wait_for(page, "document.body.dataset.state === 'idle'")
    # a thumbnail pinned: its own step's map
    run_js(page, "document.querySelectorAll('#strip .thumb')[0].click()")
    first = run_js(page, "sdstream.state.shown.frames[0].heat.circle")
    assert run_js(page, "document.querySelector('#stage .heatmap img').src") == first
    # without attention: no map beside the frame
    run_js(page, "sdstream.state.controls.attention.set(false); sdstream.state.controls.steps.set('2');"
                 "$('go').click()")
    wait_for(page, "document.body.dataset.state === 'done'")
    assert run_js(page, "[$('stage').querySelectorAll('.heatmap').length, $('stage').classList.contains('heat')]") == [
        0, False]
