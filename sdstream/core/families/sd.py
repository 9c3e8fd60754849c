"""SD 1.x/2.x (StableDiffusionPipeline): a UNet2DConditionModel with cross-attention, a 4-channel VAE latent,
one CLIP text encoder, a DDPM-type schedule. What diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline compute, in their order of random draws."""

from __future__ import annotations

import torch

from ..schedulers import x0, x0_from
from .base import Family, Prompts


class StableDiffusion(Family):
    def encode(self, prompt: str, negative: str, device) -> Prompts:
        cond, uncond = self.pipe.encode_prompt(prompt, device, 1, True, negative or None)
        return Prompts(cond, uncond)

    def set_timesteps(self, scheduler, steps: int, width: int, height: int) -> None:
        scheduler.set_timesteps(steps, device="cpu")
        # x0 for PNDM reads alpha_t on the host: keep the table there (add_noise moves some schedulers' own copy
        # to the device, where a read is a sync)
        scheduler.sdstream_alphas = scheduler.alphas_cumprod.cpu()

    def initial_noise(self, run):
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, self.denoiser.config.in_channels, *self.latent_size(run.width, run.height))
        noise = randn_tensor(shape, generator=run.generator, device=run.device, dtype=run.dtype)
        return noise * run.scheduler.init_noise_sigma

    def conditioning(self, prompts: Prompts, guided: bool) -> dict:
        """The denoiser's conditioning arguments: with guidance, [unconditional, conditional] in one batch.
        Kept on PROMPTS: made again only when a hook changes the prompts or turns guidance on or off."""
        key = ("conditioning", guided)
        if key not in prompts.extra:
            prompts.extra[key] = {"encoder_hidden_states": torch.cat([prompts.uncond, prompts.cond]) if guided
                                  else prompts.cond}
        return prompts.extra[key]

    def predict(self, run, latents, t, t_model, prompts: Prompts, guidance: float):
        guided = guidance > 1.0
        model_input = run.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        out = self.denoiser(model_input, t_model, **self.conditioning(prompts, guided), return_dict=False)[0]
        if guided:
            eps_uncond, eps_cond = out.chunk(2)
            return eps_uncond + guidance * (eps_cond - eps_uncond), eps_cond, eps_uncond
        eps = out.clone()  # with --compile on CUDA it is CUDA-graph memory that the next call overwrites; PNDM keeps it
        return eps, eps, None

    def _alpha(self, scheduler, t_value: float) -> float:
        return float(scheduler.sdstream_alphas[int(round(t_value))])

    def x0(self, scheduler, out, latents, eps, t_value: float):
        return x0(scheduler, out, latents, eps, self._alpha(scheduler, t_value))

    def x0_from(self, scheduler, step_index: int, t_value: float, sample, model_output):
        return x0_from(scheduler, step_index, self._alpha(scheduler, t_value), sample, model_output)

    def noise_unit(self, scheduler, t, like):
        """1 for DDIM-like schedulers, sqrt(sigma^2 + 1) for Euler-like ones: what scale_model_input divides by."""
        one = torch.ones((1, 1, 1, 1), device=like.device, dtype=like.dtype)
        return one / scheduler.scale_model_input(one, t)

    def encode_picture(self, pixels, generator):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.pipe.vae
        return retrieve_latents(vae.encode(pixels), generator=generator) * vae.config.scaling_factor

    def add_noise(self, scheduler, clean, noise, timestep):
        return scheduler.add_noise(clean, noise, timestep)

    def decode(self, latents, width: int, height: int):
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
