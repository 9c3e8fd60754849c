"""The denoising loop: one generator of StepEvents that every front end consumes, through the orchestrator.

It takes a pipeline, a validated request and hooks; it opens no file, loads nothing and knows no model's
vocabulary. What differs between model families (SD, SDXL, SD3, FLUX: the conditioning, the denoiser call and
guidance, x0, how a picture becomes latents) is the family's (core/families/); the loop is the same for all.
For a text prompt it computes exactly what the family's diffusers pipeline computes (same helpers, same order of
random draws), and with a starting picture exactly what its img2img pipeline does. Interventions are hooks
(core/hooks.py), called at three points:
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

from .schedulers import make_scheduler
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
    """What the loop works on. Hooks read it and may change prompts, guidance, first, latents and injected."""

    pipe: object
    family: object  # families.Family: what the pipeline's family does at each phase
    req: object  # the validated GenerationRequest
    width: int
    height: int
    scheduler: object
    generator: torch.Generator
    device: torch.device
    dtype: torch.dtype
    guidance: float = 7.5
    prompts: object = None  # families.Prompts: the conditioning, both halves
    timesteps: torch.Tensor | None = None  # the full schedule, on the CPU
    first: int = 1  # 1-based schedule index of the first step denoised
    latents: torch.Tensor | None = None
    injected: bool = False  # set by a hook that changed the latents before this step
    injected_rms: torch.Tensor | None = None

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.family.latent_size(self.width, self.height)


class Hook:
    """An intervention in the loop; each method may change the Run. The defaults do nothing."""

    def on_prompt(self, run: Run) -> None: ...

    def on_start(self, run: Run) -> None: ...

    def before_step(self, run: Run, step: int, t: torch.Tensor) -> None: ...


def denoise(pipe, req, width: int, height: int, hooks: Sequence[Hook] = ()) -> Iterator[StepEvent]:
    """Run REQ (validated) on PIPE at WIDTH x HEIGHT, yielding one StepEvent per denoising step.

    The final latents are those of the last event.
    """
    from .families import family_of

    family = family_of(pipe)
    device, dtype = pipe._execution_device, family.dtype
    scheduler = make_scheduler(family.traits.scheduler(req.scheduler), pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(req.seed)  # CPU noise: the same pictures on every device
    run = Run(pipe, family, req, width, height, scheduler, generator, device, dtype, req.guidance)

    with torch.inference_mode():
        # 1. Prompt -> conditioning, both halves (a hook may turn guidance on); hooks may replace them.
        run.prompts = family.encode(req.prompt, req.negative_prompt, device)
        for hook in hooks:
            hook.on_prompt(run)

        # 2. The schedule. Schedulers get timesteps on the CPU (they index CPU tables with them: a GPU tensor
        # would mean a device->host sync every step); the denoiser gets a copy uploaded once, below.
        family.set_timesteps(scheduler, req.steps, width, height)
        run.timesteps, total = scheduler.timesteps, len(scheduler.timesteps)

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
            run.latents = family.initial_noise(run)
        step_kwargs = _step_kwargs(scheduler, run.generator, req.eta or 0.0)

    # 4. The loop.
    timesteps = run.timesteps[run.first - 1 :]
    on_device = timesteps.to(device)
    for step, t, t_model, t_value in zip(range(run.first, total + 1), timesteps, on_device, timesteps.tolist()):
        started = time.perf_counter()
        with torch.inference_mode():
            run.injected, run.injected_rms = False, None
            for hook in hooks:
                hook.before_step(run, step, t)
            latents = run.latents
            eps, eps_cond, eps_uncond = family.predict(run, latents, t, t_model, run.prompts, run.guidance)
            out = scheduler.step(eps, t, latents, **step_kwargs)
            denoised = family.x0(scheduler, out, latents, eps, t_value)
            # Euler-type schedulers compute in fp32; keep the run in the model's dtype
            run.latents, denoised = out.prev_sample.to(dtype), denoised.to(dtype)
        yield StepEvent(step, total, run.first, int(round(t_value)), run.latents, denoised, eps, eps_cond,
                        eps_uncond, run.injected, run.injected_rms, time.perf_counter() - started, latents,
                        partial(family.x0_from, scheduler, step - 1, t_value, latents), partial(capture, run, step))


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    """What diffusers' prepare_extra_step_kwargs passes, for our scheduler (not the pipeline's): eta, generator."""
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
