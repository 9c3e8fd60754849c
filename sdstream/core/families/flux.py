"""FLUX.1 (FluxPipeline, FluxImg2ImgPipeline): a transformer on 16-channel VAE latents packed 2x2 into a sequence of
64-channel tokens, flow matching as SD3's (sd3.FlowMatching: x0 = x_t - sigma_t v, the noise unit sigma_t, a
picture noised with scale_noise, latents (x - shift) * scale), with what FLUX does its own way:

- the latents are packed: [1, 16, h, w] -> [1, h/2 * w/2, 64] (the pipeline's _pack_latents); the noise is drawn on
  the grid and packed, a mask is packed the same way (pack), previews and the VAE see the grid again (unpack);
  the transformer gets each token's position (latent_image_ids) and the text's (txt_ids, zeros);
- the schedule: sigmas linspace(1, 1/N, N), shifted by mu from the image's token count (calculate_shift) where the
  scheduler config says use_dynamic_shifting ([dev]), by the config's fixed shift otherwise ([schnell]);
- conditioning: CLIP's pooled output and T5's hidden states (max 512 tokens), one prompt, no negative half;
- guidance: FLUX.1 [dev] is guidance-distilled, --guidance is the value its transformer embeds (guidance_embeds),
  one model call per step; a transformer without guidance embeddings ([schnell]) takes none, and --guidance is
  ignored as FluxPipeline ignores guidance_scale. FluxPipeline's true classifier-free guidance (true_cfg_scale with
  a negative prompt, two calls per step) is not offered: --negative-prompt is refused for FLUX (Traits.negative_prompt).

Everything here is what diffusers' FluxPipeline and FluxImg2ImgPipeline compute, in their order of random draws.
"""

from __future__ import annotations

import torch

from .base import Prompts
from .sd3 import FlowMatching

# For --preview approx: FLUX's 16 latent channels (the unpacked grid) -> RGB in [-1, 1], ComfyUI's published factors
# (comfy/latent_formats.py, class Flux: latent_rgb_factors and latent_rgb_factors_bias; as of commit 040a324),
# applied to the latents as the model sees them ((x - shift) * scale), as ComfyUI does.
FLUX_LATENT_RGB = {"weights": (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
), "bias": (-0.0329, -0.0718, -0.0851)}

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default for T5


class Flux(FlowMatching):
    latent_rgb = FLUX_LATENT_RGB

    def __init__(self, pipe, traits):
        super().__init__(pipe, traits)
        self._image_ids: dict = {}  # (h, w, device, dtype) -> latent_image_ids, made once per size

    @property
    def latent_channels(self) -> int:
        """Channels of the latent grid (the VAE's), before packing: the transformer's in_channels / 4."""
        return self.denoiser.config.in_channels // 4

    def native_size(self) -> tuple[int, int]:
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor  # FluxPipeline's default: 128 x 8
        return side, side

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    # ---------------------------------------------------------------- packing
    def pack(self, grid):
        _, channels, h, w = grid.shape
        return self.pipe._pack_latents(grid.contiguous(), grid.shape[0], channels, h, w)

    def unpack(self, latents, width: int, height: int):
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

    # ---------------------------------------------------------------- conditioning
    def encode(self, prompt: str, negative: str, device) -> Prompts:
        if negative:  # refused before anything loads (registry.check_family); here too, never silently dropped
            from ...errors import BadInput

            raise BadInput("--negative-prompt: FLUX models have no negative prompt (their guidance is embedded)")
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                           num_images_per_prompt=1,
                                                           max_sequence_length=MAX_SEQUENCE_LENGTH)
        return Prompts(embeds, None, {"pooled": pooled, "text_ids": text_ids})

    def set_timesteps(self, scheduler, steps: int, width: int, height: int) -> None:
        """FluxPipeline's: sigmas linspace(1, 1/N, N) (none where the config says use_flow_sigmas) and mu from the
        packed latents' token count, given to set_timesteps as retrieve_timesteps gives them."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        h, w = self.latent_size(width, height)
        config = scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(steps, device="cpu", mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)

    def initial_noise(self, run):
        """FluxPipeline.prepare_latents: noise on the [1, 16, h, w] grid, packed."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, self.latent_channels, *self.latent_size(run.width, run.height))
        return self.pack(randn_tensor(shape, generator=run.generator, device=run.device, dtype=run.dtype))

    def image_ids(self, width: int, height: int, like) -> torch.Tensor:
        """Each packed token's (0, row, column), as FluxPipeline makes them; made and uploaded once per size."""
        h, w = self.latent_size(width, height)
        key = (h, w, str(like.device), like.dtype)
        if key not in self._image_ids:
            self._image_ids[key] = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, like.device, like.dtype)
        return self._image_ids[key]

    def _guidance(self, prompts: Prompts, guidance: float, like) -> torch.Tensor | None:
        """The embedded guidance, [dev]'s (None for a transformer without guidance embeddings); kept on PROMPTS."""
        if not self.embeds_guidance:
            return None
        key = ("guidance", guidance)
        if key not in prompts.extra:
            prompts.extra[key] = torch.full([1], guidance, device=like.device, dtype=torch.float32).expand(
                like.shape[0])
        return prompts.extra[key]

    def predict(self, run, latents, t, t_model, prompts: Prompts, guidance: float):
        timestep = t_model.expand(latents.shape[0]).to(latents.dtype)
        out = self.denoiser(hidden_states=latents, timestep=timestep / 1000,
                            guidance=self._guidance(prompts, guidance, latents),
                            pooled_projections=prompts.extra["pooled"], encoder_hidden_states=prompts.cond,
                            txt_ids=prompts.extra["text_ids"],
                            img_ids=self.image_ids(run.width, run.height, prompts.cond),
                            joint_attention_kwargs={}, return_dict=False)[0]
        eps = out.clone()  # (a compiled denoiser's CUDA-graph output is overwritten by its next call)
        return eps, eps, None

    # ---------------------------------------------------------------- pictures
    def add_noise(self, scheduler, clean, noise, timestep):
        """FluxImg2ImgPipeline.prepare_latents: the grid noised with scale_noise, then packed."""
        return self.pack(scheduler.scale_noise(clean, timestep, noise))

    def decode(self, latents, width: int, height: int):
        return self._decode_grid(self.unpack(latents, width, height))
