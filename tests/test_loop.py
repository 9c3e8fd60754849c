"""The loop and its interventions through the library API."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdstream
from sdstream import masks
from sdstream.core.families import family_of
from sdstream.core.hooks import NoiseInjection
from sdstream.core.loop import Run
from sdstream.core.schedulers import make_scheduler
from sdstream.errors import SdstreamError
from sdstream.record import files
from sdstream.request import GenerationRequest


class Record(sdstream.Sink):
    def __init__(self):
        self.events = []

    def step(self, step):
        self.events.append(step.event)


def events(pipe=None, **kw):
    """Every StepEvent of a tiny run through the orchestrator (a sink that keeps them)."""
    record = Record()
    sdstream.generate(GenerationRequest(**{"model": "tiny", "device": "cpu", "steps": 10, "seed": 9,
                                           "prompt": "a circle", **kw}), [record])
    return record.events


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
    scheduler = make_scheduler("ddim", tiny.scheduler.config)
    scheduler.set_timesteps(10)
    run = Run(tiny, family_of(tiny), req, 32, 32, scheduler, torch.Generator().manual_seed(1), torch.device("cpu"),
              torch.float32, latents=torch.zeros(1, 4, 16, 16))
    hook = NoiseInjection((3,), 1.0, 1, pattern="left-half")
    hook.on_start(run)
    hook.before_step(run, 2, scheduler.timesteps[1])
    assert run.latents.abs().max() == 0 and not run.injected  # not its step
    hook.before_step(run, 3, scheduler.timesteps[2])
    out = run.latents
    assert run.injected and out[..., :8].abs().mean() > 0.5 and out[..., 8:].abs().max() == 0


def test_injection_changes_the_run_from_its_step_on():
    plain = events()
    masked = events(mask="circle", inject_at_step=(4, 7))
    for a, b in zip(plain[:3], masked[:3]):
        assert torch.equal(a.latents, b.latents)
    assert not torch.equal(plain[3].latents, masked[3].latents)
    assert [e.step for e in masked if e.injected] == [4, 7]


def test_bare_mask_injects_at_the_documented_default_step():
    assert [e.step for e in events(mask="edges") if e.injected] == [4]  # 30% into 10 steps, after step 1


def test_grey_image_mask_is_soft(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    soft = masks.mask_from_image(Image.open(tmp_path / "ramp.png"), 16, 16)
    assert soft[0, 0, 0, 0] < 0.05 and soft[0, 0, 0, -1] > 0.95
    assert [e.step for e in events(mask=str(tmp_path / "ramp.png"), inject_at_step=(2,)) if e.injected] == [2]


def test_x0_estimate_is_available_for_every_scheduler():
    for name in ("ddim", "dpm++-2m", "unipc", "pndm", "lms", "euler"):
        evs = events(steps=4, seed=1, scheduler=name)
        assert all(torch.isfinite(e.denoised).all() and e.denoised.shape == e.latents.shape for e in evs), name


def test_cancel_keeps_frames_and_marks_interrupted(tiny, tmp_path):
    record, blocks = Record(), []

    def cancelled():  # asked before each step and inside it, before each UNet block: stop in step 4's UNet
        blocks.append(len(record.events))
        return len(record.events) == 3 and blocks.count(3) > 5

    with pytest.raises(KeyboardInterrupt):
        sdstream.run(GenerationRequest(model="tiny", steps=8, seed=1, device="cpu"), tmp_path / "r",
                     cancelled=cancelled, sinks=[record])
    assert len(record.events) == 3 and not tiny.unet.down_blocks[0]._forward_pre_hooks  # the hooks are gone again
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["status"] == "interrupted" and len(manifest["frames"]) == 3
    assert len(list((tmp_path / "r" / "frames").iterdir())) == 3


def test_disk_full_while_writing_frames_fails_the_run_clearly(tiny, tmp_path, monkeypatch):
    real = files.atomic_write

    def full(path, write):
        if path.name == "step-0003.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(files, "atomic_write", full)
    with pytest.raises(SdstreamError, match="No space left"):
        sdstream.run(GenerationRequest(model="tiny", steps=8, seed=1, device="cpu"), tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["status"] == "failed" and "No space left" in manifest["error"]
    assert not (tmp_path / "r" / "final.png").exists()
    written = sorted(p.name for p in (tmp_path / "r" / "frames").iterdir())
    assert written[:2] == ["step-0001.png", "step-0002.png"] and "step-0003.png" not in written
    assert [f["file"] for f in manifest["frames"]] == [f"frames/{name}" for name in written]  # only what is on disk


@pytest.mark.parametrize("scheduler", ["euler-a", "lms", "ddim"])
def test_half_precision_runs_keep_the_model_dtype(scheduler):
    evs = events(steps=3, seed=1, scheduler=scheduler, dtype="bf16")
    assert all(e.latents.dtype == e.denoised.dtype == torch.bfloat16 for e in evs)
