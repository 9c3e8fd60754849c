"""The denoising loop: one generator of StepEvents that every front end consumes.

It knows nothing about files, terminals or HTTP. For a plain text prompt it computes
exactly what diffusers' StableDiffusionPipeline computes (same helpers, same order of
random draws), and with an init image exactly what StableDiffusionImg2ImgPipeline does;
the interventions (start at a later step, masked noise injection, a photo as the prompt)
are added around that.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from .clip import embedder_for, image_prompt_embeds
from .errors import BadInput
from .images import fit, open_image
from .masks import mask_from_image, mask_tensor
from .request import GenerationRequest
from .schedulers import make_scheduler
from .tiny import check_prompts


@dataclass
class StepEvent:
    step: int  # 1-based position in the full schedule
    total_steps: int  # length of the full schedule
    first_step: int  # where this run started (later than 1 for img2img / --start-step)
    timestep: int
    latents: torch.Tensor  # x_{t-1}, after the scheduler step
    denoised: torch.Tensor  # the model's estimate of the clean latent x0 at this step
    injected: bool
    seconds: float

    @property
    def progress(self) -> float:
        """Percent of this run's steps done."""
        return 100.0 * (self.step - self.first_step + 1) / (self.total_steps - self.first_step + 1)


def size_of(pipe, req: GenerationRequest) -> tuple[int, int]:
    """(width, height): asked for, or the model's native size."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return req.width or native, req.height or native


def schedule_length(pipe, req: GenerationRequest) -> int:
    scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    scheduler.set_timesteps(req.steps, device="cpu")
    return len(scheduler.timesteps)


def check_against_model(pipe, req: GenerationRequest) -> None:
    """The checks that need the model, raised before any output exists."""
    factor = pipe.vae_scale_factor
    for option, value in zip(("--width", "--height"), size_of(pipe, req)):
        if value % factor:
            raise BadInput(f"{option} {value} is not a multiple of {factor} (this model's VAE factor)")
    total = schedule_length(pipe, req)
    first = req.first_step(total)
    for k in req.inject_steps(total):
        if not first <= k <= total:
            raise BadInput(f"--inject-at-step {k} is outside this run's steps: give a step from {first} to {total}")
    # a toy model's closed vocabulary: a word it never saw is an error, not a silent fall-back to characters
    check_prompts(req, getattr(pipe, "sdstream_notes", {}).get("vocabulary"))
    if req.prompt_image is not None:
        embedder_for(pipe, req.clip_model)  # loads the CLIP; its width must be the UNet's cross-attention width


def denoise(pipe, req: GenerationRequest, *, cancelled=lambda: False) -> Iterator[StepEvent]:
    """Run REQ (already validated) on PIPE, yielding one StepEvent per denoising step.

    The final latents are those of the last event. `cancelled` is polled once per step.
    """
    device, dtype = pipe._execution_device, pipe.unet.dtype
    width, height = size_of(pipe, req)
    generator = torch.Generator("cpu").manual_seed(req.seed)  # CPU noise: a seed reproduces across devices
    scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    guided = req.guidance > 1.0

    with torch.inference_mode():
        # 1. Prompt -> text embeddings; with guidance, [unconditional, conditional] in one batch.
        cond, uncond = pipe.encode_prompt(req.prompt, device, 1, guided, req.negative_prompt or None)
        if req.prompt_image is not None:  # a photo as the prompt: CLIP features (blended with the text) as cond
            cond = image_prompt_embeds(pipe, req, cond)
        embeddings = torch.cat([uncond, cond]) if guided else cond

        # 2. The schedule; img2img and --start-step skip its first part (diffusers' img2img arithmetic).
        # Schedulers get timesteps on the CPU (they index CPU tables with them: a GPU tensor would
        # mean a device->host sync every step); the UNet gets a copy uploaded once, here (a CPU t
        # would be copied with a blocking transfer every step).
        scheduler.set_timesteps(req.steps, device="cpu")
        total = len(scheduler.timesteps)
        first = req.first_step(total)
        timesteps = scheduler.timesteps[first - 1 :]
        if first > 1 and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first - 1)
        # x0, for schedulers that don't return it, reads alpha_t on the host: keep the table there
        # (add_noise below moves some schedulers' own copy to the device, where a read is a sync)
        alphas = scheduler.alphas_cumprod.cpu()

        # 3. Initial latents: pure noise, or the encoded picture noised to the first timestep.
        picture = req.init_image or req.start_image
        if picture is None:
            shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = latents * scheduler.init_noise_sigma
        else:
            image = fit(open_image(picture, "--init-image" if req.init_image else "--start-image"), width, height)
            pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device=device, dtype=dtype)
            clean = retrieve_latents(pipe.vae.encode(pixels), generator=generator) * pipe.vae.config.scaling_factor
            noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=dtype)
            latents = scheduler.add_noise(clean, noise, timesteps[:1])

        # 4. Noise injection: where, when, and its own random stream so the rest of the run is unchanged.
        inject_at = set(req.inject_steps(total))
        mask = _mask(req, latents, device) if inject_at else None
        step_kwargs = _step_kwargs(scheduler, generator)

    # 5. The loop.
    on_device = timesteps.to(device)
    for step, t, t_unet, t_value in zip(range(first, total + 1), timesteps, on_device, timesteps.tolist()):
        if cancelled():
            raise KeyboardInterrupt
        started = time.perf_counter()
        with torch.inference_mode():
            if step in inject_at:
                latents = _inject(latents, mask, req, step, scheduler, t)

            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = pipe.unet(model_input, t_unet, encoder_hidden_states=embeddings, return_dict=False)[0]
            if guided:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + req.guidance * (noise_text - noise_uncond)
            else:  # with --compile on CUDA it is CUDA-graph memory that the next call overwrites; PNDM keeps it
                noise_pred = noise_pred.clone()

            out = scheduler.step(noise_pred, t, latents, **step_kwargs)
            denoised = getattr(out, "pred_original_sample", None)
            if denoised is None:  # DPM++, UniPC and PNDM don't return x0: compute it
                alpha = float(alphas[int(round(t_value))])
                denoised = _x0(latents, noise_pred, alpha, scheduler.config.prediction_type)
            # Euler-type schedulers compute in fp32; keep the run in the model's dtype
            latents, denoised = out.prev_sample.to(dtype), denoised.to(dtype)
        yield StepEvent(step, total, first, int(t_value), latents, denoised, step in inject_at,
                        time.perf_counter() - started)


def _step_kwargs(scheduler, generator) -> dict:
    """What diffusers' prepare_extra_step_kwargs passes, for our scheduler (not the pipeline's): eta=0, generator."""
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in accepted}


def _mask(req: GenerationRequest, latents: torch.Tensor, device) -> torch.Tensor:
    h, w = latents.shape[-2:]
    if req.mask_is_pattern:
        return mask_tensor(req.mask, h, w, device=device, dtype=latents.dtype)
    return mask_from_image(open_image(req.mask, "--mask"), h, w, device=device, dtype=latents.dtype)


def _inject(latents, mask, req: GenerationRequest, step: int, scheduler, t) -> torch.Tensor:
    """Add Gaussian noise where MASK is set, scaled to the latent's own noise level at t.

    The unit is the latent's expected standard deviation: 1 for DDIM-like schedulers and
    sqrt(sigma^2 + 1) for Euler-like ones, i.e. exactly what scale_model_input divides by.
    So --noise-strength 1 adds as much noise as the latent already carries at that level.
    """
    gen = torch.Generator("cpu").manual_seed((req.seed * 1_000_003 + step) % 2**63)
    noise = randn_tensor(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
    one = torch.ones((1, 1, 1, 1), device=latents.device, dtype=latents.dtype)
    unit = one / scheduler.scale_model_input(one, t)
    return latents + req.noise_strength * unit * mask * noise


def _x0(latents, model_output, alpha: float, prediction_type: str) -> torch.Tensor:
    """The clean-latent estimate x0 on a variance-preserving latent, from the model's prediction.

    alpha (alpha-bar at this step) is a Python number: a tensor would be uploaded, a blocking copy, every step.
    """
    if prediction_type == "v_prediction":
        return alpha**0.5 * latents - (1 - alpha) ** 0.5 * model_output
    return (latents - (1 - alpha) ** 0.5 * model_output) / alpha**0.5
