"""Our loop gives diffusers' pixels: a parity matrix whose references come from diffusers' public API only.

The reference is tiny's folder loaded by diffusers itself (`StableDiffusionPipeline.from_pretrained(path)`, its
defaults, once per module), never sdstream's loader or its scheduler helpers; sdstream runs through its public API
(`generate` with a `GenerationRequest`). Every scheduler, as a diffusers user builds it (the class from the model's
scheduler config, with its options), against StableDiffusionPipeline and StableDiffusionImg2ImgPipeline, over
scheduler-config variants of tiny (epsilon, v-prediction, sample prediction, zero-terminal-SNR with trailing
spacing): txt2img with guidance and without, img2img at strength 1 (guided) and 0.3 (unguided), and a start at a
later step (img2img at the strength that starts there), each on every config. And x0 at every step, guided and
not, against the x0 the scheduler itself computes inside diffusers' pipeline (its `pred_original_sample`, or
DPM-Solver++'s and UniPC's converted model output), or, for PNDM, which computes none, against its definition on
diffusers' own x_t and model output.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

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

TINY = Path(sdstream.__file__).parent / "weights" / "tiny"  # the shipped folder, as a path any user can pass

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
        for part in TINY.iterdir():
            if part.name != "scheduler":
                (folder / part.name).symlink_to(part)
        (folder / "scheduler").mkdir()
        config = json.loads((TINY / "scheduler" / "scheduler_config.json").read_text())
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **overrides}))
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def init_picture(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def reference():
    """tiny's folder as diffusers loads it, with its defaults (no dtype, no options): nothing of sdstream's."""
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def their_scheduler(folder, scheduler: str):
    """A fresh scheduler (they are stateful) of kind SCHEDULER for the model folder FOLDER, as a diffusers user
    builds it: `cls.from_config(pipe.scheduler.config, **options)`, pipe.scheduler being the DDIMScheduler that
    from_pretrained(FOLDER) loads (the variants differ from tiny in nothing else)."""
    cls, options = DIFFUSERS[scheduler]
    return cls.from_config(DDIMScheduler.from_pretrained(folder, subfolder="scheduler").config, **options)


def theirs(reference, scheduler, *, init=None, strength=None, guidance=6.0, seed=7):
    """diffusers' own picture: tiny as diffusers loads it, with SCHEDULER (their_scheduler's), in its txt2img
    pipeline, or its img2img pipeline for an INIT picture."""
    components = {**reference.components, "scheduler": scheduler}
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance,
              generator=torch.Generator("cpu").manual_seed(seed))
    if init is None:
        pipe = StableDiffusionPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPT, height=SIZE, width=SIZE, **kw).images[0]
    pipe = StableDiffusionImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, image=Image.open(init), strength=strength, **kw).images[0]


def ours(folder, scheduler: str, sinks=(), **kw):
    size = {} if "init_image" in kw or "start_image" in kw else {"width": SIZE, "height": SIZE}  # else the picture's
    return sdstream.generate(GenerationRequest(model=str(folder), prompt=PROMPT, negative_prompt=NEGATIVE,
                                               steps=STEPS, scheduler=scheduler, device="cpu", **size, **kw), sinks)


def differ(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


class Record(sdstream.Sink):
    """Each step's event: x_t it started from (sample), the guided model output (eps) and x0 (denoised)."""

    def __init__(self):
        self.steps = []

    def step(self, step):
        self.steps.append(step.event)


def recording(scheduler) -> list:
    """Wrap SCHEDULER's step (nothing else changes): every call diffusers' pipeline makes records its x_t, model
    output and timestep, and the x0 the scheduler itself computed: `pred_original_sample` where its output has one
    (DDIM, Euler, Euler a, LMS), the converted model output `model_outputs[-1]` for DPM-Solver++ and UniPC (x0 there:
    algorithm_type dpmsolver++, predict_x0), None for PNDM, which computes none."""
    calls, step = [], scheduler.step
    converted = isinstance(scheduler, (DPMSolverMultistepScheduler, UniPCMultistepScheduler))
    if converted:
        assert scheduler.config.get("algorithm_type", "dpmsolver++") == "dpmsolver++"
        assert scheduler.config.get("predict_x0", True)

    @functools.wraps(step)  # its signature too: the pipeline passes eta and generator only to a step that takes them
    def wrapped(model_output, timestep, sample, *args, return_dict=True, **kwargs):
        out = step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        x0 = scheduler.model_outputs[-1] if converted else getattr(out, "pred_original_sample", None)
        calls.append(SimpleNamespace(t=timestep, sample=sample.clone(), output=model_output.clone(),
                                     x0=None if x0 is None else x0.clone()))
        return out if return_dict else out.to_tuple()

    scheduler.step = wrapped
    return calls


