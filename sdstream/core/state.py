"""The state a run continues from after a step: the latents (at the run's dtype: lossless), the scheduler's
history and the random stream. With it, `branch` and `resume` run only the steps that are left, bit for bit as
the run itself would have.

A scheduler's history is whatever its step() keeps between calls: DPM-Solver's and UniPC's model outputs, PNDM's
ets, LMS's derivatives, the step index. It is taken generically: every attribute except the tables that
set_timesteps() makes again (alphas, sigmas, timesteps, ...), tensors as tensors and the rest as JSON.
"""

from __future__ import annotations

import json

import torch

# made by the scheduler's constructor or set_timesteps from the config and the step count: not history
TABLES = {"betas", "alphas", "alphas_cumprod", "final_alpha_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas",
          "timesteps", "_timesteps", "prk_timesteps", "plms_timesteps", "log_sigmas", "init_noise_sigma",
          "num_inference_steps", "_internal_dict", "config"}


def capture(run, step: int) -> tuple[dict, dict]:
    """(tensors, meta) of RUN after STEP. The tensors are copies on their own devices: taking them moves nothing
    between host and GPU (the writer copies them off the loop's thread)."""
    tensors = {"latents": run.latents.clone(), "generator": run.generator.get_state()}
    history = {}
    layouts = {name: "channels_last" for name, t in (("latents", run.latents),) if _channels_last(t)}
    for name, value in vars(run.scheduler).items():
        if name in TABLES or callable(value):
            continue
        if isinstance(value, torch.Tensor):
            tensors[f"scheduler.{name}"] = value.clone()
            if _channels_last(value):
                layouts[f"scheduler.{name}"] = "channels_last"
            history[name] = {"tensor": f"scheduler.{name}", "cpu": value.device.type == "cpu"}
        elif isinstance(value, list):
            items = []
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    tensors[f"scheduler.{name}.{i}"] = item.clone()
                    if _channels_last(item):
                        layouts[f"scheduler.{name}.{i}"] = "channels_last"
                    items.append({"tensor": f"scheduler.{name}.{i}", "cpu": item.device.type == "cpu"})
                else:
                    items.append({"value": item})
            history[name] = {"list": items}
        elif value is None or isinstance(value, (bool, int, float, str)):
            history[name] = {"value": value}
    return tensors, {"step": step, "scheduler": history, "layouts": layouts}


def _channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (what an img2img start gives on some devices): stored contiguous, it is
    put back as it was, because a convolution over the other layout comes out a last bit apart."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def restore(run, tensors: dict, meta: dict) -> None:
    """Put the state TENSORS/META back into RUN (whose scheduler has just been set up for the same schedule)."""
    device, layouts = run.device, meta.get("layouts", {})

    def laid_out(name, t):
        return t.to(memory_format=torch.channels_last) if layouts.get(name) == "channels_last" else t

    def back(entry):
        t = tensors[entry["tensor"]]
        return laid_out(entry["tensor"], t if entry["cpu"] else t.to(device))

    for name, entry in meta["scheduler"].items():
        if "tensor" in entry:
            value = back(entry)
        elif "list" in entry:
            value = [back(item) if "tensor" in item else item["value"] for item in entry["list"]]
        else:
            value = entry["value"]
        setattr(run.scheduler, name, value)
    run.latents = laid_out("latents", tensors["latents"].to(device=device, dtype=run.dtype, copy=True))
    run.generator.set_state(tensors["generator"])


def encode(tensors: dict, meta: dict) -> bytes:
    """A state as safetensors bytes (on a writer thread)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"state": json.dumps(meta)})


def load(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])  # noqa: SIM118
