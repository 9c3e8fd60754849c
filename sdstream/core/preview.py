"""Latents -> pictures. The final image always goes through the full VAE; frames go through a
preview decoder chosen with --preview, from the latent or the model's clean estimate (--frame-source).

Preview decoders return a small uint8 (H, W, 3) tensor on the model's device; the FrameWriter copies
it to the host and encodes it off the loop's thread.
"""

from __future__ import annotations

import warnings

import torch

from .families import family_of


def vae_decode(pipe, latents: torch.Tensor, recoveries: list | None = None, size: tuple[int, int] | None = None):
    """Decode latents with the model's VAE into a PIL image, exactly as the family's diffusers pipeline does.

    Two failures have a safe fix, applied here and noted in RECOVERIES: out of memory (retry
    with the VAE tiled) and NaN/inf output (an fp16 VAE overflowing, which diffusers would
    turn into a black image: retry in fp32). Anything else is an error, never a black picture.
    """
    from ..errors import SdstreamError

    notes = recoveries if recoveries is not None else []
    vae, family = pipe.vae, family_of(pipe)
    width, height = size or (None, None)
    with torch.inference_mode():
        try:
            image = family.decode(latents, width, height)
        except torch.OutOfMemoryError:
            free_memory()
            tiled_before = getattr(vae, "use_tiling", False)
            vae.enable_tiling()
            notes.append("vae_tiled_retry")
            try:
                image = family.decode(latents, width, height)
            finally:
                if not tiled_before:
                    vae.disable_tiling()
        if not torch.isfinite(image).all() and vae.dtype != torch.float32:
            notes.append("vae_fp32_retry")
            dtype = vae.dtype
            vae.to(torch.float32)
            try:
                image = family.decode(latents.float(), width, height)
            finally:
                vae.to(dtype)
        if not torch.isfinite(image).all():
            raise SdstreamError("the VAE decoded NaN/inf values; the run's latents are not usable")
        return pipe.image_processor.postprocess(image, output_type="pil")[0]


def free_memory() -> None:
    """Give cached GPU memory back (after an out-of-memory error, or between batch runs)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Previewer:
    """Turns a StepEvent into a uint8 (H, W, 3) picture tensor, still on the device."""

    def __init__(self, pipe, mode: str, source: str, taesd: str | None = None, size: tuple[int, int] = (0, 0)):
        self.pipe, self.mode, self.source, self.size = pipe, mode, source, size
        self.family = family = family_of(pipe)
        device = pipe._execution_device  # with --cpu-offload, pipe.device says cpu
        # a model folder's own factors (sdstream.json), else its family's published ones
        factors = getattr(pipe, "sdstream_notes", {}).get("latent_rgb", family.latent_rgb)
        self.rgb = torch.tensor(factors["weights"], device=device, dtype=family.dtype)
        self.bias = torch.tensor(factors["bias"], device=device, dtype=family.dtype)
        self.taesd = load_taesd(taesd or family.default_taesd, device, pipe.vae.dtype) if mode == "taesd" else None

    def __call__(self, event) -> torch.Tensor:
        """The picture of a StepEvent: of its x0, its latents, or what one half of guidance predicts."""
        if self.source == "x0":
            latents = event.denoised
        elif self.source == "latent":
            latents = event.latents
        else:
            eps = event.eps_cond if self.source == "x0-cond" else event.eps_uncond
            latents = event.x0_of(eps).to(event.denoised.dtype)
        return self.decode(latents)

    def decode(self, latents) -> torch.Tensor:
        """LATENTS (as the denoiser sees them) as a uint8 (H, W, 3) picture, on the device."""
        width, height = self.size
        with torch.inference_mode():
            if self.mode == "approx":
                grid = self.family.unpack(latents, width, height)
                image = torch.einsum("bchw,cr->bhwr", grid, self.rgb)[0] + self.bias
            else:
                if self.mode == "vae":
                    image = self.family.decode(latents, width, height)
                else:  # TAESD works on the latents as the denoiser sees them
                    image = self.taesd.decode(self.family.unpack(latents, width, height), return_dict=False)[0]
                image = image[0].permute(1, 2, 0)
            return ((image.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


_TAESD: dict = {}


def load_taesd(where: str, device, dtype):
    """AutoencoderTiny from a hub id or a local folder, cached; a clear error when it can't be had."""
    from diffusers import AutoencoderTiny

    from ..errors import SdstreamError

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
