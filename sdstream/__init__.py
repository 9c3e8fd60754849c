"""sdstream: record the denoising process of Stable Diffusion, step by step.

The public API is small and lazy: importing sdstream does not import torch.

    from sdstream import GenerationRequest, generate, run, open_run
    image = generate(GenerationRequest(prompt="a red circle", model="tiny", seed=1))     # a PIL image
    result = run(GenerationRequest(prompt="a fox in snow", model="tiny", seed=1), "outputs/fox")  # a run folder
    open_run("outputs/fox").frame(5)

Every step reaches the sinks you pass (a Sink subclass sees its tensors; a plain function gets event dicts).
"""

__version__ = "0.1.0"

__all__ = ["GenerationRequest", "generate", "run", "load", "open_run", "Sink", "BadInput", "SdstreamError",
           "__version__"]


def __getattr__(name):
    if name == "GenerationRequest":
        from .request import GenerationRequest

        return GenerationRequest
    if name in ("BadInput", "SdstreamError"):
        from . import errors

        return getattr(errors, name)
    if name == "Sink":
        from .record.sinks import Sink

        return Sink
    if name == "open_run":
        from .record.rundir import open_run

        return open_run
    raise AttributeError(f"module 'sdstream' has no attribute {name!r}")


def generate(request, sinks=(), *, cancelled=lambda: False):
    """The final image (PIL) of REQUEST, with no files written; SINKS see every step."""
    from .record.orchestrator import run as orchestrate

    return orchestrate(request, sinks, cancelled=cancelled).image


def run(request, out=None, *, overwrite: bool = False, sinks=(), cancelled=lambda: False):
    """REQUEST into a run folder (OUT, default a new folder under ./outputs) as `sdstream generate` writes it.

    Returns the orchestrator's Result: .image (PIL), .run_dir, .outcome.image_path, .seed.
    """
    from .record.orchestrator import run as orchestrate
    from .record.rundir import RunFolder

    return orchestrate(request, [RunFolder(out, overwrite), *sinks], cancelled=cancelled)


def load(model: str | None = None, device: str = "auto", dtype: str = "auto"):
    """The diffusers pipeline for MODEL (alias, hub id, folder or 'tiny'), cached in-process."""
    from .models.loader import load_pipeline, quiet_libraries, resolve_device, resolve_dtype
    from .models.registry import resolve

    quiet_libraries()
    dev = resolve_device(device)
    return load_pipeline(resolve(model), dev, resolve_dtype(dtype, dev))
