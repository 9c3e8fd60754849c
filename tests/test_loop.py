"""The loop and its interventions through the library API."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdstream
from sdstream import frames, masks
from sdstream.errors import SdstreamError
from sdstream.loop import _inject, _x0, denoise
from sdstream.request import GenerationRequest


def events(pipe, **kw):
    req = GenerationRequest(model="tiny", device="cpu", steps=10, seed=9, prompt="a circle", **kw).validated()
    return list(denoise(pipe, req))


@pytest.mark.parametrize("h,w", [(16, 16), (8, 12), (64, 96), (5, 7)])
def test_every_pattern_is_partial_and_numpy_equals_torch(h, w):
    for name in masks.PATTERNS:
        a = masks.mask_array(name, h, w)
        t = masks.mask_tensor(name, h, w)[0, 0].numpy()
        assert a.shape == (h, w) and np.array_equal(a, t), name
        assert 0 < a.sum() < h * w, name


def test_pattern_geometry():
    assert masks.mask_array("left-half", 8, 8)[:, :4].all() and not masks.mask_array("left-half", 8, 8)[:, 4:].any()
    edges = masks.mask_array("edges", 16, 16)
    assert edges[0].all() and edges[:, -1].all() and edges[8, 8] == 0
    circle = masks.mask_array("circle", 16, 16)
    assert circle[8, 8] == 1 and circle[0, 0] == 0
    assert masks.canonical("center_circle") == "circle" and masks.canonical("LEFT_HALF") == "left-half"


def test_injection_adds_noise_only_inside_the_mask(tiny):
    req = GenerationRequest(model="tiny", mask="left-half", seed=1).validated()
    latents = torch.zeros(1, 4, 16, 16)
    mask = masks.mask_tensor("left-half", 16, 16)
    scheduler = tiny.scheduler
    scheduler.set_timesteps(10)
    out = _inject(latents, mask, req, 3, scheduler, scheduler.timesteps[2])
    assert out[..., :8].abs().mean() > 0.5 and out[..., 8:].abs().max() == 0


def test_injection_changes_the_run_from_its_step_on(tiny):
    plain = events(tiny)
    masked = events(tiny, mask="circle", inject_at_step=(4, 7))
    for a, b in zip(plain[:3], masked[:3]):
        assert torch.equal(a.latents, b.latents)
    assert not torch.equal(plain[3].latents, masked[3].latents)
    assert [e.step for e in masked if e.injected] == [4, 7]


def test_bare_mask_injects_at_the_documented_default_step(tiny):
    assert [e.step for e in events(tiny, mask="edges") if e.injected] == [4]  # 30% into 10 steps, after step 1


def test_grey_image_mask_is_soft(tiny, tmp_path):
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    soft = masks.mask_from_image(Image.open(tmp_path / "ramp.png"), 16, 16)
    assert soft[0, 0, 0, 0] < 0.05 and soft[0, 0, 0, -1] > 0.95
    assert [e.step for e in events(tiny, mask=str(tmp_path / "ramp.png"), inject_at_step=(2,)) if e.injected] == [2]


def test_x0_estimate_is_available_for_every_scheduler(tiny):
    for name in ("ddim", "dpm++-2m", "unipc", "pndm", "lms", "euler"):
        evs = list(denoise(tiny, GenerationRequest(model="tiny", steps=4, seed=1, scheduler=name).validated()))
        assert all(torch.isfinite(e.denoised).all() and e.denoised.shape == e.latents.shape for e in evs), name


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_x0_formula_matches_ddims_own_estimate(tiny, prediction):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(tiny.scheduler.config, prediction_type=prediction)
    scheduler.set_timesteps(10)
    latents, model_output = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[3]
    expected = scheduler.step(model_output, t, latents).pred_original_sample
    alpha = float(scheduler.alphas_cumprod[int(t)])
    assert torch.allclose(_x0(latents, model_output, alpha, prediction), expected, atol=1e-5)


def test_cancel_keeps_frames_and_marks_interrupted(tiny, tmp_path):
    calls = iter(range(100))
    with pytest.raises(KeyboardInterrupt):
        sdstream.run(GenerationRequest(model="tiny", steps=8, seed=1, device="cpu"), tmp_path / "r",
                     cancelled=lambda: next(calls) >= 3)
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["status"] == "interrupted" and len(manifest["frames"]) == 3
    assert len(list((tmp_path / "r" / "frames").iterdir())) == 3


def test_disk_full_while_writing_frames_fails_the_run_clearly(tiny, tmp_path, monkeypatch):
    real = frames.save_image

    def full(image, path, fmt="png", pnginfo=None, fast=False):
        if path.name == "step-0003.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(image, path, fmt, pnginfo, fast)

    monkeypatch.setattr(frames, "save_image", full)
    with pytest.raises(SdstreamError, match="No space left"):
        sdstream.run(GenerationRequest(model="tiny", steps=8, seed=1, device="cpu"), tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["status"] == "failed" and "No space left" in manifest["error"]
    assert not (tmp_path / "r" / "final.png").exists()
    written = sorted(p.name for p in (tmp_path / "r" / "frames").iterdir())
    assert written[:2] == ["step-0001.png", "step-0002.png"] and "step-0003.png" not in written


@pytest.mark.parametrize("scheduler", ["euler-a", "lms", "ddim"])
def test_half_precision_runs_keep_the_model_dtype(scheduler):
    pipe = sdstream.load("tiny", device="cpu", dtype="bf16")
    evs = list(denoise(pipe, GenerationRequest(model="tiny", steps=3, seed=1, scheduler=scheduler).validated()))
    assert all(e.latents.dtype == e.denoised.dtype == torch.bfloat16 for e in evs)
