"""Our loop gives diffusers' pixels: a parity matrix whose references come from diffusers' public API only.

Every scheduler, as a diffusers user builds it (the class from the model's scheduler config, with its options),
against StableDiffusionPipeline and StableDiffusionImg2ImgPipeline, over scheduler-config variants of tiny
(epsilon, v-prediction, sample prediction, zero-terminal-SNR with trailing spacing), with and without guidance,
img2img at two strengths and a start at a later step (img2img at the strength that starts there). And x0 at
every step against its definition from the scheduler's own sigmas.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

import sdstream
from sdstream import GenerationRequest
from sdstream.errors import SdstreamError
from sdstream.models.registry import tiny_path

# --scheduler name -> how a diffusers user builds that scheduler
DIFFUSERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-2m-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                      "use_karras_sigmas": True}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
# model variants: tiny with another scheduler config, as model folders on Hugging Face have
VARIANTS = {
    "epsilon": {},
    "v": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "zero-snr": {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
}
STEPS, SIZE, PROMPT, NEGATIVE = 4, 16, "a red circle on a blue background", "green"  # small and short: seconds


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict:
    """variant -> its model folder: tiny's components (linked), its own scheduler config."""
    folders = {}
    for name, overrides in VARIANTS.items():
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        for part in tiny_path().iterdir():
            if part.name != "scheduler":
                (folder / part.name).symlink_to(part)
        (folder / "scheduler").mkdir()
        config = json.loads((tiny_path() / "scheduler" / "scheduler_config.json").read_text())
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **overrides}))
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def init_picture(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def theirs(tiny, folder, scheduler: str, *, init=None, strength=None, guidance=6.0, seed=7):
    """diffusers' own picture: tiny's components with the variant's scheduler, built as a diffusers user would."""
    cls, options = DIFFUSERS[scheduler]
    config = DDIMScheduler.load_config(folder / "scheduler")
    components = {**tiny.components, "scheduler": cls.from_config(config, **options)}
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance,
              generator=torch.Generator("cpu").manual_seed(seed))
    if init is None:
        return StableDiffusionPipeline(**components)(PROMPT, height=SIZE, width=SIZE, **kw).images[0]
    img2img = StableDiffusionImg2ImgPipeline(**components)
    return img2img(PROMPT, image=Image.open(init), strength=strength, **kw).images[0]


def ours(folder, scheduler: str, **kw):
    size = {} if "init_image" in kw or "start_image" in kw else {"width": SIZE, "height": SIZE}  # else the picture's
    return sdstream.generate(GenerationRequest(model=str(folder), prompt=PROMPT, negative_prompt=NEGATIVE,
                                               steps=STEPS, scheduler=scheduler, device="cpu", **size, **kw))


