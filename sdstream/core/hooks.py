"""Interventions in the loop, as hooks (core/loop.py calls them): each takes tensors and pictures already
decoded, and changes the Run at its point.

  StartFromPicture  img2img (--init-image/--strength) and --start-image/--start-step
  ImagePrompt       a photo's CLIP features as the conditional prompt embeddings
  NoiseInjection    Gaussian noise through a mask at chosen steps
"""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
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
        pipe, scheduler, first = run.pipe, run.scheduler, run.first
        image = fit(self.picture, run.width, run.height)
        pixels = pipe.image_processor.preprocess(image, height=run.height, width=run.width)
        pixels = pixels.to(device=run.device, dtype=run.dtype)
        clean = retrieve_latents(pipe.vae.encode(pixels), generator=run.generator) * pipe.vae.config.scaling_factor
        noise = randn_tensor(clean.shape, generator=run.generator, device=run.device, dtype=run.dtype)
        run.latents = scheduler.add_noise(clean, noise, run.timesteps[first - 1 : first])


class ImagePrompt(Hook):
    """The conditional embeddings from a photo's CLIP features (models/clip.py), blended with the text's below 1."""

    def __init__(self, embedder, photo, weight: float):
        self.embedder, self.photo, self.weight = embedder, photo, weight

    def on_prompt(self, run: Run) -> None:
        from ..models.clip import image_prompt_embeds

        run.cond = image_prompt_embeds(run.pipe, self.embedder, self.photo, self.weight, run.cond)


class NoiseInjection(Hook):
    """Add Gaussian noise STRENGTH x unit x mask x noise to the latents just before the model call of each of STEPS.

    The unit is the latent's expected standard deviation at that step: 1 for DDIM-like schedulers and
    sqrt(sigma^2 + 1) for Euler-like ones, i.e. exactly what the scheduler's scale_model_input divides by,
    from its own sigmas. So a strength of 1 adds as much noise as the latent already carries at that level.
    The noise has its own random stream (from the seed and the step): the run is unchanged before the step.
    """

    def __init__(self, steps, strength: float, seed: int, pattern: str | None = None, picture=None):
        self.steps, self.strength, self.seed = set(steps), strength, seed
        self.pattern, self.picture, self.mask = pattern, picture, None

    def on_start(self, run: Run) -> None:
        h, w = run.latent_size  # made (and uploaded) once, before the first step
        if self.pattern is not None:
            self.mask = mask_tensor(self.pattern, h, w, device=run.device, dtype=run.dtype)
        else:
            self.mask = mask_from_image(self.picture, h, w, device=run.device, dtype=run.dtype)

    def before_step(self, run: Run, step: int, t: torch.Tensor) -> None:
        if step not in self.steps:
            return
        latents = run.latents
        gen = torch.Generator("cpu").manual_seed((self.seed * 1_000_003 + step) % 2**63)
        noise = randn_tensor(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
        one = torch.ones((1, 1, 1, 1), device=latents.device, dtype=latents.dtype)
        unit = one / run.scheduler.scale_model_input(one, t)
        run.latents = latents + self.strength * unit * self.mask * noise
        run.injected = True
