"""Latents -> pictures. The final image always goes through the full VAE; frames go through a
preview decoder chosen with --preview, from the latent or the model's clean estimate (--frame-source).

Preview decoders return a small uint8 (H, W, 3) tensor on the model's device; the FrameWriter copies
it to the host and encodes it off the loop's thread.
"""

from __future__ import annotations

import warnings

import torch

DEFAULT_TAESD = "madebyollin/taesd"

# Linear map from SD 1.x latent channels (as the UNet sees them) to RGB in [-1, 1]: the factors
# A1111's "Approx cheap" and ComfyUI's SD15 latent preview use. About free: one 4x3 matmul per pixel
# of the 1/8-size latent; the writer thread scales the picture up to the output size.
SD1_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def vae_decode(pipe, latents: torch.Tensor):
    """Decode latents with the model's VAE into a PIL image, exactly as diffusers' pipelines do."""
    with torch.inference_mode():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]


class Previewer:
    """Turns a StepEvent into a uint8 (H, W, 3) picture tensor, still on the device."""

    def __init__(self, pipe, mode: str, source: str, taesd: str | None = None):
        self.pipe, self.mode, self.source = pipe, mode, source
        self.rgb = torch.tensor(SD1_LATENT_RGB, device=pipe.device, dtype=pipe.unet.dtype)
        self.taesd = load_taesd(taesd or DEFAULT_TAESD, pipe.device, pipe.vae.dtype) if mode == "taesd" else None

    def __call__(self, event) -> torch.Tensor:
        latents = event.denoised if self.source == "x0" else event.latents
        with torch.inference_mode():
            if self.mode == "approx":
                image = torch.einsum("bchw,cr->bhwr", latents, self.rgb)[0]
            else:
                if self.mode == "vae":
                    image = self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor, return_dict=False)[0]
                else:  # TAESD works on the latents as the UNet sees them
                    image = self.taesd.decode(latents, return_dict=False)[0]
                image = image[0].permute(1, 2, 0)
            return ((image.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


_TAESD: dict = {}


def load_taesd(where: str, device, dtype):
    """AutoencoderTiny from a hub id or a local folder, cached; a clear error when it can't be had."""
    from diffusers import AutoencoderTiny

    from .errors import SdstreamError

    key = (where, str(device), str(dtype))
    if key not in _TAESD:
        try:
            with warnings.catch_warnings():  # huggingface_hub deprecation chatter on a failed lookup
                warnings.simplefilter("ignore")
                _TAESD[key] = AutoencoderTiny.from_pretrained(where, dtype=dtype).to(device)
        except Exception as e:
            raise SdstreamError(
                f"--taesd {where!r} could not be loaded ({type(e).__name__})",
                hint="download it once with network access, pass a local folder, or use --preview approx",
            ) from None
    return _TAESD[key]
