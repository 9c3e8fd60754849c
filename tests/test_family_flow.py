"""SD3 and FLUX through sdstream's own loop give diffusers' pixels: tiny random-weight pipelines (tests/dummy_flow.py,
built offline as diffusers' own tests build theirs, saved as model folders) against StableDiffusion3Pipeline,
StableDiffusion3Img2ImgPipeline, FluxPipeline and FluxImg2ImgPipeline used as a diffusers user would: from the
folder. Equal to the last bit (max difference 0): the same operations on the same CPU. FLUX twice: [dev]-like
(embedded guidance, dynamic shifting) and [schnell]-like (neither).

Then flow matching's own: the img2img arithmetic of the flow pipelines (not SD's), x0 = x_t - sigma_t v at every
step, noise injected in units of sigma_t only inside the mask (packed 2x2 for FLUX), a branch that is its parent
bit for bit, --preview approx with the families' published colours on the unpacked grid, the tensors kept, no
host<->device traffic per step, and what is refused.
"""

from __future__ import annotations

import copy
import json

import dummy_flow
import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

import sdstream
from sdstream import GenerationRequest

from conftest import error_line

PROMPT, NEGATIVE, SIZE = "a red circle on a blue background", "green", 32
KINDS = ("sd3", "flux-dev", "flux-schnell")
PIPELINES = {"sd3": (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline),
             "flux-dev": (FluxPipeline, FluxImg2ImgPipeline), "flux-schnell": (FluxPipeline, FluxImg2ImgPipeline)}
