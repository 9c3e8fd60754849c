"""Faults mid-run and hostile inputs: fail loudly and cleanly, keep what was made.

OOM, NaN and overflow are injected at the seam where they happen (the VAE or UNet call)
instead of exhausting the machine.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import sdstream
from sdstream.errors import BadInput, SdstreamError
from sdstream.inputs import open_image
from sdstream.request import GenerationRequest

from conftest import read_line


def run(tmp_path, pipe_dtype="auto", **kw):
    req = GenerationRequest(model="tiny", steps=4, seed=1, device="cpu", dtype=pipe_dtype, **kw)
    return sdstream.run(req, tmp_path / "run")


def manifest(tmp_path):
    return json.loads((tmp_path / "run" / "run.json").read_text())


def test_vae_out_of_memory_is_retried_tiled(tiny, tmp_path, monkeypatch):
    real, calls = tiny.vae.decode, []

    def decode(*a, **kw):
        calls.append(tiny.vae.use_tiling)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(tiny.vae, "decode", decode)
    run(tmp_path, preview="approx")
    assert calls == [False, True] and tiny.vae.use_tiling is False
    assert manifest(tmp_path)["recoveries"] == ["vae_tiled_retry"] and (tmp_path / "run" / "final.png").exists()


def test_fp16_vae_overflow_is_retried_in_fp32_never_a_black_image(tmp_path, monkeypatch):
    pipe = sdstream.load("tiny", device="cpu", dtype="bf16")  # the half-precision path, on a CPU
    real = pipe.vae.decode

    def decode(z, *a, **kw):  # what an overflowing half-precision VAE returns
        out = real(z, *a, **kw)
        return (out[0] * float("nan"),) if z.dtype != torch.float32 else out

    monkeypatch.setattr(pipe.vae, "decode", decode)
    run(tmp_path, pipe_dtype="bf16", preview="none")
    assert manifest(tmp_path)["recoveries"] == ["vae_fp32_retry"] and pipe.vae.dtype == torch.bfloat16
    assert Image.open(tmp_path / "run" / "final.png").getextrema() != ((0, 0),) * 3


def test_nan_latents_fail_the_run_naming_the_step(tiny, tmp_path, monkeypatch):
    real, calls = tiny.unet.forward, []

    def forward(*a, **kw):
        calls.append(1)
        out = real(*a, **kw)
        return (out[0] * float("nan"),) if len(calls) == 3 else out

    monkeypatch.setattr(tiny.unet, "forward", forward)
    with pytest.raises(SdstreamError, match="NaN/inf at step 3") as e:
        run(tmp_path)
    assert "--dtype fp32" in e.value.hint
    assert manifest(tmp_path)["status"] == "failed" and not (tmp_path / "run" / "final.png").exists()


def test_out_of_memory_in_the_loop_names_the_knobs(tiny, tmp_path, monkeypatch):
    def forward(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(tiny.unet, "forward", forward)
    with pytest.raises(SdstreamError, match="out of memory") as e:
        run(tmp_path)
    assert "--cpu-offload" in e.value.hint and "--vae-tiling" in e.value.hint
    assert manifest(tmp_path)["status"] == "failed"


def test_sigterm_exits_143_and_keeps_the_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sdstream", "generate", "-m", "tiny", "--steps", "400", "--json",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while json.loads(read_line(proc.stdout)).get("step") != 2:
        pass
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "interrupted" and len(m["frames"]) >= 2 and not list(out.rglob("*.tmp"))


def _png(size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mangled_image_bytes_give_only_clean_errors(tmp_path, data):
    good = _png()
    how = data.draw(st.sampled_from(["truncate", "flip", "random", "prefix"]))
    if how == "truncate":
        blob = good[: data.draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(good) - 1))
        blob = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1 :]
    elif how == "random":
        blob = data.draw(st.binary(max_size=300))
    else:
        blob = data.draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP"]))
        blob += data.draw(st.binary(max_size=200))
    path = tmp_path / "x.png"
    path.write_bytes(blob)
    try:
        image = open_image(path, "--init-image")
    except BadInput as e:
        assert str(e).startswith("--init-image ") and "\n" not in str(e)
    else:
        assert image.mode == "RGB"


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    (tmp_path / "big.png").write_bytes(_png((40, 40)))
    with pytest.raises(BadInput, match="too large"):
        open_image(tmp_path / "big.png", "--init-image")


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg", "--init-image").size == (10, 20)


values = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-5, 50), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["steps", "guidance", "width", "height", "seed", "scheduler", "strength",
                                        "start_step", "mask", "inject_at_step", "noise_strength", "device", "dtype",
                                        "frames_every", "frame_format", "preview", "frame_source"]), values))
def test_random_option_values_give_only_clean_errors(options):
    if isinstance(options.get("inject_at_step"), list):
        options["inject_at_step"] = tuple(options["inject_at_step"])
    try:
        GenerationRequest(model="tiny", **options).validated()
    except BadInput as e:
        assert "\n" not in str(e) and str(e).startswith("--")


def test_hub_errors_become_one_line_messages_with_a_next_step():
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from sdstream.models.loader import hub_error

    def bare(cls):  # the real classes, without the HTTP response they usually wrap
        e = cls.__new__(cls)
        Exception.__init__(e, "401 Client Error")
        return e

    gated = hub_error("model 'x'", True, bare(GatedRepoError), "hint")
    assert type(gated) is SdstreamError and "HF_TOKEN" in str(gated)
    missing = hub_error("model 'x'", True, bare(RepositoryNotFoundError), "hint")
    assert isinstance(missing, BadInput) and "does not exist" in str(missing)
    offline = hub_error("model 'x'", True, OSError("We couldn't connect to the Hub"), "use tiny")
    assert "not on disk" in str(offline) and offline.hint == "use tiny"
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # the way diffusers wraps the Hub's own error: found by its type, in the chain of causes
        try:
            raise LocalEntryNotFoundError("not in the cache")
        except LocalEntryNotFoundError as inner:
            raise OSError("Error no file named model_index.json found") from inner
    except OSError as wrapped:
        assert "not on disk" in str(hub_error("model 'x'", True, wrapped, "use tiny"))
    assert hub_error("model 'x'", False, ValueError("bad config"), "hint") is None


def test_a_folder_missing_a_part_says_which(tmp_path):
    import shutil

    from sdstream.models.registry import tiny_path

    broken = tmp_path / "broken"
    shutil.copytree(tiny_path(), broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(BadInput, match="missing unet"):
        sdstream.load(str(broken))


@given(st.text(max_size=300))
def test_names_made_from_prompts_are_safe(prompt):
    from sdstream.record.files import slug

    name = slug(prompt)
    assert 1 <= len(name) <= 40 and name.isascii() and "/" not in name and ".." not in name
    assert all(c.isalnum() or c == "-" for c in name)


def test_default_run_folders_are_unique(tmp_path):
    from sdstream.record.files import new_dir, slug

    name = f"{slug(chr(10).join(['../../etc/passwd', '[31m']))}-1"
    first = new_dir(tmp_path, name, create=True)
    second = new_dir(tmp_path, name, create=True)  # made at once, exclusively: two runs never share one
    assert first.parent == second.parent == tmp_path and first != second and first.is_dir() and second.is_dir()
    assert first.name.endswith("-etc-passwd-31m-1")


def test_sigterm_while_loading_exits_143_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sdstream", "generate", "-m", "tiny", "--json", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(read_line(proc.stdout))["event"] == "load"  # torch and the model are loading now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert not out.exists()


def test_a_broken_sdstream_json_in_a_model_folder_names_the_file(tmp_path):
    from sdstream.models.notes import model_notes

    assert model_notes(tmp_path) == {}  # no notes: nothing to add to what diffusers' configs say
    (tmp_path / "sdstream.json").write_text("[1, 2]")
    with pytest.raises(BadInput, match=r"sdstream.json is not readable: not a JSON object"):
        model_notes(tmp_path)
    (tmp_path / "sdstream.json").write_text("{not json")
    with pytest.raises(BadInput, match=r"sdstream.json is not readable"):
        model_notes(tmp_path)
