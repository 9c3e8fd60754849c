"""SDXL (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline): a UNet2DConditionModel like SD's, a
4-channel VAE latent and a DDPM-type schedule, so the schedule, the noise, x0 and the scheduler steps are SD's
(sd.StableDiffusion). What differs is the conditioning and the VAE:

- two CLIP text encoders; the cross-attention sees their penultimate hidden states side by side, and the UNet's
  added conditioning the second encoder's pooled (projected) output, with the "time ids": the original size, the
  crop's top left corner and the target size (a refiner's img2img pipeline that requires aesthetic scores: the
  original size, the crop and the aesthetic score, 6 for the prompt and 2.5 for the negative one). An empty
  negative prompt is zeros, not the encoding of "", where the folder says force_zeros_for_empty_prompt;
- the VAE may be flagged force_upcast (SDXL's overflows in fp16): it encodes and decodes in fp32 then, and its
  latents may be normalised by a per-channel mean and std (latents_mean/latents_std) instead of the scaling factor
  alone.

Everything here is what diffusers' two SDXL pipelines compute, in their order, with their own encode_prompt.
"""

from __future__ import annotations

import torch

from .base import Prompts
from .sd import StableDiffusion

# For --preview approx: SDXL's latent channels -> RGB in [-1, 1], ComfyUI's published factors for SDXL
# (comfy/latent_formats.py, class SDXL: latent_rgb_factors and latent_rgb_factors_bias; as of commit 040a324).
SDXL_LATENT_RGB = {"weights": ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                               (-0.3165, -0.2492, -0.2188)), "bias": (0.1084, -0.0175, -0.0011)}

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # StableDiffusionXLImg2ImgPipeline's defaults


