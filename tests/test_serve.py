"""`sdstream serve` against a real uvicorn server in a subprocess, on the tiny model.

One server for the module (--preload tiny --max-queue 1 --max-upload-mb 2, a private TMPDIR); the tests run in
order and each leaves no generation behind; the last that uses it stops it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import sdstream_cli

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


UPLOAD_MB = 2  # the module's server is started with --max-upload-mb 2


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """(base URL, process, its private TMPDIR) of `sdstream serve --port P --preload tiny --max-queue 1
    --max-upload-mb 2`, its temporary folder empty at the start."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    private_tmp = tmp_path_factory.mktemp("server-tmp")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdstream", "serve", "--port", str(port), "--preload", "tiny", "--max-queue", "1",
             "--max-upload-mb", str(UPLOAD_MB), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(private_tmp), "TEMP": str(private_tmp),
                 "TMP": str(private_tmp)},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sdstream serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"sdstream serve did not come up:\n{log.read_text()}")
        time.sleep(0.3)
    yield url, proc, private_tmp
    _stop(proc)


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(15)


@pytest.fixture(scope="module")
def server(serving):
    """Base URL of the module's server."""
    return serving[0]


def events(lines) -> list:
    """The `data:` payloads of an SSE stream: dicts, and the final '[DONE]' as a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def generate(url: str, timeout: float = 120, **body) -> httpx.Response:
    return httpx.post(url + "/generate", json={"model": "tiny", **body}, timeout=timeout)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()["queue"]


def png_b64(size=(16, 16), color=(200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_info_health_diagnostics_openapi_ui(server):
    info = httpx.get(server + "/").json()
    assert info["status"] == "running" and info["device"] == "cpu"
    assert info["loaded_models"] == ["tiny"]
    assert {"tiny", "compressibility", "sd15"} <= set(info["available_models"])
    assert "circle" in info["masks"] and "ddim" in info["schedulers"]
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok" and h["queue"]["max_queue"] == 1 and h["queue"]["running"] is False
    assert "python" in httpx.get(server + "/diagnostics", timeout=60).json()
    schema = httpx.get(server + "/openapi.json").json()
    assert {"/", "/generate", "/health", "/diagnostics", "/ui"} <= set(schema["paths"])
    body = schema["components"]["schemas"]["GenerateBody"]["properties"]
    assert {"prompt", "steps", "noise_mask_type", "inject_at_step", "init_image", "prompt_image", "seed",
            "frame_source"} <= set(body)
    page = httpx.get(server + "/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "getReader" in page.text and "<script src" not in page.text and "https://" not in page.text


def test_stream_four_steps(server):
    from PIL import Image

    with httpx.stream("POST", server + "/generate", timeout=120,
                      json={"prompt": "a red circle", "model": "tiny", "steps": 4, "seed": 7,
                            "noise_mask_type": "center_circle", "inject_at_step": 3}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        got = events(r.iter_lines())
    assert len(got) == 6 and got[-1] == "[DONE]"
    steps, final = got[:4], got[4]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e["total_steps"] == 4 and e["done"] is False and e["model"] == "tiny" for e in steps)
    assert [e["progress"] for e in steps] == [25.0, 50.0, 75.0, 100.0]
    frame = Image.open(io.BytesIO(base64.b64decode(steps[1]["image"], validate=True)))
    assert frame.format == "JPEG" and frame.size == (32, 32)
    assert final["done"] is True and final["seed"] == 7 and final["step"] == 4
    assert (final["width"], final["height"]) == (32, 32)
    assert Image.open(io.BytesIO(base64.b64decode(final["image"]))).format == "JPEG"
    assert Image.open(io.BytesIO(base64.b64decode(final["png"]))).size == (32, 32)
    # same request, same seed: the same picture
    again = events(generate(server, prompt="a red circle", steps=4, seed=7, noise_mask_type="circle",
                            inject_at_step=[3], preview="none").iter_lines())
    assert len(again) == 6 and again[0]["image"] is None and again[4]["png"] == final["png"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"steps": 0}, "steps 0 is not allowed"),
        ({"noise_mask_type": "blob"}, "noise_mask_type 'blob' is not one of: circle"),
        ({"init_image": "not base64!"}, "init_image is not valid base64"),
        ({"start_image": "data:image/png,abc", "start_step": 2}, "start_image: a data URL must be base64"),
        ({"init_image": base64.b64encode(b"hello").decode()}, "init_image (uploaded) is not an image"),
        ({"guidance_scale": 500}, "guidance_scale 500"),
        ({"inject_at_step": 3}, "inject_at_step applies only with noise_mask_type"),
        ({"steps": "4"}, "steps: Input should be a valid integer"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"model": "someone/else"}, "model 'someone/else' is not served here"),
        # needs the model
        ({"steps": 4, "noise_mask_type": "circle", "inject_at_step": 9}, "inject_at_step 9 is outside"),
        ({"width": 33}, "width 33 is not a multiple of 2"),
        ({"attention_words": "circle"}, "attention_words applies only with attention"),
        ({"prompt": "a red circle", "attention": True, "attention_words": "square"},
         "attention_words 'square' is not a word of the prompt (its words: a, red, circle)"),
    ],
)
def test_bad_input_is_422(server, body, message):
    r = generate(server, **body)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_attention_map_of_a_word_with_every_step_pixels_unchanged(server):
    """attention + attention_words: each step's event carries the word's heat map (a PNG over the frame); without
    them the events have none, and the final picture is the same either way."""
    from PIL import Image

    body = dict(prompt="a red circle", steps=3, seed=5)
    watched = events(generate(server, **body, attention=True, attention_words="circle").iter_lines())
    plain = events(generate(server, **body).iter_lines())
    assert len(watched) == len(plain) == 5 and watched[-1] == plain[-1] == "[DONE]"
    for e in watched[:3]:
        assert list(e["attention"]) == ["circle"]
        heat = Image.open(io.BytesIO(base64.b64decode(e["attention"]["circle"], validate=True)))
        assert heat.format == "PNG" and heat.mode == "RGB" and heat.size[0] > 1
    assert len({e["attention"]["circle"] for e in watched[:3]}) == 3  # a map per step, not one repeated
    assert not any("attention" in e for e in plain[:4])
    assert watched[3]["png"] == plain[3]["png"] and watched[3]["done"]


def test_attention_needs_no_run_folder_and_a_flux_model_is_refused_in_one_line():
    """The server's run (no folder) may ask for maps; a denoiser without UNet cross-attention is a 422 in API
    names (the worker answers BadInput with 422 and api_message)."""
    from types import SimpleNamespace

    import torch

    from sdstream import BadInput, GenerationRequest
    from sdstream.record.attention import attention_maps, check_request
    from sdstream.serve.schema import api_message
    from sdstream.serve.worker import Stream

    req = GenerationRequest(model="tiny", prompt="a red circle", attention=True).validated()
    check_request(req, [Stream(None, None)])  # no BadInput: the stream takes the heat maps
    pipe = type("FluxPipeline", (), {})()
    pipe.transformer = type("FluxTransformer2DModel", (torch.nn.Module,), {})()
    with pytest.raises(BadInput) as refused:
        attention_maps(req, SimpleNamespace(pipe=pipe), [Stream(None, None)])
    message = api_message(str(refused.value))
    assert message.startswith("attention records a UNet's cross-attention; a FluxPipeline's denoiser is a "
                              "FluxTransformer2DModel (joint attention)") and "\n" not in message


def test_pictures_decoded_strictly_and_bounded(server):
    from PIL import Image

    # a data: URL works; the picture enters at start_step
    got = events(generate(server, steps=4, start_step=3, seed=1,
                          start_image="data:image/png;base64," + png_b64()).iter_lines())
    assert [e["step"] for e in got[:2]] == [3, 4] and got[2]["done"] and got[-1] == "[DONE]"
    # over the server's pixel limit (4096 x 4096): refused before it is decoded
    buf = io.BytesIO()
    Image.new("1", (4200, 4100)).save(buf, "PNG")
    r = generate(server, init_image=base64.b64encode(buf.getvalue()).decode())
    assert r.status_code == 422 and "too large to decode safely" in r.json()["detail"]
    # prompt_image: handed to GenerationRequest when it has the field, else refused as not supported yet
    r = generate(server, prompt_image="%%%")
    assert r.status_code == 422
    info = httpx.get(server + "/").json()
    assert ("prompt_image is not valid base64" if info["prompt_image"] else "not supported yet") in r.json()["detail"]


def test_host_header(server):
    port = server.rsplit(":", 1)[1]
    assert httpx.get(server + "/health", headers={"Host": "evil.com"}).status_code == 400
    assert httpx.get(server + "/health", headers={"Host": f"evil.com:{port}"}).status_code == 400
    for ok in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(server + "/health", headers={"Host": ok}).status_code == 200


def test_upload_size_is_the_set_one(server):
    """--max-upload-mb 2: stated in GET /; a body over it is a 413 (FastAPI's max_body_size), whether it says its
    length up front or comes in chunks; one just under it is read (and refused for what it says, not its size)."""
    limit = UPLOAD_MB * 1024 * 1024
    assert httpx.get(server + "/", timeout=10).json()["limits"]["max_body_bytes"] == limit
    over = b'{"prompt": "' + b"a" * limit + b'"}'
    for content in (over, (over[i:i + 65536] for i in range(0, len(over), 65536))):  # Content-Length; chunked
        r = httpx.post(server + "/generate", content=content, headers={"Content-Type": "application/json"},
                       timeout=60)
        assert r.status_code == 413, r.text
    r = httpx.post(server + "/generate", json={"model": "tiny", "prompt": "a" * (limit - 100)}, timeout=60)
    assert r.status_code == 422 and "over this server's limit of 1000" in r.json()["detail"]


@contextlib.contextmanager
def one_running_one_waiting(url: str, long_run: dict, wait):
    """LONG_RUN streaming (its first two events read), then WAIT (a function that sends another request) in a
    thread; yields that thread once the server's line holds WAIT's request. Leaving closes the long run's stream."""
    with httpx.Client(timeout=120) as client, client.stream("POST", url + "/generate", json=long_run) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        assert len(events(next(lines) for _ in range(4))) == 2  # two events (each line + blank line)
        waiting = threading.Thread(target=wait)
        waiting.start()
        deadline = time.monotonic() + 30
        while health(url)["waiting"] < 1:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.05)
        yield waiting


