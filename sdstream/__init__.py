"""sdstream: record the denoising process of Stable Diffusion, step by step.

The public API is small and lazy: importing sdstream does not import torch.

    from sdstream import GenerationRequest, run, load, denoise
    result = run(GenerationRequest(prompt="a fox in snow", model="tiny", seed=1), "outputs/fox")
"""

__version__ = "0.1.0"

__all__ = ["GenerationRequest", "run", "load", "denoise", "StepEvent", "BadInput", "SdstreamError", "__version__"]


def __getattr__(name):
    if name == "GenerationRequest":
        from .request import GenerationRequest

        return GenerationRequest
    if name in ("BadInput", "SdstreamError"):
        from . import errors

        return getattr(errors, name)
    if name == "run":
        from .runner import run

        return run
    if name in ("denoise", "StepEvent"):
        from .loader import quiet_libraries

        quiet_libraries()  # before diffusers is first imported
        from . import loop

        return getattr(loop, name)
    if name == "load":
        return load
    raise AttributeError(f"module 'sdstream' has no attribute {name!r}")


def load(model: str | None = None, device: str = "auto", dtype: str = "auto"):
    """The diffusers pipeline for MODEL (alias, hub id, folder or 'tiny'), cached in-process."""
    from .loader import load_pipeline, quiet_libraries, resolve_device, resolve_dtype
    from .registry import resolve

    quiet_libraries()

    dev = resolve_device(device)
    return load_pipeline(resolve(model), dev, resolve_dtype(dtype, dev))
