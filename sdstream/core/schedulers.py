"""--scheduler names -> diffusers schedulers built from the model's own scheduler config.

The table is pure data (the request checks step numbers against it before torch is imported); the
scheduler objects come from make_scheduler, and the clean-image estimate x0 of a step from x0().
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scheduler:
    cls: str  # diffusers class
    overrides: dict = field(default_factory=dict)  # on top of the model's scheduler config
    label: str = ""  # the name in A1111's "Sampler:" vocabulary
    order: int = 1  # diffusers' scheduler.order: img2img starts at t_start * order
    extra_steps: int = 0  # schedule length is steps + this (PNDM's PLMS repeats its second timestep)
    flow: bool = False  # a flow-matching scheduler (SD3, FLUX), not a DDPM-type one


SCHEDULERS: dict[str, Scheduler] = {
    "ddim": Scheduler("DDIMScheduler", label="DDIM"),
    "euler": Scheduler("EulerDiscreteScheduler", label="Euler"),
    "euler-a": Scheduler("EulerAncestralDiscreteScheduler", label="Euler a"),
    "dpm++-2m": Scheduler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
                          "DPM++ 2M"),
    "dpm++-2m-karras": Scheduler(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras"),
    "pndm": Scheduler("PNDMScheduler", {"skip_prk_steps": True}, "PLMS", extra_steps=1),
    "lms": Scheduler("LMSDiscreteScheduler", label="LMS"),
    "unipc": Scheduler("UniPCMultistepScheduler", label="UniPC"),
    "flow-euler": Scheduler("FlowMatchEulerDiscreteScheduler", label="Euler (flow matching)", flow=True),
}
_ALIASES = {
    "euler-ancestral": "euler-a",
    "dpm++2m": "dpm++-2m",
    "dpm++2m-karras": "dpm++-2m-karras",
    "dpm-solver++": "dpm++-2m",
    "plms": "pndm",
}


def canonical_scheduler(name: str) -> str | None:
    """A --scheduler name or alias as its name ("auto": the model family's own, decided when the model is known)."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower()).replace("dpmpp", "dpm++")
    key = _ALIASES.get(key, key)
    return key if key in SCHEDULERS or key == "auto" else None


def schedule_length(name: str, steps: int) -> int:
    """How many timesteps NAME's schedule has for STEPS inference steps (every family's default has STEPS)."""
    return steps + (SCHEDULERS[name].extra_steps if name in SCHEDULERS else 0)


def order(name: str) -> int:
    return SCHEDULERS[name].order if name in SCHEDULERS else 1


def img2img_skip(name: str, steps: int, strength: float) -> int:
    """t_start of diffusers' img2img get_timesteps: how many of STEPS a run at STRENGTH skips (times the order).

    SD's and SDXL's pipelines denoise int(steps * strength) steps; SD3's and FLUX's (flow matching) skip
    int(steps - steps * strength), in floats. The two differ where steps * strength is not whole (4 steps at 0.7:
    2 skipped against 1) and where rounding puts it a hair under a whole number (100 steps at 0.29: 71 against 72).
    For "auto", not decided until the model is known, the fewer of the two, so that no check made before then
    refuses a step the model's own arithmetic allows (the request is checked again once it is decided).
    """
    sd = steps - min(int(steps * strength), steps)
    flow = int(max(steps - min(steps * strength, steps), 0))
    if name not in SCHEDULERS:
        return min(sd, flow)
    return flow if SCHEDULERS[name].flow else sd


def make_scheduler(name: str, config):
    """A fresh scheduler (they are stateful) of kind NAME from a model's scheduler config."""
    import diffusers

    spec = SCHEDULERS[name]
    scheduler = getattr(diffusers, spec.cls).from_config(config, **spec.overrides)
    assert scheduler.order == spec.order, (name, scheduler.order)
    return scheduler


def x0(scheduler, out, latents, model_output, alpha: float):
    """The model's estimate of the clean latent at this step, as the scheduler itself computed it.

    DDIM, Euler, Euler a and LMS return it (pred_original_sample); DPM-Solver++ and UniPC keep it as the
    converted model output of the step just taken (model_outputs[-1]), computed from their own sigmas (Karras
    sigmas are off the integer timestep grid) and prediction type. Only PNDM works on x_t alone: there it is
    the definition, with ALPHA (alpha-bar at the step's integer timestep, a Python number, so that nothing is
    uploaded every step) and the config's prediction type.
    """
    found = getattr(out, "pred_original_sample", None)
    if found is not None:
        return found
    if _keeps_x0(scheduler):
        return scheduler.model_outputs[-1]
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return model_output
    if kind == "v_prediction":
        return alpha**0.5 * latents - (1 - alpha) ** 0.5 * model_output
    return (latents - (1 - alpha) ** 0.5 * model_output) / alpha**0.5


def _keeps_x0(scheduler) -> bool:
    config = scheduler.config
    if "algorithm_type" in config:  # DPM-Solver: the ++ variants solve in x0
        return config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
    return bool(getattr(scheduler, "predict_x0", False))  # UniPC


def x0_from(scheduler, index: int, alpha: float, sample, model_output):
    """x0 by its definition, for a model output the scheduler did not step with (one half of guidance): from the
    scheduler's own sigma at schedule index INDEX, or alpha-bar ALPHA for DDIM and PNDM, which work on x_t."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return model_output
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or type(scheduler).__name__ in ("DDIMScheduler", "PNDMScheduler"):
        if kind == "v_prediction":
            return alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
        return (sample - (1 - alpha) ** 0.5 * model_output) / alpha**0.5
    sigma = float(sigmas[index])
    if "algorithm_type" in scheduler.config or hasattr(scheduler, "predict_x0"):  # DPM-Solver, UniPC: on x_t
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        sigma_t = sigma * alpha_t
        if kind == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return (sample - sigma_t * model_output) / alpha_t
    if kind == "v_prediction":  # Euler, Euler a, LMS: on x_t / alpha_t
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return sample - sigma * model_output