def test_queue_limit_and_cancel_on_disconnect(server):
    """One runs, one waits (--max-queue 1), a third gets 503; closing the running stream cancels it."""
    before = health(server)
    results = {}

    def queued():
        results["b"] = generate(server, steps=4, seed=2)

    # A: long and large enough that it cannot finish on its own while the client reads nothing
    long_run = {"model": "tiny", "steps": 500, "width": 128, "height": 128, "seed": 1}
    with one_running_one_waiting(server, long_run, queued) as b:
        c = generate(server, steps=4)
        assert c.status_code == 503 and "busy" in c.json()["detail"]
        assert health(server)["running"] is True
    # A's client is gone: its run stops at the next step (not after 500), and B runs to the end
    closed = time.monotonic()
    while health(server)["cancelled"] == before["cancelled"]:
        assert time.monotonic() - closed < 30, "closing the stream did not cancel the run"
        time.sleep(0.1)
    b.join(120)
    assert not b.is_alive()
    got = events(results["b"].iter_lines())
    assert len(got) == 6 and got[4]["done"] and got[-1] == "[DONE]"
    after = health(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["rejected"] == before["rejected"] + 1
    assert after["completed"] == before["completed"] + 1
    assert after["running"] is False and after["waiting"] == 0


def test_the_server_leaves_no_temporary_files(serving):
    """Pictures uploaded (init, start and prompt images): runs that finished, one refused, and at the stop one
    running and one waiting; the server stopped as a service manager stops it (SIGTERM). Its private TMPDIR, empty
    when it started, holds nothing after. Last in this module: it stops the module's server."""
    url, proc, private_tmp = serving
    got = events(generate(url, steps=3, seed=1, start_step=2, start_image="data:image/png;base64," + png_b64(),
                          prompt_image=png_b64(color=(20, 20, 220))).iter_lines())
    assert got[-2]["done"] and got[-1] == "[DONE]", got[-2:]
    assert generate(url, init_image=png_b64(size=(64, 64)), width=2048, height=2048).status_code == 422
    waited = {}

    def waiting():
        try:
            waited["status"] = generate(url, timeout=30, steps=3, init_image=png_b64()).status_code
        except httpx.HTTPError as e:  # (a server that stops may drop it)
            waited["status"] = repr(e)

    long_run = {"model": "tiny", "steps": 500, "seed": 1, "init_image": png_b64(), "strength": 1.0,
                "noise_mask_type": "circle", "inject_at_step": 100}
    with one_running_one_waiting(url, long_run, waiting) as second:
        proc.terminate()  # one run going, one waiting; then the running one's client leaves
    second.join(40)
    assert not second.is_alive() and "status" in waited
    proc.wait(30)
    # (torch's compile cache folder, which importing diffusers makes in TMPDIR for every sdstream command, is
    # torch's own and meant to stay; it must hold nothing of ours)
    left = sorted(str(p.relative_to(private_tmp)) for p in private_tmp.rglob("*")
                  if not (p.name.startswith("torchinductor_") and p.parent == private_tmp and p.is_dir()))
    assert left == [], f"the server left {left} in its TMPDIR"


def test_missing_extra_exits_2(tmp_path):
    blocked = tmp_path / "fastapi"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    r = sdstream_cli("serve", env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2
    assert "sdstream serve needs the serve extra: pip install 'sdstream[serve]'" in r.stderr
