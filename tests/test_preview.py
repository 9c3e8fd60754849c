"""Preview decoders and the frame writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdstream
from sdstream.frames import FrameWriter
from sdstream.loop import denoise
from sdstream.preview import SD1_LATENT_RGB, Previewer, vae_decode
from sdstream.request import GenerationRequest

from conftest import sdstream_cli


@pytest.fixture(scope="module")
def last_event(tiny):
    req = GenerationRequest(model="tiny", steps=6, seed=4, prompt="a square").validated()
    return list(denoise(tiny, req))[-1]


def test_approx_is_the_linear_map_at_latent_resolution(tiny, last_event):
    picture = Previewer(tiny, "approx", "x0")(last_event)
    assert picture.dtype == torch.uint8 and picture.shape == (16, 16, 3)
    expected = torch.einsum("chw,cr->hwr", last_event.denoised[0], torch.tensor(SD1_LATENT_RGB))
    assert torch.equal(picture, ((expected + 1) * 127.5).clamp(0, 255).to(torch.uint8))


def test_vae_preview_of_the_last_latent_is_the_final_image(tiny, last_event):
    picture = Previewer(tiny, "vae", "latent")(last_event).numpy().astype(int)
    final = np.asarray(vae_decode(tiny, last_event.latents), dtype=int)
    assert picture.shape == final.shape == (32, 32, 3) and np.abs(picture - final).max() <= 1


def test_frame_source_x0_differs_from_latent_early_on(tiny):
    first = next(iter(denoise(tiny, GenerationRequest(model="tiny", steps=6, seed=4).validated())))
    assert not torch.equal(Previewer(tiny, "approx", "x0")(first), Previewer(tiny, "approx", "latent")(first))


def test_frame_writer_writes_every_frame_from_its_threads(tmp_path):
    writer = FrameWriter(tmp_path, "webp", threads=3)
    paths = [writer.submit(step, torch.full((4, 6, 3), step, dtype=torch.uint8)) for step in range(1, 21)]
    writer.close()
    assert sorted(tmp_path.iterdir()) == paths
    assert [Image.open(p).size for p in paths] == [(6, 4)] * 20


def test_manifest_records_preview_choice(tiny, tmp_path):
    sdstream.run(GenerationRequest(model="tiny", steps=3, seed=1, preview="vae", frame_source="latent"), tmp_path / "r")
    request = json.loads((tmp_path / "r" / "run.json").read_text())["request"]
    assert (request["preview"], request["frame_source"]) == ("vae", "latent")


def test_taesd_not_on_disk_offline_is_a_clear_error(tmp_path):
    proc = sdstream_cli("generate", "-m", "tiny", "--steps", "2", "--preview", "taesd", "-o", str(tmp_path / "r"),
                        env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 1 and "madebyollin/taesd" in proc.stderr and "--preview approx" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
