"""--scheduler names -> diffusers schedulers built from the model's own scheduler config."""

from __future__ import annotations

# name -> (diffusers class, config overrides, label in A1111's "Sampler:" vocabulary)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "dpm++-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}


def make_scheduler(name: str, config):
    """A fresh scheduler (they are stateful) of kind NAME from a model's scheduler config."""
    import diffusers

    cls_name, overrides, _ = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **overrides)
