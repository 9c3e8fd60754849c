"""SDXL through sdstream's own loop gives diffusers' pixels: a tiny random-weight SDXL (tests/dummy_sdxl.py, built
offline as diffusers' own SDXL tests build theirs, saved as a model folder) against StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline used as a diffusers user would: from the folder, the scheduler from its config.
Equal to the last bit (max difference 0): the same operations on the same CPU. Then the interventions on SDXL:
noise injection only inside its mask, a branch that is its parent bit for bit, --preview approx with SDXL's
published colours, the tensors kept, the image prompt refused.
"""

from __future__ import annotations

import json

import dummy_sdxl
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

import sdstream
from sdstream import GenerationRequest

PROMPT, NEGATIVE, STEPS, SIZE = "a red circle on a blue background", "green", 3, 32
DIFFUSERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),  # SDXL's own (the folder's)
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
# ComfyUI's comfy/latent_formats.py, class SDXL: latent_rgb_factors (rows: latent channels) and their bias
COMFY_SDXL = ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
               [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return dummy_sdxl.save(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def loaded(folder) -> dict:
    """dtype -> diffusers' own pipeline of the folder, loaded once."""
    return {dtype: StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=dtype)
            for dtype in (torch.float32, torch.float16)}


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def theirs(pipe, scheduler: str, *, negative=NEGATIVE, init=None, strength=None, seed=7):
    """diffusers' picture: the folder's pipeline with the scheduler built from its config, as a user would."""
    cls, options = DIFFUSERS[scheduler]
    components = {**pipe.components, "scheduler": cls.from_config(pipe.scheduler.config, **options)}
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed))
    if negative:  # none given: the pipeline's default, zeros for the negative half (force_zeros_for_empty_prompt)
        kw["negative_prompt"] = negative
    if init is None:
        return StableDiffusionXLPipeline(**components)(PROMPT, width=SIZE, height=SIZE, **kw).images[0]
    img2img = StableDiffusionXLImg2ImgPipeline(**components)
    return img2img(PROMPT, image=Image.open(init), strength=strength, **kw).images[0]


def ours(folder, scheduler: str, negative=NEGATIVE, dtype="fp32", **kw):
    size = {} if "init_image" in kw or "start_image" in kw else {"width": SIZE, "height": SIZE}
    return sdstream.generate(GenerationRequest(model=str(folder), prompt=PROMPT, negative_prompt=negative, seed=7,
                                               steps=STEPS, guidance=5.0, scheduler=scheduler, device="cpu",
                                               dtype=dtype, **size, **kw))