def x0_by_definition(scheduler, t, sample, output):
    """x0 from alpha-bar at t, as the papers define it: for PNDM, which works on x_t alone and computes none."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return output
    a = float(scheduler.alphas_cumprod[int(t)])
    if kind == "v_prediction":
        return a**0.5 * sample - (1 - a) ** 0.5 * output
    return (sample - (1 - a) ** 0.5 * output) / a**0.5


def x0_misses(steps, calls, scheduler) -> list[str]:
    """Where our steps (events) differ from diffusers' scheduler calls: the first step is the first call, every
    step has the same timestep, x_t and model output, and x0 is the scheduler's own (PNDM: the definition on
    diffusers' x_t and model output) -- bit for bit: the same operations on the same inputs, one thread."""
    if len(steps) != len(calls):
        return [f"{len(steps)} steps, diffusers {len(calls)}"]
    misses = []
    for ev, call in zip(steps, calls):
        if ev.timestep != int(call.t):
            misses.append(f"step {ev.step}: timestep {ev.timestep}, diffusers {int(call.t)}")
        elif not (torch.equal(ev.sample, call.sample) and torch.equal(ev.eps, call.output)):
            misses.append(f"step {ev.step}: x_t or the model output differs")
        else:
            expected = call.x0 if call.x0 is not None else x0_by_definition(scheduler, call.t, call.sample, call.output)
            if not torch.equal(ev.denoised, expected.to(ev.denoised.dtype)):
                misses.append(f"step {ev.step}: x0 off by {relative(ev.denoised, expected):.1e} of max |x0|")
            # the x0 a model output the scheduler did not step with would give (one half of guidance, in frames)
            # is ours, from the scheduler's sigmas in Python floats: for the output it did step with, within
            # 1e-5 of its own (it is 1e-6: rounding; an x0 off the scheduler's sigma would be 1e-4 or more)
            if relative(ev.x0_of(ev.eps), expected) > 1e-5:
                misses.append(f"step {ev.step}: x0 of a half off by {relative(ev.x0_of(ev.eps), expected):.1e}")
    return misses


def relative(a, b) -> float:
    """The largest difference between A and B as a share of B's largest magnitude."""
    return float((a.to(b.dtype) - b).abs().max() / b.abs().max())


def case_misses(reference, folder, scheduler, their_kw, our_kw) -> list[str]:
    """One run of each, diffusers' with its scheduler's step recorded and ours with a sink: pixels within a level,
    every step's x0 exactly the scheduler's own."""
    sched = their_scheduler(folder, scheduler)
    calls = recording(sched)
    picture = theirs(reference, sched, **their_kw)  # raises where diffusers refuses
    record = Record()
    diff = differ(ours(folder, scheduler, [record], **our_kw), picture)
    return ([f"{diff} levels"] if diff > 1 else []) + x0_misses(record.steps, calls, sched)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheduler", DIFFUSERS)
def test_every_scheduler_and_start_matches_diffusers(reference, variants, init_picture, variant, scheduler):
    """Pixels within a level of diffusers', and x0 at every step (the first included), guided and not, exactly
    the x0 diffusers' scheduler computes in diffusers' own pipeline."""
    folder, guided, unguided = variants[variant], dict(seed=7, guidance=6.0), dict(seed=2**64 - 1, guidance=1.0)
    cases = {  # name -> (diffusers' arguments, ours)
        "txt2img": (guided, guided),
        "txt2img unguided": (unguided, unguided),
        "img2img 1.0": ({**guided, "init": init_picture, "strength": 1.0},
                        {**guided, "init_image": str(init_picture), "strength": 1.0}),
        "img2img 0.3 unguided": ({**unguided, "init": init_picture, "strength": 0.3},
                                 {**unguided, "init_image": str(init_picture), "strength": 0.3}),
        # --start-step K is img2img at the strength that starts at K: int(N * s) = N - K + 1
        "start-step 3": ({**guided, "init": init_picture, "strength": (STEPS - 2 + 0.5) / STEPS},
                         {**guided, "start_image": str(init_picture), "start_step": 3}),
    }
    misses = []
    for case, (their_kw, our_kw) in cases.items():
        try:
            misses += [f"{case}: {miss}" for miss in case_misses(reference, folder, scheduler, their_kw, our_kw)]
        except (ValueError, NotImplementedError) as e:
            # a combination diffusers itself refuses (say, sample prediction with Euler a) is refused by us too
            assert case == "txt2img", (case, e)
            with pytest.raises(SdstreamError, match="prediction"):
                ours(folder, scheduler, **our_kw)
            pytest.skip(f"diffusers refuses it: {e}")
    assert not misses, misses


