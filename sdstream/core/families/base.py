"""The interface every model family implements (the way ComfyUI's `model_sampling` serves its families): for a
loaded pipeline, what its diffusers pipeline does at each phase of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Linear maps from a family's latent channels (as its denoiser sees them) to RGB in [-1, 1], for --preview approx.
SD1_LATENT_RGB = {"weights": ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                              (-0.2120, -0.2616, -0.7177)), "bias": (0, 0, 0)}  # A1111's "Approx cheap", ComfyUI SD15


@dataclass
class Prompts:
    """A run's conditioning: the prompt's half and the negative prompt's, with what else the family needs
    (SDXL's pooled embeddings and time ids, FLUX's text ids)."""

    cond: object
    uncond: object
    extra: dict = field(default_factory=dict)


class Family:
    """A loaded pipeline of one family, as the loop drives it. TRAITS (the family's Traits) say what it is."""

    latent_rgb = SD1_LATENT_RGB

    def __init__(self, pipe, traits):
        self.pipe, self.traits = pipe, traits

    @property
    def name(self) -> str:
        return self.traits.name

    @property
    def flow(self) -> bool:
        return self.traits.flow

    @property
    def default_taesd(self) -> str:
        return self.traits.default_taesd

    # ---------------------------------------------------------------- what it is
    @property
    def denoiser(self):
        return self.pipe.unet

    @property
    def dtype(self):
        return self.denoiser.dtype

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this."""
        return self.pipe.vae_scale_factor * self.traits.size_factor

    def native_size(self) -> tuple[int, int]:
        side = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the latent grid (before any packing)."""
        return height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor

    # ---------------------------------------------------------------- the phases of a run
    def encode(self, prompt: str, negative: str, device) -> Prompts:
        raise NotImplementedError

    def set_timesteps(self, scheduler, steps: int, width: int, height: int) -> None:
        scheduler.set_timesteps(steps, device="cpu")

    def initial_noise(self, run):
        raise NotImplementedError

    def predict(self, run, latents, t, t_model, prompts: Prompts, guidance: float):
        """(eps, eps_cond, eps_uncond): the model output the scheduler steps with, and its halves."""
        raise NotImplementedError

    def x0(self, scheduler, out, latents, eps, t_value: float):
        """The clean-image estimate of the step just taken (OUT: the scheduler's output for LATENTS at the timestep
        T_VALUE, a Python number; EPS: the model output it stepped with), as the scheduler computed it."""
        raise NotImplementedError

    def x0_from(self, scheduler, step_index: int, t_value: float, sample, model_output):
        """x0 for a model output the scheduler did not step with (one half of guidance), at 0-based STEP_INDEX."""
        raise NotImplementedError

    def noise_unit(self, scheduler, t, like):
        """The latent's own noise level at t: what --noise-strength 1 adds (a tensor broadcastable to LIKE)."""
        raise NotImplementedError

    def encode_picture(self, pixels, generator):
        """A picture (preprocessed, [-1, 1]) as the clean latents the denoiser works on."""
        raise NotImplementedError

    def add_noise(self, scheduler, clean, noise, timestep):
        raise NotImplementedError

    def pack(self, grid):
        """A [1, C, h, w] tensor on the latent grid (a mask) laid out as the latents are."""
        return grid

    def unpack(self, latents, width: int, height: int):
        """Latents as a [1, C, h, w] grid (for previews and the VAE)."""
        return latents

    def decode(self, latents, width: int, height: int):
        """The VAE's picture of LATENTS, [1, 3, H, W] in [-1, 1]."""
        raise NotImplementedError