def differ(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheduler", DIFFUSERS)
def test_every_scheduler_and_start_matches_diffusers(tiny, variants, init_picture, variant, scheduler):
    folder, misses = variants[variant], []
    try:  # a combination diffusers itself refuses (say, sample prediction with Euler a) is refused by us too
        reference = theirs(tiny, folder, scheduler)
    except (ValueError, NotImplementedError) as e:
        with pytest.raises(SdstreamError, match="prediction"):
            ours(folder, scheduler, seed=7, guidance=6.0)
        pytest.skip(f"diffusers refuses it: {e}")
    cases = {
        "txt2img": (reference, dict(seed=7, guidance=6.0)),
        "img2img 1.0": (theirs(tiny, folder, scheduler, init=init_picture, strength=1.0),
                        dict(seed=7, guidance=6.0, init_image=str(init_picture), strength=1.0)),
    }
    if variant == "epsilon":  # the other starts, and no guidance, on the default config
        cases["txt2img unguided"] = (theirs(tiny, folder, scheduler, guidance=1.0, seed=2**64 - 1),
                                     dict(seed=2**64 - 1, guidance=1.0))
        cases["img2img 0.3"] = (theirs(tiny, folder, scheduler, init=init_picture, strength=0.3),
                                dict(seed=7, guidance=6.0, init_image=str(init_picture), strength=0.3))
        # --start-step K is img2img at the strength that starts at K: int(N * s) = N - K + 1
        cases["start-step 3"] = (theirs(tiny, folder, scheduler, init=init_picture, strength=(STEPS - 2 + 0.5) / STEPS),
                                 dict(seed=7, guidance=6.0, start_image=str(init_picture), start_step=3))
    for case, (reference, kw) in cases.items():
        diff = differ(ours(folder, scheduler, **kw), reference)
        if diff > 1:
            misses.append(f"{case}: {diff} levels")
    assert not misses, misses


def test_repeated_first_timesteps_start_at_the_first_step(tiny, variants, init_picture):
    """Karras sigmas on a zero-terminal-SNR schedule begin 999, 999, ... at 25 steps. A scheduler left to find its
    place by the timestep's value takes the second 999 and runs off its sigma table: diffusers' txt2img does
    (IndexError); its img2img sets the begin index, and so does every run of ours."""
    folder, (cls, options) = variants["zero-snr"], DIFFUSERS["dpm++-2m-karras"]
    scheduler = cls.from_config(DDIMScheduler.load_config(folder / "scheduler"), **options)
    scheduler.set_timesteps(25)
    assert scheduler.timesteps[0] == scheduler.timesteps[1] == 999
    components, kw = {**tiny.components, "scheduler": scheduler}, dict(num_inference_steps=25, guidance_scale=1.0)
    with pytest.raises(IndexError):
        StableDiffusionPipeline(**components)(PROMPT, height=SIZE, width=SIZE, **kw)
    reference = StableDiffusionImg2ImgPipeline(**components)(
        PROMPT, image=Image.open(init_picture), strength=1.0, generator=torch.Generator("cpu").manual_seed(2), **kw)
    run = dict(model=str(folder), prompt=PROMPT, steps=25, guidance=1.0, seed=2, scheduler="dpm++-2m-karras")
    mine = sdstream.generate(GenerationRequest(**run, init_image=str(init_picture), strength=1.0))
    assert differ(mine, reference.images[0]) <= 1
    txt2img = sdstream.generate(GenerationRequest(**run, width=SIZE, height=SIZE))
    assert np.asarray(txt2img).std() > 0


def test_eta_matches_diffusers_eta(tiny, variants, init_picture):
    folder = variants["epsilon"]
    components = {**tiny.components, "scheduler": DDIMScheduler.from_config(tiny.scheduler.config)}
    for eta in (0.5, 1.0):
        reference = StableDiffusionPipeline(**components)(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0, eta=eta, height=SIZE,
            width=SIZE, generator=torch.Generator("cpu").manual_seed(3)).images[0]
        assert differ(ours(folder, "ddim", seed=3, guidance=6.0, eta=eta), reference) <= 1, eta
    plain = ours(folder, "ddim", seed=3, guidance=6.0)
    assert differ(ours(folder, "ddim", seed=3, guidance=6.0, eta=1.0), plain) > 10  # eta does something


def test_other_size_and_the_size_of_an_init_picture(tiny, tmp_path):
    reference = tiny("a square", num_inference_steps=5, guidance_scale=1.0, height=48, width=32,
                     generator=torch.Generator("cpu").manual_seed(3)).images[0]
    mine = sdstream.generate(GenerationRequest(model="tiny", prompt="a square", steps=5, guidance=1.0, width=32,
                                               height=48, seed=3))
    assert mine.size == (32, 48) and differ(mine, reference) <= 1
    # without --width/--height, img2img keeps the picture's size (rounded down to the VAE factor), as diffusers does
    Image.new("RGB", (41, 27), (200, 40, 40)).save(tmp_path / "odd.png")
    img2img = StableDiffusionImg2ImgPipeline(**tiny.components)
    reference = img2img("a square", image=Image.open(tmp_path / "odd.png"), strength=0.6, num_inference_steps=5,
                        generator=torch.Generator("cpu").manual_seed(3)).images[0]
    mine = sdstream.generate(GenerationRequest(model="tiny", prompt="a square", steps=5, seed=3, strength=0.6,
                                               init_image=str(tmp_path / "odd.png")))
    assert mine.size == reference.size == (40, 26) and differ(mine, reference) <= 1


class Record(sdstream.Sink):
    """Each step's input latents (the previous step's output), model output and x0."""

    def __init__(self):
        self.steps = []

    def step(self, step):
        self.steps.append(step.event)


def x0_by_definition(scheduler, index: int, t: int, sample, output):
    """x0 at schedule index INDEX from the scheduler's own sigmas (or alpha-bar at t), as the papers define it."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return output
    if hasattr(scheduler, "sigmas") and not isinstance(scheduler, (DDIMScheduler, PNDMScheduler)):
        sigma = float(scheduler.sigmas[index])
        if isinstance(scheduler, (DPMSolverMultistepScheduler, UniPCMultistepScheduler)):  # on x_t itself
            alpha_t = 1 / (sigma**2 + 1) ** 0.5
            sigma_t = sigma * alpha_t
            if kind == "v_prediction":
                return alpha_t * sample - sigma_t * output
            return (sample - sigma_t * output) / alpha_t
        if kind == "v_prediction":  # Euler-type: on x_t / alpha_t
            return output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return sample - sigma * output
    a = float(scheduler.alphas_cumprod[t])
    if kind == "v_prediction":
        return a**0.5 * sample - (1 - a) ** 0.5 * output
    return (sample - (1 - a) ** 0.5 * output) / a**0.5


@pytest.mark.parametrize("variant", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("scheduler", DIFFUSERS)
def test_x0_at_every_step_is_the_schedulers_own(variants, variant, scheduler):
    folder = variants[variant]
    cls, options = DIFFUSERS[scheduler]
    reference = cls.from_config(DDIMScheduler.load_config(folder / "scheduler"), **options)
    reference.set_timesteps(STEPS)
    try:
        record = Record()
        sdstream.generate(GenerationRequest(model=str(folder), prompt=PROMPT, steps=STEPS, scheduler=scheduler,
                                            seed=1, guidance=1.0, width=SIZE, height=SIZE), [record])
    except SdstreamError:
        pytest.skip("diffusers refuses this combination (see the matrix)")
    for before, ev in zip(record.steps, record.steps[1:]):
        index = ev.step - 1
        expected = x0_by_definition(reference, index, ev.timestep, before.latents, ev.eps)
        assert torch.allclose(ev.denoised, expected.to(ev.denoised.dtype), rtol=1e-4, atol=1e-4), (scheduler, ev.step)


def test_same_seed_same_pixels_different_seed_different():
    a = sdstream.generate(GenerationRequest(model="tiny", prompt="a red circle", steps=4, seed=5))
    b = sdstream.generate(GenerationRequest(model="tiny", prompt="a red circle", steps=4, seed=5))
    c = sdstream.generate(GenerationRequest(model="tiny", prompt="a red circle", steps=4, seed=6))
    assert differ(a, b) == 0 and differ(a, c) > 0


def test_the_shipped_tiny_runs_in_plain_diffusers_with_its_defaults():
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_path()))  # no dtype, no options: as anyone would
    image = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert image.size == (32, 32)
