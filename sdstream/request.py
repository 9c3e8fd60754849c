"""GenerationRequest: everything one run needs, each field declared once as an option. Pure Python, no torch.

validated() makes the checks that need neither files nor a model: types, ranges, choices, options that
apply only with another, and the step arithmetic (img2img, --start-step, injection steps), which needs
only the scheduler's name. Pictures are decoded and checked by inputs.load_inputs, the model's
vocabulary and whereabouts by models.check_available: all of it before torch is imported. The checks
that need the loaded model (size vs the VAE factor, the CLIP's width) come last
(record.orchestrator.check_against_model).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, replace
from functools import cached_property

from . import masks
from .core.schedulers import SCHEDULERS, canonical_scheduler, img2img_skip, order, schedule_length
from .errors import BadInput
from .options import Option, option, options_of

MAX_SEED = 2**64 - 1
MAX_STEPS = 500  # DDIM's schedule runs past SD's 1000 training timesteps at 1000 steps
# the model's own when not given (core/families' traits, models/registry's ALIAS_DEFAULTS), in words
STEPS_DEFAULTS = "the model's: 20 SD 1.x/2.x, 30 SDXL, 28 SD3 and FLUX, 4 flux-schnell"
GUIDANCE_DEFAULTS = "the model's: 7.5 SD 1.x/2.x, 5 SDXL, 7 SD3, 3.5 FLUX, 0 flux-schnell"
DEFAULT_INJECT_FRACTION = 0.3  # --mask alone injects 30% into the run: late enough to keep composition
PREVIEWS = ("auto", "approx", "vae", "taesd", "none")  # how frames are decoded (see core/preview.py)
FRAME_SOURCES = ("x0", "latent", "x0-cond", "x0-uncond")  # x0-cond/-uncond: what each half of guidance predicts
TENSORS = ("latents", "x0", "eps", "eps-cond", "eps-uncond")  # what --save-tensors may keep of each step
TENSOR_DTYPES = ("fp16", "bf16", "fp32", "run")
FRAME_FORMATS = ("png", "jpg", "webp")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")

PROMPT, IMAGE_PROMPT, MODEL, PICTURE, MASK, FRAMES, TRAJECTORY, DEVICE = (
    "Prompt", "Image as prompt", "Model", "Start from a picture", "Noise injection", "Frames", "Trajectory",
    "Device")


def _device(name: str) -> str | None:
    return name if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name) else None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Field names are the `generate` options with dashes as underscores."""

    prompt: str = option("", "What to draw.", PROMPT, short="-p", metavar="TEXT")
    negative_prompt: str = option("", "What to steer away from (the unconditional half of guidance).", PROMPT,
                                  metavar="TEXT")
    guidance: float = option(None, "Classifier-free guidance scale, 0-100; off at 1 or below (FLUX: the guidance "
                             "its model embeds).", PROMPT, kind="float", range=(0, 100), metavar="G",
                             api="guidance_scale", a1111="CFG scale", shown_default=GUIDANCE_DEFAULTS)
    prompt_at: tuple[tuple[int, str], ...] = option(
        (), "From step K on, the conditional prompt is TEXT (repeatable): AUTOMATIC1111's prompt editing.", PROMPT,
        kind="pairs", range=(1, MAX_STEPS + 1), metavar="K:TEXT", a1111="Prompt at")
    prompt_image: str | None = option(
        None, "Use this photo as the prompt: its CLIP image features, repeated over the token positions, replace "
        "the text prompt's embedding (the unconditional half stays --negative-prompt's).", IMAGE_PROMPT,
        kind="picture", metavar="FILE")
    image_weight: float | None = option(
        1.0, "0-1: blend the photo with --prompt, cond = W * image + (1 - W) * text; 1 = the photo alone.",
        IMAGE_PROMPT, range=(0, 1), needs="prompt_image", metavar="W", a1111="Image weight")
    clip_model: str | None = option(
        None, "CLIP for the photo: vit-l-14, vit-h-14, tiny, a Hugging Face repo id or a local folder.", IMAGE_PROMPT,
        needs="prompt_image", metavar="C", served=False, shown_default="the one that fits the model")
    model: str | None = option(
        None, "An alias (see `sdstream models`), a Hugging Face repo id or a local diffusers folder.", MODEL,
        short="-m", metavar="M", shown_default="$SDSTREAM_MODEL or compressibility")
    steps: int = option(None, "Denoising steps, 1-500.", MODEL, kind="int", range=(1, MAX_STEPS), metavar="N",
                        a1111="Steps", shown_default=STEPS_DEFAULTS)
    scheduler: str = option("auto", "How each step moves the latent: " + ", ".join(SCHEDULERS) + "; auto: the model "
                            "family's own (ddim for SD 1.x/2.x and SDXL, flow-euler for SD3 and FLUX).", MODEL,
                            kind="choice", choices=lambda: ("auto", *SCHEDULERS), canonical=canonical_scheduler,
                            metavar="S")
    eta: float | None = option(0.0, "DDIM's eta, 0-1: 0 is deterministic, 1 adds DDPM's noise at every step.",
                               MODEL, range=(0, 1), needs="scheduler=ddim|auto", metavar="E", a1111="Eta")
    width: int | None = option(None, "Width in pixels, a multiple of the VAE factor.", MODEL, kind="int",
                               range=(8, 4096), metavar="W", shown_default="the model's, or the start picture's")
    height: int | None = option(None, "Height in pixels, a multiple of the VAE factor.", MODEL, kind="int",
                                range=(8, 4096), metavar="H", shown_default="the model's, or the start picture's")
    seed: int | None = option(None, "Random seed, recorded in run.json and final.png.", MODEL, kind="int",
                              range=(0, MAX_SEED), metavar="N", a1111="Seed", shown_default="random")
    init_image: str | None = option(None, "img2img: start from this picture.", PICTURE, kind="picture",
                                    metavar="FILE")
    strength: float | None = option(
        0.75, "img2img: the share of the schedule that is re-run, 0-1 (diffusers' arithmetic).", PICTURE,
        range=(0, 1), needs="init_image", metavar="S", a1111="Denoising strength")
    start_image: str | None = option(None, "Encode this picture, noise it to --start-step and denoise from there.",
                                     PICTURE, kind="picture", metavar="FILE")
    start_step: int | None = option(None, "The step at which --start-image enters.", PICTURE, kind="int",
                                    range=(1, MAX_STEPS + 1), needs="start_image", metavar="K", a1111="Start step")
    mask: str | None = option(
        None, "Where to inject noise: " + ", ".join(masks.PATTERNS) + ", or a grey-level picture (white = full "
        "noise).", MASK, kind="choice", choices=lambda: masks.PATTERNS, canonical=masks.canonical, or_picture=True,
        metavar="NAME|FILE", api="noise_mask_type", a1111="Noise mask")
    inject_at_step: tuple[int, ...] | None = option(
        (), "Steps at which to inject noise: 5,8 or the option repeated.", MASK, kind="steps",
        range=(1, MAX_STEPS + 1), needs="mask", metavar="K", a1111="Inject at step", shown_default="30% into the run")
    noise_strength: float | None = option(
        1.0, "Injected noise, 0-2, in units of the latent's own noise level at that step.", MASK, range=(0, 2),
        needs="mask", metavar="S", a1111="Noise strength")
    preview: str = option(
        "auto", "How frames are decoded: approx (a linear map, about free), vae (the model's own decoder), taesd, "
        "none; auto: what the model folder declares, else TAESD when it is on disk, else approx.", FRAMES,
        kind="choice", choices=lambda: PREVIEWS, metavar="P")
    frame_source: str | None = option(
        "x0", "x0 (the model's estimate of the clean image), latent (the noisy state), or x0-cond / x0-uncond (what "
        "the prompt alone, or the negative prompt alone, predicts).", FRAMES, kind="choice",
        choices=lambda: FRAME_SOURCES, needs="preview!=none", metavar="SRC")
    taesd: str | None = option(None, "Where --preview taesd loads TAESD from: a hub id or a folder.", FRAMES,
                               needs="preview=taesd", metavar="ID|DIR", served=False,
                               shown_default="madebyollin/taesd")
    frames_every: int | None = option(1, "Write every Nth step's frame (the last always).", FRAMES,
                                      range=(1, 10_000), needs="preview!=none", metavar="N")
    frame_size: int | None = option(
        None, "Longer side of the frames on disk, in pixels (approx frames are decoded at latent size).", FRAMES,
        kind="int", range=(8, 4096), needs="preview!=none", metavar="N", served=False,
        shown_default="the image's, at most 512")
    frame_format: str | None = option("png", "png, jpg or webp.", FRAMES, kind="choice", choices=lambda: FRAME_FORMATS,
                                      needs="preview!=none", metavar="FMT", served=False)
    save_tensors: tuple[str, ...] = option(
        (), "Keep these tensors of every step in the run folder (safetensors): " + ", ".join(TENSORS) + ", or all.",
        TRAJECTORY, kind="names", choices=lambda: TENSORS, metavar="LIST", served=False)
    tensor_dtype: str | None = option("fp16", "The dtype --save-tensors stores them in: fp16, bf16, fp32, or run "
                                      "(the run's own).", TRAJECTORY, kind="choice", choices=lambda: TENSOR_DTYPES,
                                      needs="save_tensors", metavar="T", served=False)
    attention: bool = option(
        False, "Record every step's cross-attention per word of the prompt (the conditional half, averaged over "
        "heads and layers) into attention/: a map per step, and heat maps over the frames.", TRAJECTORY)
    attention_words: str | None = option(
        None, "The words --attention draws heat maps of, e.g. circle,red.", TRAJECTORY, metavar="LIST",
        needs="attention", shown_default="every word that is not a stop word")
    save_state: bool = option(False, "Keep what it takes to continue from every step (the latents at the run's dtype, "
                              "the scheduler's history, the random stream): branch and resume then start at once.",
                              TRAJECTORY, served=False)
    stop_at_step: int | None = option(None, "Stop after step K with the state to continue kept (status stopped); "
                                      "`sdstream resume RUN` finishes the run.", TRAJECTORY, kind="int",
                                      range=(1, MAX_STEPS + 1), metavar="K", served=False)
    parent: str | None = option(None, "The run folder this run branches from (sdstream branch).", TRAJECTORY,
                                kind="picture", cli=False, served=False)
    at_step: int | None = option(None, "The step from which this branch differs from its parent.", TRAJECTORY,
                                 kind="int", range=(1, MAX_STEPS + 1), needs="parent", cli=False, served=False)
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", DEVICE,
                         kind="choice", choices=lambda: DEVICES, canonical=_device, metavar="D", served=False)
    dtype: str = option("auto", "auto (fp16 on CUDA, else fp32), fp32, fp16 or bf16.", DEVICE, kind="choice",
                        choices=lambda: DTYPES, metavar="T", served=False)
    compile: bool = option(False, "torch.compile the UNet: faster steps after a slow first run.", DEVICE,
                           served=False)
    cpu_offload: bool = option(False, "Keep each model on the GPU only while it runs (less memory; CUDA).", DEVICE,
                               served=False)
    vae_tiling: bool = option(False, "Decode large images tile by tile (less memory).", DEVICE, served=False)
    attention_slicing: bool = option(False, "Compute attention in slices (less memory, slower).", DEVICE,
                                     served=False)

    # ------------------------------------------------------------------------------------------ checks

    def validated(self) -> GenerationRequest:
        """A copy with names made canonical, defaults of applicable options filled in and the seed fixed,
        or BadInput naming the bad value and what is allowed."""
        values = {name: opt.check(getattr(self, name)) for name, opt in OPTIONS.items()}
        if values["steps"] is None or values["guidance"] is None:  # the model's own (its alias's or family's)
            from .models.registry import model_defaults

            defaults = model_defaults(values["model"])
            values = {**values, **{k: defaults[k] for k in ("steps", "guidance") if values[k] is None}}
        for name, opt in OPTIONS.items():  # options that apply only with another: refused without it
            if values[name] is not None and opt.needs and not opt.applies(values):
                raise BadInput(f"{opt.flag} applies only with {opt.needs_text(OPTIONS)}; add that or drop {opt.flag}")
            if values[name] is None and opt.needs and opt.applies(values):
                values[name] = opt.default
        if values["seed"] is None:
            values["seed"] = secrets.randbelow(2**32)

        if values["init_image"] is not None and values["start_image"] is not None:
            raise BadInput("--init-image and --start-image are two ways to start from a picture; give one")
        if values["start_image"] is not None and values["start_step"] is None:
            raise BadInput("--start-image needs --start-step K (the step at which it enters)")
        req = replace(self, **values)
        total = req.total_steps
        if req.start_step is not None and req.start_step > total:
            raise BadInput(f"--start-step {req.start_step} is not allowed: give a step from 1 to {total} "
                           f"({req.scheduler} runs {req.steps} steps as {total})" if total != req.steps else
                           f"--start-step {req.start_step} is not allowed: give a step from 1 to {total}")
        if req.init_image is not None and req.steps - img2img_skip(req.scheduler, req.steps, req.strength) < 1:
            raise BadInput(f"--strength {req.strength:g} with --steps {req.steps} denoises no step; "
                           f"use a strength of at least {1 / req.steps:.3g} or more steps")
        for option_name, steps in (("--inject-at-step", req.inject_at_step or ()),
                                   ("--prompt-at", [k for k, _ in req.prompt_at])):
            for k in steps:
                if not req.first_step <= k <= total:
                    raise BadInput(f"{option_name} {k} is outside this run's steps: give a step from "
                                   f"{req.first_step} to {total}")
        if req.stop_at_step is not None and not req.first_step <= req.stop_at_step < total:
            raise BadInput(f"--stop-at-step {req.stop_at_step} is not allowed: give a step from {req.first_step} to "
                           f"{total - 1} (the run stops after it; step {total} is the end)")
        if req.frame_source == "x0-uncond" and req.guidance <= 1:
            raise BadInput("--frame-source x0-uncond shows the unconditional half of guidance: it needs a --guidance "
                           "above 1")
        if req.parent is not None and req.at_step is None:
            raise BadInput("a branch needs the step it starts at (--at-step)")
        return req

    # ------------------------------------------------------------------------------------------ step arithmetic

    @cached_property
    def total_steps(self) -> int:
        """Length of the full schedule (PNDM runs N steps as N + 1)."""
        return schedule_length(self.scheduler, self.steps)

    @cached_property
    def first_step(self) -> int:
        """1-based schedule index of the first step this run denoises, exactly as diffusers slices the schedule:
        img2img skips t_start * order of it (get_timesteps; t_start as the scheduler's kind of pipeline computes
        it: core/schedulers.img2img_skip)."""
        if self.init_image is not None:
            return img2img_skip(self.scheduler, self.steps, self.strength) * order(self.scheduler) + 1
        if self.start_image is not None:
            return self.start_step
        return 1

    @cached_property
    def inject_steps(self) -> tuple[int, ...]:
        """The steps that inject noise: the ones asked for, or the documented default for a bare --mask."""
        if self.mask is None:
            return ()
        if self.inject_at_step:
            return self.inject_at_step
        first, total = self.first_step, self.total_steps
        return (first + round(DEFAULT_INJECT_FRACTION * (total - first + 1)),)

    @property
    def mask_is_pattern(self) -> bool:
        return self.mask is not None and self.mask in masks.PATTERNS

    def to_dict(self) -> dict:
        """The request as JSON values (tuples as lists): what run.json and final.png record."""
        return json.loads(json.dumps(asdict(self)))

    def changed(self) -> dict:
        """The fields that differ from a plain request's, as to_dict() spells them (for messages and labels)."""
        plain = GenerationRequest().to_dict()
        return {k: v for k, v in self.to_dict().items() if v != plain[k]}


OPTIONS: dict[str, Option] = options_of(GenerationRequest)


def from_values(values: dict, base: GenerationRequest | None = None) -> GenerationRequest:
    """BASE (or a plain request) with VALUES (field -> value) set; an unknown key is BadInput listing the known ones."""
    unknown = [k for k in values if k not in OPTIONS]
    if unknown:
        raise BadInput(f"unknown key {unknown[0]!r}; allowed: {', '.join(OPTIONS)}")
    return replace(base or GenerationRequest(), **values)