def test_repeated_first_timesteps_start_at_the_first_step(reference, variants, init_picture):
    """Karras sigmas on a zero-terminal-SNR schedule begin 999, 999, ... at 25 steps. A scheduler left to find its
    place by the timestep's value takes the second 999 and runs off its sigma table: diffusers' txt2img does
    (IndexError); its img2img sets the begin index, and so does every run of ours. x0 is the scheduler's own at
    every step there too (Karras sigmas are off the integer timestep grid)."""
    folder = variants["zero-snr"]
    scheduler = their_scheduler(folder, "dpm++-2m-karras")
    scheduler.set_timesteps(25)
    assert scheduler.timesteps[0] == scheduler.timesteps[1] == 999
    kw = dict(num_inference_steps=25, guidance_scale=1.0)
    with pytest.raises(IndexError):
        StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler})(PROMPT, height=SIZE, width=SIZE,
                                                                                    **kw)
    scheduler = their_scheduler(folder, "dpm++-2m-karras")
    calls = recording(scheduler)
    theirs = StableDiffusionImg2ImgPipeline(**{**reference.components, "scheduler": scheduler})(
        PROMPT, image=Image.open(init_picture), strength=1.0, generator=torch.Generator("cpu").manual_seed(2), **kw)
    run = dict(model=str(folder), prompt=PROMPT, steps=25, guidance=1.0, seed=2, scheduler="dpm++-2m-karras")
    record = Record()
    mine = sdstream.generate(GenerationRequest(**run, init_image=str(init_picture), strength=1.0), [record])
    assert differ(mine, theirs.images[0]) <= 1
    assert not x0_misses(record.steps, calls, scheduler)
    txt2img = sdstream.generate(GenerationRequest(**run, width=SIZE, height=SIZE))
    assert np.asarray(txt2img).std() > 0


def test_eta_matches_diffusers_eta(reference, variants):
    folder = variants["epsilon"]
    for eta in (0.5, 1.0):
        pipe = StableDiffusionPipeline(**{**reference.components,
                                          "scheduler": DDIMScheduler.from_config(reference.scheduler.config)})
        theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0, eta=eta,
                      height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(3)).images[0]
        assert differ(ours(folder, "ddim", seed=3, guidance=6.0, eta=eta), theirs) <= 1, eta
    plain = ours(folder, "ddim", seed=3, guidance=6.0)
    assert differ(ours(folder, "ddim", seed=3, guidance=6.0, eta=1.0), plain) > 10  # eta does something


def test_other_size_and_the_size_of_an_init_picture(reference, tmp_path):
    theirs = reference("a square", num_inference_steps=5, guidance_scale=1.0, height=48, width=32,
                       generator=torch.Generator("cpu").manual_seed(3)).images[0]
    mine = sdstream.generate(GenerationRequest(model="tiny", prompt="a square", steps=5, guidance=1.0, width=32,
                                               height=48, seed=3))
    assert mine.size == (32, 48) and differ(mine, theirs) <= 1
    # without --width/--height, img2img keeps the picture's size (rounded down to the VAE factor), as diffusers does
    Image.new("RGB", (41, 27), (200, 40, 40)).save(tmp_path / "odd.png")
    img2img = StableDiffusionImg2ImgPipeline(**reference.components)
    theirs = img2img("a square", image=Image.open(tmp_path / "odd.png"), strength=0.6, num_inference_steps=5,
                     generator=torch.Generator("cpu").manual_seed(3)).images[0]
    mine = sdstream.generate(GenerationRequest(model="tiny", prompt="a square", steps=5, seed=3, strength=0.6,
                                               init_image=str(tmp_path / "odd.png")))
    assert mine.size == theirs.size == (40, 26) and differ(mine, theirs) <= 1


def test_same_seed_same_pixels_different_seed_different():
    a = sdstream.generate(GenerationRequest(model="tiny", prompt="a red circle", steps=4, seed=5))
    b = sdstream.generate(GenerationRequest(model="tiny", prompt="a red circle", steps=4, seed=5))
    c = sdstream.generate(GenerationRequest(model="tiny", prompt="a red circle", steps=4, seed=6))
    assert differ(a, b) == 0 and differ(a, c) > 0


def test_the_shipped_tiny_runs_in_plain_diffusers_with_its_defaults():
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY))  # no dtype, no options: as anyone would
    image = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert image.size == (32, 32)