def differ(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("scheduler", DIFFUSERS)
def test_txt2img_and_img2img_are_diffusers_pixels(folder, loaded, picture, scheduler):
    pipe = loaded[torch.float32]
    cases = {
        "txt2img": (theirs(pipe, scheduler), {}),
        "img2img 0.7": (theirs(pipe, scheduler, init=picture, strength=0.7),
                        dict(init_image=str(picture), strength=0.7)),
    }
    if scheduler == "ddim":  # no negative prompt (zeros), and a start at a later step
        cases["txt2img, no negative"] = (theirs(pipe, scheduler, negative=""), dict(negative=""))
        # --start-step K is img2img at the strength that starts at K: int(N * s) = N - K + 1
        cases["start-step 2"] = (theirs(pipe, scheduler, init=picture, strength=(STEPS - 1 + 0.5) / STEPS),
                                 dict(start_image=str(picture), start_step=2))
    misses = {case: d for case, (reference, kw) in cases.items() if (d := differ(ours(folder, scheduler, **kw),
                                                                                reference))}
    assert not misses, misses


@pytest.mark.filterwarnings("ignore:`upcast_vae` is deprecated:FutureWarning")  # diffusers' own pipelines say it
def test_fp16_with_the_vae_upcast_is_diffusers_pixels(folder, loaded, picture):
    """SDXL's VAE is flagged force_upcast: in fp16 runs it encodes and decodes in fp32, as the pipelines do."""
    pipe = loaded[torch.float16]
    assert pipe.vae.config.force_upcast
    for kw, reference in ((dict(negative=""), theirs(pipe, "euler", negative="")),
                          (dict(init_image=str(picture), strength=0.7),
                           theirs(pipe, "euler", init=picture, strength=0.7))):
        assert differ(ours(folder, "euler", dtype="fp16", **kw), reference) == 0, kw
    assert pipe.vae.dtype == torch.float16  # given back as it was


def test_an_img2img_pipeline_that_requires_aesthetic_scores(tmp_path, picture):
    """A refiner-like folder (StableDiffusionXLImg2ImgPipeline, requires_aesthetics_score): its time ids end with
    the aesthetic score (6 for the prompt, 2.5 for the negative one) instead of the target size."""
    folder = dummy_sdxl.save(tmp_path / "refiner", aesthetics=True)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folder))
    assert pipe.config.requires_aesthetics_score
    reference = pipe(PROMPT, image=Image.open(picture), strength=0.7, negative_prompt=NEGATIVE,
                     num_inference_steps=STEPS, guidance_scale=5.0,
                     generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert differ(ours(folder, "euler", init_image=str(picture), strength=0.7), reference) == 0
    # the same UNet in a folder whose pipeline gives the base's six time ids: refused when it loads, in one line
    base = tmp_path / "refiner-as-base"
    base.mkdir()
    for part in folder.iterdir():
        if part.name != "model_index.json":
            (base / part.name).symlink_to(part)
    index = json.loads((folder / "model_index.json").read_text())
    index = {k: v for k, v in index.items() if k != "requires_aesthetics_score"}
    (base / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(sdstream.SdstreamError, match="6 .with the target size. time ids"):
        ours(base, "euler")


class Record(sdstream.Sink):
    def __init__(self):
        self.events = []

    def step(self, step):
        self.events.append(step.event)


def test_injection_changes_the_latents_only_inside_the_mask(folder):
    from sdstream.masks import mask_tensor

    runs = {}
    for name, kw in (("plain", {}), ("injected", dict(mask="circle", inject_at_step=(3,)))):
        record = Record()
        sdstream.generate(GenerationRequest(model=str(folder), prompt=PROMPT, seed=3, steps=4, guidance=5.0,
                                            width=SIZE, height=SIZE, scheduler="euler", **kw), [record])
        runs[name] = record.events
    plain, injected = runs["plain"], runs["injected"]
    assert [e.step for e in injected if e.injected] == [3]
    for a, b in zip(plain[:2], injected[:2]):
        assert torch.equal(a.latents, b.latents)
    # step 3 starts from the same latents plus noise through the mask: changed inside it, equal outside
    added = (injected[2].sample - plain[2].sample).abs().amax(dim=1)[0]
    inside = mask_tensor("circle", *added.shape)[0, 0] > 0
    assert inside.any() and not inside.all()
    assert (added[inside] > 0).all() and (added[~inside] == 0).all()
    assert float(injected[2].injected_rms) > 0 and not torch.equal(plain[-1].latents, injected[-1].latents)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _frames(run_dir) -> dict:
    manifest = json.loads((run_dir / "run.json").read_text())
    return {f["step"]: _pixels(run_dir / f["file"]) for f in manifest["frames"]}


def test_a_branch_with_nothing_changed_is_its_parent_bit_for_bit(folder, picture, tmp_path):
    base = dict(model=str(folder), prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, steps=4, guidance=5.0,
                scheduler="dpm++-2m", preview="approx")
    at = 3
    for kind, extra in (("txt2img, injected before K", dict(width=SIZE, height=SIZE, mask="circle",
                                                             inject_at_step=(2,))),
                        ("img2img", dict(init_image=str(picture), strength=0.9))):
        for from_state in (True, False):  # from the state saved after K-1, or the steps before K computed again
            parent = tmp_path / f"parent-{kind[:3]}-{from_state}"
            sdstream.run(GenerationRequest(**base, save_state=from_state, **extra), parent)
            kept = json.loads((parent / "run.json").read_text())["request"]
            out = tmp_path / f"branch-{kind[:3]}-{from_state}"
            sdstream.run(GenerationRequest(**{**kept, "parent": str(parent), "at_step": at}), out)
            assert np.array_equal(_pixels(out / "final.png"), _pixels(parent / "final.png")), (kind, from_state)
            mine, theirs_ = _frames(out), _frames(parent)
            assert mine.keys() == theirs_.keys() and all(np.array_equal(mine[k], theirs_[k]) for k in mine), kind
            manifest = json.loads((out / "run.json").read_text())
            assert manifest["branch"]["from_state"] == from_state
            assert len(manifest["timings"]["steps"]) == manifest["total_steps"] - at + 1  # steps K... are its own


def test_native_size_auto_scheduler_approx_frames_of_x0_and_tensors(folder, tmp_path):
    """Without a size, the model's native one (the UNet's sample size x the VAE factor: 1024 for SDXL, 64 here);
    --scheduler auto is ddim; --preview approx maps x0 with SDXL's published factors and bias."""
    out = tmp_path / "run"
    sdstream.run(GenerationRequest(model=str(folder), prompt=PROMPT, seed=5, steps=2, preview="approx",
                                   frame_source="x0", frame_size=32, save_tensors=("all",), tensor_dtype="run"), out)
    manifest = json.loads((out / "run.json").read_text())
    assert Image.open(out / "final.png").size == (64, 64)
    assert manifest["request"]["scheduler"] == "ddim" and manifest["request"]["guidance"] == 5.0
    run = sdstream.open_run(out)
    weights, bias = (torch.tensor(v) for v in COMFY_SDXL)
    for step in (1, 2):
        t = run.tensors(step)
        assert set(t) == {"latents", "x0", "eps", "eps-cond", "eps-uncond"} and t["x0"].shape == (4, 32, 32)
        expected = ((torch.einsum("chw,cr->hwr", t["x0"].float(), weights) + bias + 1) * 127.5).clamp(0, 255)
        frame = _pixels(out / f"frames/step-{step:04d}.png").astype(int)
        assert frame.shape == (32, 32, 3) and np.abs(frame - expected.to(torch.uint8).numpy()).max() <= 1, step


def test_an_image_prompt_is_refused_and_taesd_is_taesdxl(folder, picture):
    with pytest.raises(sdstream.BadInput, match="SDXL"):
        sdstream.generate(GenerationRequest(model=str(folder), prompt=PROMPT, prompt_image=str(picture), steps=2))
    with pytest.raises(sdstream.BadInput, match="taesdxl"):  # (offline here: not on disk)
        sdstream.generate(GenerationRequest(model=str(folder), prompt=PROMPT, preview="taesd", steps=2))
