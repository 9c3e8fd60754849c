"""Load Stable Diffusion pipelines once and keep them: by (source, device, dtype).

Everything goes through StableDiffusionPipeline.from_pretrained: the embedded `tiny` model,
a local folder and a Hugging Face repo differ only in where the folder comes from.
Safety: safetensors preferred (diffusers falls back to torch.load with weights_only for
.bin files), never trust_remote_code or custom pipelines, safety checker off.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from ..errors import BadInput, SdstreamError
from .notes import model_notes
from .registry import ModelSource, hub_snapshot, label, local_folder

_CACHE: dict[tuple[str, str, str], object] = {}
_LOCK = threading.Lock()


def quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (progress bars, import notices) off the user's terminal.

    Call before the first import of diffusers: transformers logs some notices at import time.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def resolve_device(device: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {device!r}: no CUDA GPU is available here; use --device cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BadInput(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0…)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise BadInput("--device 'mps': Apple MPS is not available here; use --device cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str):
    """fp16 on CUDA, fp32 elsewhere, unless --dtype says otherwise."""
    import torch

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return names[dtype]


def dtype_name(dtype) -> str:
    """torch.float16 -> 'fp16', as --dtype spells it."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)


@dataclass(frozen=True)
class Speed:
    """How a pipeline is set up for speed or memory. Part of the cache key: it changes the pipeline."""

    compile: bool = False  # torch.compile the UNet (first steps are slow while it compiles)
    cpu_offload: bool = False  # accelerate's model offload: each model on the GPU only while it runs
    vae_tiling: bool = False  # decode large images tile by tile
    attention_slicing: bool = False  # attention in slices: less memory, a little slower


def load_pipeline(source: ModelSource, device: str, dtype, speed: Speed = Speed()):
    """The pipeline for SOURCE on DEVICE in DTYPE, loaded on first use and then reused."""
    key = (f"{source.kind}:{source.location}", device, dtype_name(dtype), speed)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(source, device, dtype, speed)
        return _CACHE[key]


def loaded_models() -> list[tuple[str, str, str]]:
    """(source, device, dtype) of every pipeline in memory."""
    return list(dict.fromkeys(key[:3] for key in _CACHE))


def _load(source: ModelSource, device: str, dtype, speed: Speed):
    import torch
    from diffusers import DiffusionPipeline

    from ..core.families import family_of, traits_of

    where = str(local_folder(source)) if source.kind != "hub" else source.location
    try:
        kind = DiffusionPipeline.load_config(where)["_class_name"]  # model_index.json alone: the family
    except Exception as e:  # classify hub failures into messages with a next step
        raise _load_error(source, e) from e
    family = traits_of(kind)  # BadInput for a pipeline sdstream does not run, before the weights load
    kwargs = dict(dtype=dtype)
    if family.module == "sd":  # SD 1.x/2.x folders name a safety checker; sdstream records, it does not censor
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(where, **kwargs)
    except Exception as e:
        raise _load_error(source, e) from e
    pipe.set_progress_bar_config(disable=True)
    snapshot = hub_snapshot(source.location) if source.kind == "hub" else where
    pipe.sdstream_notes = model_notes(snapshot) if snapshot else {}  # a toy's vocabulary, its preview colours
    # Attention already runs through PyTorch's scaled_dot_product_attention (diffusers' default processor).
    if speed.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    denoiser = family_of(pipe).denoiser
    if device.startswith("cuda") and hasattr(denoiser, "conv_in"):  # a UNet
        denoiser.to(memory_format=torch.channels_last)  # convolutions run faster on tensor cores this way
    if speed.attention_slicing:
        pipe.enable_attention_slicing()
    if speed.vae_tiling:
        pipe.vae.enable_tiling()
    if speed.compile:  # in place: the denoiser keeps its config and class
        # On CUDA, with CUDA graphs as well (diffusers' own recipe for the SD UNet): an SD 1.5 UNet call is
        # some 750 operator calls, each a kernel launched from Python; a CUDA graph launches them all at once.
        # Not with --cpu-offload: a graph holds the weights' addresses, and offloading moves the weights.
        graphs = device.startswith("cuda") and not speed.cpu_offload
        denoiser.compile(mode="reduce-overhead" if graphs else None)
    return pipe


def _load_error(source: ModelSource, e: Exception) -> SdstreamError:
    name = label(source)
    hint = "use --model tiny, a local diffusers folder, or download it once with network access"
    return hub_error(name, source.kind == "hub", e, hint) or SdstreamError(f"could not load {name}: {first_line(e)}")


def hub_error(name: str, from_hub: bool, e: Exception, hint: str) -> SdstreamError | None:
    """A one-line message with a next step for the Hub's failures (gated, missing, unreachable), else None.

    Told by huggingface_hub's own error types anywhere in the chain of causes (diffusers and transformers wrap
    them); a bare OSError of diffusers' saying it "couldn't connect" is the one message read as text.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    chain, seen = [], e
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(x, GatedRepoError) for x in chain):
        return SdstreamError(f"{name} is gated: accept its licence on the Hub, then set HF_TOKEN")
    if any(isinstance(x, RepositoryNotFoundError) for x in chain):
        return BadInput(f"{name} does not exist on the Hugging Face Hub (or is private: set HF_TOKEN)")
    unreachable = any(isinstance(x, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError))
                      or "couldn't connect" in str(x) for x in chain)
    if from_hub and unreachable:
        from .registry import offline

        why = "HF_HUB_OFFLINE is set" if offline() else "the Hugging Face Hub cannot be reached"
        return SdstreamError(f"{name} is not on disk and {why}", hint=hint)
    return None


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
