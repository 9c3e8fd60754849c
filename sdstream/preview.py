"""Latents -> pictures. The final image always goes through the full VAE; frames use a
preview decoder (today the full VAE; cheaper decoders plug in here)."""

from __future__ import annotations

import torch


def vae_decode(pipe, latents: torch.Tensor):
    """Decode latents with the model's VAE into a PIL image, exactly as diffusers' pipelines do."""
    with torch.inference_mode():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]


def frame_image(pipe, event):
    """The picture recorded for one step: the current latent through the VAE."""
    return vae_decode(pipe, event.latents)
