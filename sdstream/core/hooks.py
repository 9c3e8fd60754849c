"""Interventions in the loop, as hooks (core/loop.py calls them): each takes tensors and pictures already
decoded, and changes the Run at its point.

  StartFromPicture  img2img (--init-image/--strength) and --start-image/--start-step
  ImagePrompt       a photo's CLIP features as the conditional prompt embeddings
  NoiseInjection    Gaussian noise through a mask at chosen steps
  ChangeAt          from a step on, another prompt, negative prompt, guidance or seed (--prompt-at, a branch)
  Resume            start after a step from its saved state (a branch, resume)
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..inputs import fit
from ..masks import mask_from_image, mask_tensor
from .loop import Hook, Run


class StartFromPicture(Hook):
    """Start from PICTURE, encoded by the VAE and noised to the first step's timestep (img2img: the request's
    first step is diffusers' t_start * order + 1; --start-image: --start-step).

    Exactly diffusers' img2img: the VAE's sample and the noise are drawn, in that order, from the run's
    generator. The picture is centre-cropped to the run's aspect ratio, then resized by diffusers' own
    preprocessing.
    """

    def __init__(self, picture):
        self.picture = picture

    def on_start(self, run: Run) -> None:
        pipe, family, first = run.pipe, run.family, run.first
        image = fit(self.picture, run.width, run.height)
        pixels = pipe.image_processor.preprocess(image, height=run.height, width=run.width)
        pixels = pixels.to(device=run.device, dtype=pipe.vae.dtype)
        clean = family.encode_picture(pixels, run.generator).to(run.dtype)
        noise = randn_tensor(clean.shape, generator=run.generator, device=run.device, dtype=run.dtype)
        run.latents = family.add_noise(run.scheduler, clean, noise, run.timesteps[first - 1 : first])


class ImagePrompt(Hook):
    """The conditional embeddings from a photo's CLIP features (models/clip.py), blended with the text's below 1."""

    def __init__(self, embedder, photo, weight: float):
        self.embedder, self.photo, self.weight = embedder, photo, weight

    def on_prompt(self, run: Run) -> None:
        from ..models.clip import image_prompt_embeds
        from .families.base import Prompts

        cond = image_prompt_embeds(run.pipe, self.embedder, self.photo, self.weight, run.prompts.cond)
        run.prompts = Prompts(cond, run.prompts.uncond)


class NoiseInjection(Hook):
    """Add Gaussian noise STRENGTH x unit x mask x noise to the latents just before the model call of each of STEPS.

    The unit is the latent's own noise level at that step, in its family's terms (Family.noise_unit): for SD's
    DDPM-type schedules its expected standard deviation (1 for DDIM-like schedulers, sqrt(sigma^2 + 1) for
    Euler-like ones: what scale_model_input divides by); for flow matching sigma, the noise's share of
    x_t = (1 - sigma) x0 + sigma noise. So a strength of 1 adds as much noise as the latent already carries.
    The noise has its own random stream (from the seed and the step): the run is unchanged before the step.
    """

    def __init__(self, steps, strength: float, seed: int, pattern: str | None = None, picture=None):
        self.steps, self.strength, self.seed = set(steps), strength, seed
        self.pattern, self.picture, self.mask = pattern, picture, None

    def on_start(self, run: Run) -> None:
        h, w = run.latent_size  # made (and uploaded) once, before the first step, laid out as the latents are
        if self.pattern is not None:
            mask = mask_tensor(self.pattern, h, w, device=run.device, dtype=run.dtype)
        else:
            mask = mask_from_image(self.picture, h, w, device=run.device, dtype=run.dtype)
        self.mask = run.family.pack(mask.expand(1, run.family.latent_channels, h, w))

    def before_step(self, run: Run, step: int, t: torch.Tensor) -> None:
        if step not in self.steps:
            return
        latents = run.latents
        gen = torch.Generator("cpu").manual_seed((self.seed * 1_000_003 + step) % 2**63)
        noise = randn_tensor(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
        added = self.strength * run.family.noise_unit(run.scheduler, t, latents) * self.mask * noise
        run.latents, run.injected = latents + added, True
        run.injected_rms = added.float().pow(2).mean().sqrt()  # stays on the device: read once, at the end


class ChangeAt(Hook):
    """From step STEP on: PROMPT (the conditional text) and/or NEGATIVE, GUIDANCE, and SEED for the noise still to be
    drawn (Euler a's and DDIM-with-eta's steps). None leaves that part as it was."""

    def __init__(self, step: int, prompt: str | None = None, negative: str | None = None,
                 guidance: float | None = None, seed: int | None = None):
        self.step, self.prompt, self.negative, self.guidance, self.seed = step, prompt, negative, guidance, seed

    def on_prompt(self, run: Run) -> None:
        if self.prompt is not None or self.negative is not None:  # encoded now, with the run's own
            prompt = self.prompt if self.prompt is not None else run.req.prompt
            negative = self.negative if self.negative is not None else run.req.negative_prompt
            self.prompts = run.family.encode(prompt, negative, run.device)

    def before_step(self, run: Run, step: int, t) -> None:
        if step != self.step:
            return
        if self.prompt is not None or self.negative is not None:  # both halves, encoded together (a photo as the
            run.prompts = self.prompts  # prompt gives way to the text)
        if self.guidance is not None:
            run.guidance = self.guidance
        if self.seed is not None:
            run.generator.manual_seed(self.seed)


class Resume(Hook):
    """Start at schedule step STEP from the state saved after step STEP - 1 (core/state.py): no step before it is
    computed again, and what follows is bit for bit what the run itself computed."""

    def __init__(self, step: int, tensors: dict, meta: dict):
        self.step, self.tensors, self.meta = step, tensors, meta

    def on_start(self, run: Run) -> None:
        from .state import restore

        run.first = self.step
        restore(run, self.tensors, self.meta)