# ComfyUI's comfy/latent_formats.py, classes SD3 and Flux: latent_rgb_factors (rows: the 16 channels) and the bias
COMFY = {
    "sd3": ([[-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458],
             [0.0856, 0.0339, 0.0902], [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309],
             [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358], [-0.0194, 0.0020, 0.0669],
             [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
             [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293],
             [-0.1448, -0.1463, -0.1189]], [0.2394, 0.2135, 0.1925]),
    "flux-dev": ([[-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
                  [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
                  [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
                  [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
                  [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
                  [-0.1262, -0.0982, -0.0778]], [-0.0329, -0.0718, -0.0851]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow")
    return {kind: dummy_flow.save(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def loaded(folders) -> dict:
    """kind -> diffusers' own pipeline of the folder, loaded once."""
    return {kind: PIPELINES[kind][0].from_pretrained(str(folders[kind])) for kind in KINDS}


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def theirs(pipe, kind: str, *, steps: int, guidance: float, negative=None, init=None, strength=None, seed=7):
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
              height=SIZE, width=SIZE)
    if negative:
        kw["negative_prompt"] = negative
    if init is None:
        return pipe(PROMPT, **kw).images[0]
    return PIPELINES[kind][1](**pipe.components)(PROMPT, image=Image.open(init), strength=strength, **kw).images[0]


def ours(folder, *, steps: int, guidance: float, negative="", seed=7, **kw):
    size = {} if "init_image" in kw or "start_image" in kw else {"width": SIZE, "height": SIZE}  # else the picture's
    return sdstream.generate(GenerationRequest(model=str(folder), prompt=PROMPT, negative_prompt=negative, seed=seed,
                                               steps=steps, guidance=guidance, device="cpu", **size, **kw))


def differ(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("kind", KINDS)
def test_txt2img_and_img2img_are_diffusers_pixels(folders, loaded, picture, kind):
    folder, pipe = folders[kind], loaded[kind]
    negative = NEGATIVE if kind == "sd3" else None  # FLUX has no negative prompt (refused: see below)
    guidance = 5.0 if kind == "sd3" else 3.5
    init = dict(init_image=str(picture))
    cases = {
        "txt2img": (theirs(pipe, kind, steps=3, guidance=guidance, negative=negative), dict(steps=3)),
        # 4 x 0.7 is not whole: the flow pipelines skip int(4 - 2.8) = 1 step, not SD's 4 - int(2.8) = 2
        "img2img 0.7": (theirs(pipe, kind, steps=4, guidance=guidance, negative=negative, init=picture, strength=0.7),
                        dict(steps=4, strength=0.7, **init)),
        "img2img 1.0": (theirs(pipe, kind, steps=2, guidance=guidance, negative=negative, init=picture, strength=1.0),
                        dict(steps=2, strength=1.0, **init)),
        # --start-step K is img2img at the strength that starts at K: int(N - N * s) = K - 1
        "start-step 3": (theirs(pipe, kind, steps=4, guidance=guidance, negative=negative, init=picture,
                                strength=(4 - 3 + 0.5) / 4), dict(steps=4, start_image=str(picture), start_step=3)),
    }
    if kind == "sd3":  # unguided (no second half) and the empty negative prompt ("", as the pipeline encodes it)
        cases["unguided"] = (theirs(pipe, kind, steps=2, guidance=1.0), dict(steps=2, guidance=1.0))
        cases["no negative"] = (theirs(pipe, kind, steps=2, guidance=guidance), dict(steps=2, negative=""))
    if kind == "flux-dev":  # the flow pipelines' float arithmetic (int(10 - 10 * 0.3)) on a longer schedule
        cases["img2img 0.3 of 10"] = (theirs(pipe, kind, steps=10, guidance=guidance, init=picture, strength=0.3),
                                      dict(steps=10, strength=0.3, **init))
    misses = {}
    for case, (reference, kw) in cases.items():
        kw = {"guidance": guidance, "negative": negative or "", **kw}
        if d := differ(ours(folder, **kw), reference):
            misses[case] = d
    assert not misses, misses


def test_the_first_img2img_step_is_the_flow_pipelines_own(picture):
    def first(scheduler, steps, strength):
        return GenerationRequest(model="tiny", prompt=PROMPT, steps=steps, scheduler=scheduler, strength=strength,
                                 init_image=str(picture)).validated().first_step

    assert [first("flow-euler", 4, 0.7), first("ddim", 4, 0.7)] == [2, 3]
    assert [first("flow-euler", 100, 0.29), first("ddim", 100, 0.29)] == [72, 73]  # 100 * 0.29 < 29
    assert first("flow-euler", 4, 0.1) == 4  # one step, as FluxImg2ImgPipeline runs it (SD's arithmetic: none)


def test_guidance_is_embedded_for_dev_and_ignored_for_schnell(folders):
    dev, schnell = folders["flux-dev"], folders["flux-schnell"]
    assert differ(ours(dev, steps=2, guidance=1.5), ours(dev, steps=2, guidance=6.0)) > 0
    assert differ(ours(schnell, steps=2, guidance=0.0), ours(schnell, steps=2, guidance=6.0)) == 0  # as diffusers


class Record(sdstream.Sink):
    def __init__(self):
        self.events = []

    def step(self, step):
        self.events.append(step.event)


def reference_sigmas(folder, kind: str, steps: int) -> torch.Tensor:
    """The scheduler's sigmas as the family's diffusers pipeline sets them (FLUX: linspace sigmas and mu)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    if kind == "sd3":
        scheduler.set_timesteps(steps)
    else:
        seq = (SIZE // 2 // 2) ** 2  # 2x VAE, 2x2 packing
        c = scheduler.config
        mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_x0_at_every_step_is_x_minus_sigma_v(folders, kind):
    record, steps = Record(), 3
    sdstream.generate(GenerationRequest(model=str(folders[kind]), prompt=PROMPT, steps=steps, seed=1, guidance=4.0,
                                        width=SIZE, height=SIZE), [record])
    sigmas = reference_sigmas(folders[kind], kind, steps)
    for i, ev in enumerate(record.events):
        assert torch.allclose(ev.denoised, ev.sample - sigmas[i] * ev.eps, rtol=1e-5, atol=1e-5), (kind, ev.step)
        assert torch.allclose(ev.x0_of(ev.eps_cond), ev.sample - sigmas[i] * ev.eps_cond, rtol=1e-5, atol=1e-5)
        assert (ev.eps_uncond is None) == (kind != "sd3")  # FLUX: one model call per step, no unconditional half


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_injection_adds_sigma_noise_only_inside_the_mask(folders, kind):
    from sdstream.masks import mask_tensor

    runs = {}
    for name, kw in (("plain", {}), ("injected", dict(mask="circle", inject_at_step=(3,)))):
        record = Record()
        sdstream.generate(GenerationRequest(model=str(folders[kind]), prompt=PROMPT, seed=3, steps=4, guidance=4.0,
                                            width=SIZE, height=SIZE, **kw), [record])
        runs[name] = record.events
    plain, injected = runs["plain"], runs["injected"]
    assert [e.step for e in injected if e.injected] == [3]
    for a, b in zip(plain[:2], injected[:2]):
        assert torch.equal(a.latents, b.latents)
    added = injected[2].sample - plain[2].sample
    if kind != "sd3":  # back on the latent grid, as FLUX packs it (2x2 patches of 16 channels -> 64-wide tokens)
        assert added.shape == (1, (SIZE // 4) ** 2, 64)
        added = FluxPipeline._unpack_latents(added, SIZE, SIZE, 2)
    inside = mask_tensor("circle", SIZE // 2, SIZE // 2)[0, 0] > 0
    assert inside.any() and not inside.all()
    peak = added.abs().amax(dim=1)[0]
    assert (peak[inside] > 0).all() and (peak[~inside] == 0).all()
    # --noise-strength 1 is sigma_t: the noise added inside has sigma_t's standard deviation
    sigma = float(reference_sigmas(folders[kind], kind, 4)[2])
    spread = float(added[0][:, inside].std())
    assert 0.85 < spread / sigma < 1.15, (spread, sigma)
    assert not torch.equal(plain[-1].latents, injected[-1].latents)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _frames(run_dir) -> dict:
    manifest = json.loads((run_dir / "run.json").read_text())
    return {f["step"]: _pixels(run_dir / f["file"]) for f in manifest["frames"]}


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_a_branch_with_nothing_changed_is_its_parent_bit_for_bit(folders, picture, tmp_path, kind):
    """With flow-euler: the scheduler's step index and begin index are its whole history (core/state.py)."""
    base = dict(model=str(folders[kind]), prompt=PROMPT, seed=11, steps=4, guidance=4.0, preview="approx")
    at = 3
    for case, extra in (("txt", dict(width=SIZE, height=SIZE, mask="circle", inject_at_step=(2,))),
                        ("img", dict(init_image=str(picture), strength=0.9))):
        for from_state in (True, False):  # from the state saved after K-1, or the steps before K computed again
            parent = tmp_path / f"parent-{case}-{from_state}"
            sdstream.run(GenerationRequest(**base, save_state=from_state, **extra), parent)
            kept = json.loads((parent / "run.json").read_text())["request"]
            assert kept["scheduler"] == "flow-euler"  # --scheduler auto
            out = tmp_path / f"branch-{case}-{from_state}"
            sdstream.run(GenerationRequest(**{**kept, "parent": str(parent), "at_step": at}), out)
            assert np.array_equal(_pixels(out / "final.png"), _pixels(parent / "final.png")), (case, from_state)
            mine, theirs_ = _frames(out), _frames(parent)
            assert mine.keys() == theirs_.keys() and all(np.array_equal(mine[k], theirs_[k]) for k in mine), case
            manifest = json.loads((out / "run.json").read_text())
            assert manifest["branch"]["from_state"] == from_state
            assert len(manifest["timings"]["steps"]) == manifest["total_steps"] - at + 1


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_approx_frames_of_x0_with_published_colours_and_tensors(folders, tmp_path, kind):
    """--preview approx maps x0 (FLUX: unpacked to its 16-channel grid) with ComfyUI's factors and bias; the tensors
    are kept as the denoiser sees them (FLUX: packed), and redecode reads them back."""
    out = tmp_path / "run"
    sdstream.run(GenerationRequest(model=str(folders[kind]), prompt=PROMPT, seed=5, steps=2, width=SIZE, height=SIZE,
                                   preview="approx", frame_source="x0", frame_size=SIZE // 2, save_tensors=("all",),
                                   tensor_dtype="run"), out)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["request"]["scheduler"] == "flow-euler"
    run = sdstream.open_run(out)
    weights, bias = (torch.tensor(v) for v in COMFY[kind])
    for step in (1, 2):
        t = run.tensors(step)
        x0 = t["x0"].float()
        if kind == "sd3":
            assert set(t) == {"latents", "x0", "eps", "eps-cond", "eps-uncond"} and x0.shape == (16, 16, 16)
        else:
            assert set(t) == {"latents", "x0", "eps", "eps-cond"} and x0.shape == (64, 64)  # no unconditional half
            x0 = FluxPipeline._unpack_latents(x0[None], SIZE, SIZE, 2)[0]
        expected = ((torch.einsum("chw,cr->hwr", x0, weights) + bias + 1) * 127.5).clamp(0, 255)
        frame = _pixels(out / f"frames/step-{step:04d}.png").astype(int)
        assert frame.shape == (16, 16, 3) and np.abs(frame - expected.to(torch.uint8).numpy()).max() <= 1, step


def test_native_sizes_and_size_steps(folders, loaded):
    from sdstream.core.families import family_of

    sd3, flux = family_of(loaded["sd3"]), family_of(loaded["flux-dev"])
    assert sd3.native_size() == (32, 32) and sd3.size_multiple == 4  # 16 latent x 2 (1024 for SD3 itself)
    assert flux.native_size() == (256, 256) and flux.size_multiple == 4  # FluxPipeline's 128 x 2 (1024)
    out = sdstream.generate(GenerationRequest(model=str(folders["sd3"]), prompt=PROMPT, steps=1, seed=1))
    assert out.size == (32, 32)
    with pytest.raises(sdstream.BadInput, match="--width 34 is not a multiple of 4"):
        sdstream.generate(GenerationRequest(model=str(folders["flux-dev"]), prompt=PROMPT, steps=1, width=34,
                                            height=32))


def test_what_flow_families_refuse(folders, picture, cli, tmp_path):
    sd3, flux = str(folders["sd3"]), str(folders["flux-dev"])
    line = error_line(cli("generate", "--model", flux, "--prompt", PROMPT, "--negative-prompt", "green", "--steps",
                          "1", "--out", str(tmp_path / "a")))
    assert "--negative-prompt" in line and "FLUX" in line
    assert not (tmp_path / "a").exists()
    with pytest.raises(sdstream.BadInput, match="x0-uncond"):
        sdstream.generate(GenerationRequest(model=flux, prompt=PROMPT, steps=1, frame_source="x0-uncond",
                                            preview="approx"))
    for model, family in ((sd3, "SD3"), (flux, "FLUX")):
        with pytest.raises(sdstream.BadInput, match=family):
            sdstream.generate(GenerationRequest(model=model, prompt=PROMPT, prompt_image=str(picture), steps=1))
        with pytest.raises(sdstream.BadInput, match="--scheduler ddim does not work with"):
            sdstream.generate(GenerationRequest(model=model, prompt=PROMPT, scheduler="ddim", steps=1))
        with pytest.raises(sdstream.BadInput, match="joint attention"):
            sdstream.run(GenerationRequest(model=model, prompt=PROMPT, attention=True, steps=1, width=SIZE,
                                           height=SIZE), tmp_path / f"att-{family}")
    for model, taesd in ((sd3, "taesd3"), (flux, "taef1")):  # (offline here: not on disk)
        with pytest.raises(sdstream.BadInput, match=taesd):
            sdstream.generate(GenerationRequest(model=model, prompt=PROMPT, preview="taesd", steps=1))


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_steps_make_no_host_device_traffic(loaded, folders, picture, kind):
    """As tests/test_host_traffic.py checks SD: the pipeline on `meta`, the loop and the per-step sinks."""
    from test_host_traffic import Traffic, loop

    from sdstream.models.registry import family_in, for_family
    from sdstream.record.sinks import Measures, NanCheck, Step

    on_meta = copy.deepcopy(loaded[kind]).to("meta")
    for kw in (dict(width=SIZE, height=SIZE, mask="circle", inject_at_step=(3,)),
               dict(init_image=str(picture), strength=0.8)):
        req = GenerationRequest(model=str(folders[kind]), steps=5, seed=1, prompt=PROMPT, guidance=4.0, **kw)
        req = for_family(req.validated(), family_in(folders[kind]))
        traffic, marks, events, nan_check, measures = Traffic(), [], [], NanCheck(), Measures()
        nan_check.flags, nan_check.first = [], req.first_step
        measures.start(None)
        with traffic:
            for event in loop(on_meta, req):
                for sink in (nan_check, measures):
                    sink.step(Step(event))
                event.state()
                event.x0_of(event.eps_cond)
                [t.to(torch.float16) for t in (event.latents, event.denoised, event.eps, event.eps_cond)]
                Step(event).to_dict()
                marks.append(len(traffic.log))
                events.append(event)
        assert events[-1].latents.is_meta and events[-1].denoised.is_meta
        steps = [traffic.log[a:b] for a, b in zip(marks, marks[1:])]
        assert [len(s) for s in steps] == [1 if e.injected else 0 for e in events[1:]], steps  # the CPU noise
