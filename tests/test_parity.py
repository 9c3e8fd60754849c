"""Our own loop must give diffusers' pixels for the same inputs and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from sdstream.loop import denoise
from sdstream.preview import vae_decode
from sdstream.request import GenerationRequest
from sdstream.schedulers import make_scheduler


def ours(pipe, **kw) -> np.ndarray:
    req = GenerationRequest(model="tiny", device="cpu", **kw).validated()
    latents = None
    for event in denoise(pipe, req):
        latents = event.latents
    return np.asarray(vae_decode(pipe, latents), dtype=np.int16)


def with_scheduler(pipe, name):
    """The same components with the named scheduler, as a diffusers user would set it."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**{**pipe.components, "scheduler": make_scheduler(name, pipe.scheduler.config)})


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpm++-2m", "pndm"])
def test_txt2img_matches_stable_diffusion_pipeline(tiny, scheduler):
    kw = dict(prompt="a red circle on a blue background", negative_prompt="green", steps=12, guidance=6.0, seed=7)
    theirs = with_scheduler(tiny, scheduler)(
        kw["prompt"],
        negative_prompt=kw["negative_prompt"],
        num_inference_steps=12,
        guidance_scale=6.0,
        height=32,
        width=32,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    diff = np.abs(ours(tiny, scheduler=scheduler, **kw) - np.asarray(theirs, dtype=np.int16))
    assert diff.max() <= 1


def test_txt2img_without_guidance_and_other_size(tiny):
    theirs = tiny("a square", num_inference_steps=5, guidance_scale=1.0, height=48, width=32,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    mine = ours(tiny, prompt="a square", steps=5, guidance=1.0, width=32, height=48, seed=3)
    assert mine.shape == (48, 32, 3)
    assert np.abs(mine - np.asarray(theirs, dtype=np.int16)).max() <= 1


def test_img2img_matches_img2img_pipeline(tiny, tmp_path):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    img2img = StableDiffusionImg2ImgPipeline(**tiny.components)
    theirs = img2img("a yellow triangle", image=init, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                     generator=torch.Generator("cpu").manual_seed(11)).images[0]
    mine = ours(tiny, prompt="a yellow triangle", init_image=str(tmp_path / "init.png"), strength=0.6, steps=10,
                guidance=5.0, seed=11)
    assert np.abs(mine - np.asarray(theirs, dtype=np.int16)).max() <= 1


def test_same_seed_same_pixels_different_seed_different(tiny):
    a = ours(tiny, prompt="a red circle", steps=4, seed=5)
    b = ours(tiny, prompt="a red circle", steps=4, seed=5)
    c = ours(tiny, prompt="a red circle", steps=4, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