class StableDiffusionXL(StableDiffusion):
    """SDXL's conditioning and VAE on SD's schedule (sd.StableDiffusion: set_timesteps, initial_noise, x0, x0_from,
    noise_unit, add_noise are the same computations in diffusers' SDXL pipelines)."""

    latent_rgb = SDXL_LATENT_RGB

    def __init__(self, pipe, traits):
        super().__init__(pipe, traits)
        # a refiner's time ids end with an aesthetic score, the base's with the target size
        self.aesthetics = bool(pipe.config.get("requires_aesthetics_score", False))
        self._check_time_ids()

    def _check_time_ids(self) -> None:
        """The UNet's added conditioning must take what the time ids and the pooled prompt make (diffusers raises
        the same at its first call); said when the model loads, not at the first step."""
        unet, encoder = self.denoiser, self.pipe.text_encoder_2
        if encoder is None or getattr(unet, "add_embedding", None) is None:
            return
        expected = unet.add_embedding.linear_1.in_features
        given = unet.config.addition_time_embed_dim * (5 if self.aesthetics else 6) + encoder.config.projection_dim
        if expected != given:
            from ...errors import SdstreamError

            kind = "5 (with an aesthetic score)" if self.aesthetics else "6 (with the target size)"
            raise SdstreamError(f"this SDXL model's UNet takes {expected} added-conditioning values, but {kind} "
                                f"time ids and the pooled prompt make {given}: its folder's config is inconsistent")

    # ---------------------------------------------------------------- conditioning
    def encode(self, prompt: str, negative: str, device) -> Prompts:
        cond, uncond, pooled, pooled_uncond = self.pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative or None)  # None: zeros where force_zeros_for_empty_prompt, as the pipeline's
        return Prompts(cond, uncond, {"pooled": pooled, "pooled_uncond": pooled_uncond})

    def time_ids(self, width: int, height: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt's, negative prompt's) added time ids for a WIDTH x HEIGHT picture: original size = target size =
        the picture's, crop at (0, 0), as both pipelines default them."""
        size, crop = (height, width), (0, 0)
        if self.aesthetics:
            ids, negative = (*size, *crop, AESTHETIC_SCORE), (*size, *crop, NEGATIVE_AESTHETIC_SCORE)
        else:
            ids = negative = (*size, *crop, *size)
        return (torch.tensor([ids], dtype=dtype).to(device), torch.tensor([negative], dtype=dtype).to(device))

    def conditioning(self, prompts: Prompts, guided: bool, width: int, height: int) -> dict:
        """The UNet's conditioning arguments, with guidance [negative, prompt] in one batch: the hidden states and
        the added conditioning (pooled prompt, time ids). Kept on PROMPTS, like SD's."""
        key = ("conditioning", guided, width, height)
        if key not in prompts.extra:
            extra = prompts.extra
            ids, negative_ids = self.time_ids(width, height, prompts.cond.dtype, prompts.cond.device)
            if guided:
                states = torch.cat([prompts.uncond, prompts.cond])
                added = {"text_embeds": torch.cat([extra["pooled_uncond"], extra["pooled"]]),
                         "time_ids": torch.cat([negative_ids, ids])}
            else:
                states, added = prompts.cond, {"text_embeds": extra["pooled"], "time_ids": ids}
            prompts.extra[key] = {"encoder_hidden_states": states, "added_cond_kwargs": added}
        return prompts.extra[key]

    def _timestep_cond(self, prompts: Prompts, guidance: float, like) -> torch.Tensor | None:
        """A guidance-distilled UNet's (LCM-SDXL: time_cond_proj_dim) embedding of the guidance; None for others."""
        dim = self.denoiser.config.time_cond_proj_dim
        if dim is None:
            return None
        key = ("timestep_cond", guidance)
        if key not in prompts.extra:
            w = torch.tensor(guidance - 1).repeat(1)
            prompts.extra[key] = self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(
                device=like.device, dtype=like.dtype)
        return prompts.extra[key]

    def predict(self, run, latents, t, t_model, prompts: Prompts, guidance: float):
        # a guidance-distilled UNet takes the guidance as an embedding, with no second half (the pipeline's
        # do_classifier_free_guidance)
        guided = guidance > 1.0 and self.denoiser.config.time_cond_proj_dim is None
        model_input = run.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        out = self.denoiser(model_input, t_model, **self.conditioning(prompts, guided, run.width, run.height),
                            timestep_cond=self._timestep_cond(prompts, guidance, latents), return_dict=False)[0]
        if guided:
            eps_uncond, eps_cond = out.chunk(2)
            return eps_uncond + guidance * (eps_cond - eps_uncond), eps_cond, eps_uncond
        eps = out.clone()  # (a compiled UNet's CUDA-graph output is overwritten by its next call)
        return eps, eps, None

    # ---------------------------------------------------------------- the VAE
    def _latent_stats(self, like):
        """The VAE's per-channel (mean, std) of its latents, or (None, None) when it has only a scaling factor."""
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None, None
        return (torch.tensor(mean).view(1, 4, 1, 1).to(like.device, like.dtype),
                torch.tensor(std).view(1, 4, 1, 1).to(like.device, like.dtype))

    def encode_picture(self, pixels, generator):
        """StableDiffusionXLImg2ImgPipeline.prepare_latents: a force_upcast VAE encodes in fp32 (then goes back to
        its dtype); the sample is drawn from the generator; then normalised."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.pipe.vae
        dtype, upcast = vae.dtype, bool(vae.config.force_upcast)
        if upcast:
            pixels = pixels.float()
            vae.to(dtype=torch.float32)
        try:
            latents = retrieve_latents(vae.encode(pixels), generator=generator)
        finally:
            if upcast:
                vae.to(dtype)
        latents = latents.to(dtype)
        mean, std = self._latent_stats(latents)
        if mean is not None:
            return (latents - mean) * vae.config.scaling_factor / std
        return vae.config.scaling_factor * latents

    def decode(self, latents, width: int, height: int):
        """The pipelines' decode: an fp16 VAE flagged force_upcast decodes in fp32 (and goes back to fp16); the
        latents are denormalised; the invisible watermark is applied where the pipeline has one (when the
        invisible-watermark package is installed, as diffusers does; it leaves pictures under 256 wide alone)."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(torch.float32 if upcast else vae.dtype)
            mean, std = self._latent_stats(latents)
            if mean is not None:
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        watermark = getattr(self.pipe, "watermark", None)
        return watermark.apply_watermark(image) if watermark is not None else image
