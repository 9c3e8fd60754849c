"""SD3 (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline): a joint-attention transformer (MMDiT) on a
16-channel VAE latent, flow matching (FlowMatchEulerDiscreteScheduler), classifier-free guidance over a batch.

Flow matching, shared with FLUX (FlowMatching below): x_t = (1 - sigma) x0 + sigma noise, the model predicts the
velocity v = noise - x0, and a step is x_next = x + (sigma_next - sigma) v. So the clean estimate is
x0 = x_t - sigma_t v, from the scheduler's own sigma at the step; a picture enters at a step through the scheduler's
scale_noise; the VAE's latents are (x - shift_factor) * scaling_factor.

SD3's conditioning: two CLIP text encoders (penultimate hidden states side by side, padded to T5's width, then T5's
hidden states after them along the sequence) and the two CLIPs' pooled projections side by side; the negative
prompt's the same way ("" when none is given, diffusers' default). Everything here is what diffusers' SD3 pipelines
compute, with their own encode_prompt, in their order of random draws.
"""

from __future__ import annotations

import torch

from .base import Family, Prompts

# For --preview approx: SD3's 16 latent channels -> RGB in [-1, 1], ComfyUI's published factors
# (comfy/latent_formats.py, class SD3: latent_rgb_factors and latent_rgb_factors_bias; as of commit 040a324).
# ComfyUI applies them to the latents as the model sees them ((x - shift) * scale), as the previews here do.
SD3_LATENT_RGB = {"weights": (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
), "bias": (0.2394, 0.2135, 0.1925)}


class FlowMatching(Family):
    """What flow-matching families (SD3, FLUX) share: the denoiser is a transformer, the schedule is flow matching's
    sigmas (x0, the noise unit and the noising of a picture come from them), the VAE's latents are shifted and
    scaled. Everything that reads a sigma reads the scheduler's own table, on the CPU (set_timesteps puts it there):
    a 0-dim CPU tensor multiplies a GPU tensor as a scalar, with no copy and no sync."""

    @property
    def denoiser(self):
        return self.pipe.transformer

    # ---------------------------------------------------------------- the schedule
    @staticmethod
    def _sigma(scheduler, index: int) -> torch.Tensor:
        return scheduler.sigmas[index]

    @staticmethod
    def _index_now(scheduler) -> int:
        """The schedule index of the step about to be taken: the scheduler's step index once it has stepped, its
        begin index (always set by the loop, as the img2img pipelines set it) before the first step."""
        return scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index

    def x0(self, scheduler, out, latents, eps, t_value: float):
        """x0 = x_t - sigma_t v, sigma_t the sigma of the step just taken (the scheduler's index has moved past it),
        computed in fp32 as the scheduler's step is."""
        return latents.to(torch.float32) - self._sigma(scheduler, scheduler.step_index - 1) * eps

    def x0_from(self, scheduler, step_index: int, t_value: float, sample, model_output):
        return sample.to(torch.float32) - self._sigma(scheduler, step_index) * model_output

    def noise_unit(self, scheduler, t, like):
        """sigma_t: the noise's share of x_t = (1 - sigma) x0 + sigma noise, so --noise-strength 1 adds as much noise
        as the latent already carries at that step. A 0-dim CPU tensor in the latents' dtype (a scalar operand)."""
        return self._sigma(scheduler, self._index_now(scheduler)).to(like.dtype)

    def add_noise(self, scheduler, clean, noise, timestep):
        """The img2img pipelines' prepare_latents: the scheduler's forward process at the first step."""
        return scheduler.scale_noise(clean, timestep, noise)

    # ---------------------------------------------------------------- the VAE
    def encode_picture(self, pixels, generator):
        """The pictures' latents: the VAE's sample (drawn from the generator), then (x - shift) * scale."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.pipe.vae
        latents = retrieve_latents(vae.encode(pixels), generator=generator)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def _decode_grid(self, grid):
        vae = self.pipe.vae
        grid = (grid / vae.config.scaling_factor) + vae.config.shift_factor
        return vae.decode(grid.to(vae.dtype), return_dict=False)[0]


class StableDiffusion3(FlowMatching):
    latent_rgb = SD3_LATENT_RGB

    @property
    def size_multiple(self) -> int:
        """The VAE factor times the transformer's patch size: StableDiffusion3Pipeline.check_inputs' rule."""
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size

    # ---------------------------------------------------------------- conditioning
    def encode(self, prompt: str, negative: str, device) -> Prompts:
        # both halves always (a hook may turn guidance on later); the negative "" when none, as the pipeline's
        cond, uncond, pooled, pooled_uncond = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative or None)
        return Prompts(cond, uncond, {"pooled": pooled, "pooled_uncond": pooled_uncond})

    def set_timesteps(self, scheduler, steps: int, width: int, height: int) -> None:
        """The pipeline's: N steps with the config's shift, or (use_dynamic_shifting) mu from the image's size."""
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            h, w = self.latent_size(width, height)
            patch = self.denoiser.config.patch_size
            config = scheduler.config
            kwargs["mu"] = calculate_shift((h // patch) * (w // patch), config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device="cpu", **kwargs)

    def initial_noise(self, run):
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, self.denoiser.config.in_channels, *self.latent_size(run.width, run.height))
        return randn_tensor(shape, generator=run.generator, device=run.device, dtype=run.dtype)

    def conditioning(self, prompts: Prompts, guided: bool) -> dict:
        """The transformer's conditioning, with guidance [negative, prompt] in one batch; kept on PROMPTS."""
        key = ("conditioning", guided)
        if key not in prompts.extra:
            extra = prompts.extra
            if guided:
                prompts.extra[key] = {"encoder_hidden_states": torch.cat([prompts.uncond, prompts.cond]),
                                      "pooled_projections": torch.cat([extra["pooled_uncond"], extra["pooled"]])}
            else:
                prompts.extra[key] = {"encoder_hidden_states": prompts.cond, "pooled_projections": extra["pooled"]}
        return prompts.extra[key]

    def predict(self, run, latents, t, t_model, prompts: Prompts, guidance: float):
        guided = guidance > 1.0  # the pipeline's do_classifier_free_guidance
        model_input = torch.cat([latents] * 2) if guided else latents
        out = self.denoiser(hidden_states=model_input, timestep=t_model.expand(model_input.shape[0]),
                            **self.conditioning(prompts, guided), joint_attention_kwargs=None, return_dict=False)[0]
        if guided:
            eps_uncond, eps_cond = out.chunk(2)
            return eps_uncond + guidance * (eps_cond - eps_uncond), eps_cond, eps_uncond
        eps = out.clone()  # (a compiled denoiser's CUDA-graph output is overwritten by its next call)
        return eps, eps, None

    def decode(self, latents, width: int, height: int):
        return self._decode_grid(latents)
