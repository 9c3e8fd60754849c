"""Preview decoders and the frame writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdstream
from sdstream.core.preview import Previewer, vae_decode
from sdstream.record.files import Writer, picture_encoder
from sdstream.request import GenerationRequest


class Record(sdstream.Sink):
    def __init__(self):
        self.events = []

    def step(self, step):
        self.events.append(step.event)


def events(**kw):
    record = Record()
    sdstream.generate(GenerationRequest(model="tiny", **kw), [record])
    return record.events


@pytest.fixture(scope="module")
def last_event():
    return events(steps=6, seed=4, prompt="a square")[-1]


# SD 1.x's latent -> RGB factors as published (A1111's "Approx cheap", ComfyUI's latent_formats.SD15)
SD1_LATENT_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                  (-0.2120, -0.2616, -0.7177))


def approx(latents, weights, bias):
    image = torch.einsum("chw,cr->hwr", latents[0], torch.tensor(weights)) + torch.tensor(bias)
    return ((image + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def test_approx_is_the_models_own_linear_map_at_latent_resolution(tiny, last_event):
    factors = tiny.sdstream_notes["latent_rgb"]  # fitted to tiny's VAE by tools/train_tiny.py (its sdstream.json)
    picture = Previewer(tiny, "approx", "x0")(last_event)
    assert picture.dtype == torch.uint8 and picture.shape == (16, 16, 3)
    assert torch.equal(picture, approx(last_event.denoised, factors["weights"], factors["bias"]))


def test_approx_without_the_models_own_factors_uses_sd1s(tiny, last_event, monkeypatch):
    monkeypatch.setattr(tiny, "sdstream_notes", {})
    picture = Previewer(tiny, "approx", "x0")(last_event)
    assert torch.equal(picture, approx(last_event.denoised, SD1_LATENT_RGB, (0, 0, 0)))


def test_vae_preview_of_the_last_latent_is_the_final_image(tiny, last_event):
    picture = Previewer(tiny, "vae", "latent")(last_event).numpy().astype(int)
    final = np.asarray(vae_decode(tiny, last_event.latents), dtype=int)
    assert picture.shape == final.shape == (32, 32, 3) and np.abs(picture - final).max() <= 1


def test_frame_source_x0_differs_from_latent_early_on(tiny):
    first = events(steps=6, seed=4)[0]
    assert not torch.equal(Previewer(tiny, "approx", "x0")(first), Previewer(tiny, "approx", "latent")(first))


def test_frame_writer_writes_every_frame_from_its_threads(tmp_path):
    writer, encode = Writer(threads=3), picture_encoder("webp")
    paths = [writer.submit(tmp_path / f"step-{step:04d}.webp", torch.full((4, 6, 3), step, dtype=torch.uint8), encode)
             for step in range(1, 21)]
    writer.close()
    assert sorted(tmp_path.iterdir()) == paths
    assert [Image.open(p).size for p in paths] == [(6, 4)] * 20


def test_manifest_records_preview_choice(tiny, tmp_path):
    sdstream.run(GenerationRequest(model="tiny", steps=3, seed=1, preview="vae", frame_source="latent"), tmp_path / "r")
    request = json.loads((tmp_path / "r" / "run.json").read_text())["request"]
    assert (request["preview"], request["frame_source"]) == ("vae", "latent")


def test_taesd_not_on_disk_offline_is_a_clear_error_before_anything_loads(cli, tmp_path):
    code, _, stderr = cli("generate", "-m", "tiny", "--steps", "2", "--preview", "taesd", "-o", str(tmp_path / "r"))
    assert code == 2 and "madebyollin/taesd" in stderr and "--preview approx" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_taesd_from_a_local_folder_decodes_x0_into_every_frame(tiny, last_event, tmp_path):
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taesd"  # an AutoencoderTiny that upsamples 2x, as tiny's VAE does (random weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        taesd = AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                                num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).eval()
    taesd.save_pretrained(folder)
    picture = Previewer(tiny, "taesd", "x0", str(folder))(last_event)
    with torch.no_grad():
        expected = taesd.decode(last_event.denoised).sample[0].permute(1, 2, 0)
    assert torch.equal(picture, ((expected + 1) * 127.5).clamp(0, 255).to(torch.uint8))

    sdstream.run(GenerationRequest(model="tiny", steps=3, seed=1, preview="taesd", taesd=str(folder)), tmp_path / "r")
    frames = sorted((tmp_path / "r" / "frames").iterdir())
    assert [Image.open(f).size for f in frames] == [(32, 32)] * 3


def test_defaults_on_tiny_give_frames_that_look_like_the_final_image(tmp_path):
    """tiny's folder declares preview vae (its linear colours are rough): with every default, the last frame is
    the picture, within 10 levels on average, and at the picture's size."""
    result = sdstream.run(GenerationRequest(model="tiny", prompt="a yellow circle on a blue background", seed=3,
                                            steps=12, guidance=5.0), tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["preview"] == "vae" and manifest["request"]["preview"] == "auto"
    last = np.asarray(Image.open(tmp_path / "r" / manifest["frames"][-1]["file"]).convert("RGB"), dtype=float)
    final = np.asarray(Image.open(result.image_path), dtype=float)
    assert last.shape == final.shape == (32, 32, 3) and np.abs(last - final).mean() < 10


def test_approx_frames_are_written_at_the_images_size_or_frame_size(tmp_path):
    sdstream.run(GenerationRequest(model="tiny", steps=2, seed=1, preview="approx"), tmp_path / "a")
    sdstream.run(GenerationRequest(model="tiny", steps=2, seed=1, preview="approx", frame_size=80, width=32,
                                   height=16), tmp_path / "b")
    assert {Image.open(p).size for p in (tmp_path / "a" / "frames").iterdir()} == {(32, 32)}  # not 16x16 stamps
    assert {Image.open(p).size for p in (tmp_path / "b" / "frames").iterdir()} == {(80, 40)}  # the image's aspect


def test_frame_sources_of_the_two_halves_of_guidance(tmp_path):
    """x0-cond and x0-uncond picture what the prompt alone and the negative prompt alone predict: three different
    pictures of one trajectory (the same final image); unguided, x0-cond is x0 and x0-uncond is refused."""
    def frames(source, guidance=5.0):
        out = tmp_path / f"{source}-{guidance}"
        sdstream.run(GenerationRequest(model="tiny", prompt="a red circle on a blue background", seed=4, steps=4,
                                       guidance=guidance, width=16, height=16, preview="vae", frame_source=source),
                     out)
        steps = [np.asarray(Image.open(out / "frames" / f"step-{k:04d}.png"), dtype=np.int16) for k in (1, 2)]
        return steps, np.asarray(Image.open(out / "final.png"), dtype=np.int16)

    (x0, final), (cond, final_cond), (uncond, final_uncond) = (frames(s) for s in ("x0", "x0-cond", "x0-uncond"))
    assert np.array_equal(final, final_cond) and np.array_equal(final, final_uncond)
    for a, b in ((x0, cond), (x0, uncond), (cond, uncond)):
        assert np.abs(a[0] - b[0]).mean() > 1
    (x0, _), (cond, _) = frames("x0", 1.0), frames("x0-cond", 1.0)
    assert all(np.array_equal(a, b) for a, b in zip(x0, cond))
    with pytest.raises(sdstream.BadInput, match="x0-uncond"):
        frames("x0-uncond", 1.0)
