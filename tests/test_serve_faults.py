"""The server's run is the CLI's run: out of memory and NaN/inf end it the same way, with the same message and
hint, injected at the same seam (the UNet call) on the app in this process."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

import sdstream
from sdstream.errors import SdstreamError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from sdstream.serve.app import create_app  # noqa: E402
from sdstream.serve.schema import Limits  # noqa: E402

REQUEST = {"prompt": "a red circle", "model": "tiny", "steps": 4, "seed": 1}


@pytest.fixture(scope="module")
def client(tiny):
    with TestClient(create_app(device="cpu"), base_url="http://localhost") as c:
        yield c


def stream(client, body) -> tuple[int, list]:
    with client.stream("POST", "/generate", json=body) as r:
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        return r.status_code, [line if line == "[DONE]" else json.loads(line) for line in lines]


def cli_error(**kw) -> SdstreamError:
    with pytest.raises(SdstreamError) as e:
        sdstream.generate(sdstream.GenerationRequest(**{**REQUEST, "device": "cpu", **kw}))
    return e.value


def fail_at_second_call(tiny, monkeypatch, fault):
    real, calls = tiny.unet.forward, []

    def forward(*a, **kw):
        calls.append(1)
        if len(calls) % 4 == 2:  # the second step of each 4-step run
            return fault(real(*a, **kw))
        return real(*a, **kw)

    monkeypatch.setattr(tiny.unet, "forward", forward)


@pytest.mark.parametrize("fault", ["oom", "nan"])
def test_a_fault_mid_run_ends_the_stream_as_it_ends_the_cli(client, tiny, monkeypatch, fault):
    def oom(out):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def nan(out):
        return (out[0] * float("nan"),)

    fail_at_second_call(tiny, monkeypatch, oom if fault == "oom" else nan)
    expected = cli_error()
    before = client.get("/health").json()["queue"]
    status, events = stream(client, REQUEST)
    assert status == 200 and events[-1] == "[DONE]"
    error = events[-2]
    assert error["error"] == str(expected) and error["hint"] == expected.hint and error["done"] is False
    assert ("out of memory" if fault == "oom" else "NaN/inf at step") in error["error"]
    after = client.get("/health").json()["queue"]
    assert after["failed"] == before["failed"] + 1 and after["running"] is False
    monkeypatch.undo()
    status, events = stream(client, REQUEST)  # memory released, the worker goes on
    assert status == 200 and events[-2]["done"] is True


def test_head_and_limits_are_answered(client):
    assert client.head("/").status_code == 200 and client.head("/health").status_code == 200
    limits = client.get("/").json()["limits"]
    r = client.post("/generate", json={**REQUEST, "width": 2048, "height": 2048})
    assert r.status_code == 422 and f"limit of {limits['max_pixels']} pixels" in r.json()["detail"]
    r = client.post("/generate", json={**REQUEST, "prompt": "a " * limits["max_prompt"]})
    assert r.status_code == 422 and "prompt is" in r.json()["detail"] and "--" not in r.json()["detail"]


def png_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_steps_times_pixels_is_bounded(client, tiny):
    """max_work: a size within max_pixels with more steps than the bound allows is refused from the body, before
    it waits in line; at the model's own size it is found once the model says its size; the steps counted are
    those that run (from --start-step on)."""
    limits = client.get("/").json()["limits"]
    side = int(limits["max_pixels"] ** 0.5)  # 1024 x 1024: exactly max_pixels
    steps = limits["max_work"] // (side * side) + 1
    r = client.post("/generate", json={**REQUEST, "steps": steps, "width": side, "height": side})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == (f"steps x width x height ({steps} x {side}x{side}) is over this server's limit "
                                  f"of {limits['max_work']}")
    with TestClient(create_app(device="cpu", limits=Limits(max_work=3 * 32 * 32)), base_url="http://localhost") as c:
        assert c.get("/").json()["limits"]["max_work"] == 3 * 32 * 32
        r = c.post("/generate", json={**REQUEST, "steps": 4})  # tiny's own 32 x 32
        assert r.status_code == 422 and "(4 x 32x32) is over this server's limit of 3072" in r.json()["detail"]
        status, events = stream(c, {**REQUEST, "steps": 4, "start_step": 2, "start_image": png_b64()})  # 3 steps run
        assert status == 200 and events[-2]["done"] is True, events[-2:]
        assert c.get("/health").json()["queue"]["invalid"] == 1


def test_the_default_upload_limit_is_20_mb(client):
    limit = client.get("/").json()["limits"]["max_body_bytes"]
    assert limit == 20 * 1024 * 1024
    r = client.post("/generate", content=b"{" + b" " * limit + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 413
