"""The denoising loop: one generator of StepEvents that every front end consumes, through the orchestrator.

It takes a pipeline, a validated request and hooks; it opens no file, loads nothing and knows no model's
vocabulary. For a plain text prompt it computes exactly what diffusers' StableDiffusionPipeline computes
(same helpers, same order of random draws), and with a starting picture exactly what
StableDiffusionImg2ImgPipeline does. Interventions are hooks (core/hooks.py), called at three points:
on_prompt (the embeddings are made), on_start (the schedule is set and the first step chosen; a hook may
give the initial latents or a saved state) and before_step (a hook may change the latents, e.g. inject noise,
or the prompt and the guidance, e.g. from a step on).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from diffusers.utils.torch_utils import randn_tensor

from .schedulers import make_scheduler, x0, x0_from
from .state import capture


@dataclass
class StepEvent:
    step: int  # 1-based position in the full schedule
    total_steps: int  # length of the full schedule
    first_step: int  # where this run started (later than 1 for img2img / --start-step / a branch)
    timestep: int
    latents: torch.Tensor  # x_{t-1}, after the scheduler step
    denoised: torch.Tensor  # the model's estimate of the clean latent x0 at this step
    eps: torch.Tensor  # the guided model output the scheduler stepped with
    eps_cond: torch.Tensor  # the conditional half (eps itself without guidance)
    eps_uncond: torch.Tensor | None  # the unconditional half (None without guidance)
    injected: bool
    injected_rms: torch.Tensor | None  # the root mean square of the noise injected before this step
    seconds: float
    sample: torch.Tensor  # the latents the step started from (x_t)
    x0_of: object  # x0_of(eps): the clean estimate another model output (one half of guidance) would give
    state: object  # state(): what to continue from after this step (core/state.capture), taken now

    @property
    def progress(self) -> float:
        """Percent of this run's steps done."""
        return 100.0 * (self.step - self.first_step + 1) / (self.total_steps - self.first_step + 1)


@dataclass
class Run:
    """What the loop works on. Hooks read it and may change cond, uncond, guidance, first, latents, injected."""

    pipe: object
    req: object  # the validated GenerationRequest
    width: int
    height: int
    scheduler: object
    generator: torch.Generator
    device: torch.device
    dtype: torch.dtype
    guidance: float = 7.5
    cond: torch.Tensor | None = None  # conditional prompt embeddings [1, L, D]
    uncond: torch.Tensor | None = None  # unconditional (negative prompt) embeddings
    timesteps: torch.Tensor | None = None  # the full schedule, on the CPU
    first: int = 1  # 1-based schedule index of the first step denoised
    latents: torch.Tensor | None = None
    injected: bool = False  # set by a hook that changed the latents before this step
    injected_rms: torch.Tensor | None = None

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.pipe.vae_scale_factor, self.width // self.pipe.vae_scale_factor


class Hook:
    """An intervention in the loop; each method may change the Run. The defaults do nothing."""

    def on_prompt(self, run: Run) -> None: ...

    def on_start(self, run: Run) -> None: ...

    def before_step(self, run: Run, step: int, t: torch.Tensor) -> None: ...


def denoise(pipe, req, width: int, height: int, hooks: Sequence[Hook] = ()) -> Iterator[StepEvent]:
    """Run REQ (validated) on PIPE at WIDTH x HEIGHT, yielding one StepEvent per denoising step.

    The final latents are those of the last event.
    """
    device, dtype = pipe._execution_device, pipe.unet.dtype
    run = Run(pipe, req, width, height, make_scheduler(req.scheduler, pipe.scheduler.config),
              torch.Generator("cpu").manual_seed(req.seed), device, dtype, req.guidance)  # CPU noise: reproducible
    scheduler = run.scheduler

    with torch.inference_mode():
        # 1. Prompt -> embeddings, both halves (a hook may turn guidance on); hooks may replace them.
        run.cond, run.uncond = pipe.encode_prompt(req.prompt, device, 1, True, req.negative_prompt or None)
        for hook in hooks:
            hook.on_prompt(run)

        # 2. The schedule. Schedulers get timesteps on the CPU (they index CPU tables with them: a GPU tensor
        # would mean a device->host sync every step); the UNet gets a copy uploaded once, below.
        scheduler.set_timesteps(req.steps, device="cpu")
        run.timesteps, total = scheduler.timesteps, len(scheduler.timesteps)
        # x0 for PNDM reads alpha_t on the host: keep the table there (add_noise moves some schedulers' own copy
        # to the device, where a read is a sync)
        alphas = scheduler.alphas_cumprod.cpu()

        # 3. Where the run starts, then the initial latents: a hook's (a picture noised to the first step, a saved
        # state), or pure noise. The begin index is always set (as diffusers' img2img does): a scheduler left to
        # find its place by the timestep's value takes a repeated first timestep (Karras sigmas, zero terminal SNR:
        # 999, 999, ...) for the second, and runs off its schedule.
        run.first = req.first_step
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(run.first - 1)
        for hook in hooks:
            hook.on_start(run)
        if run.latents is None:
            shape = (1, pipe.unet.config.in_channels, *run.latent_size)
            run.latents = randn_tensor(shape, generator=run.generator, device=device, dtype=dtype)
            run.latents = run.latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, run.generator, req.eta or 0.0)

    # 4. The loop.
    timesteps, prompts = run.timesteps[run.first - 1 :], None
    on_device = timesteps.to(device)
    for step, t, t_unet, t_value in zip(range(run.first, total + 1), timesteps, on_device, timesteps.tolist()):
        started = time.perf_counter()
        with torch.inference_mode():
            run.injected, run.injected_rms = False, None
            for hook in hooks:
                hook.before_step(run, step, t)
            guided, latents = run.guidance > 1.0, run.latents
            if prompts is None or prompts[0] is not run.cond or prompts[1] is not run.uncond or prompts[2] != guided:
                prompts = (run.cond, run.uncond, guided, torch.cat([run.uncond, run.cond]) if guided else run.cond)
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            noise_pred = pipe.unet(model_input, t_unet, encoder_hidden_states=prompts[3], return_dict=False)[0]
            if guided:
                eps_uncond, eps_cond = noise_pred.chunk(2)
                eps = eps_uncond + run.guidance * (eps_cond - eps_uncond)
            else:  # with --compile on CUDA it is CUDA-graph memory that the next call overwrites; PNDM keeps it
                eps_uncond, eps = None, noise_pred.clone()
                eps_cond = eps
            alpha = float(alphas[int(round(t_value))])
            out = scheduler.step(eps, t, latents, **step_kwargs)
            denoised = x0(scheduler, out, latents, eps, alpha)
            # Euler-type schedulers compute in fp32; keep the run in the model's dtype
            run.latents, denoised = out.prev_sample.to(dtype), denoised.to(dtype)
        yield StepEvent(step, total, run.first, int(t_value), run.latents, denoised, eps, eps_cond, eps_uncond,
                        run.injected, run.injected_rms, time.perf_counter() - started, latents,
                        partial(x0_from, scheduler, step - 1, alpha, latents), partial(capture, run, step))


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    """What diffusers' prepare_extra_step_kwargs passes, for our scheduler (not the pipeline's): eta, generator."""
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
