"""Run one GenerationRequest into a run folder, reporting events to any number of sinks.

The CLI, the batch runner and the server all call run(); they differ only in the sinks
they pass (progress bar, JSON lines, SSE) and in how they map errors to exit codes.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, frames, registry
from .request import GenerationRequest

Event = dict
Sink = Callable[[Event], None]


@dataclass
class RunResult:
    run_dir: Path
    image: Path
    manifest: Path
    seed: int


def run(
    req: GenerationRequest,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    sinks: tuple[Sink, ...] = (),
    cancelled: Callable[[], bool] = lambda: False,
) -> RunResult:
    """Validate, load, denoise, write. Raises BadInput before anything is written."""
    req = req.validated()
    source = registry.resolve(req.model)
    run_dir = Path(out) if out is not None else frames.default_run_dir(req.prompt, req.seed)
    frames.check_run_dir(run_dir, overwrite)

    def emit(event: Event) -> None:
        for sink in sinks:
            sink(event)

    emit({"event": "load", "model": source.name, "location": source.location})
    t0 = time.perf_counter()
    ready = prepare(req, source)
    load_seconds = time.perf_counter() - t0
    pipe, device, width, height, previewer = ready.pipe, ready.device, ready.width, ready.height, ready.previewer

    import torch

    from .errors import SdstreamError
    from .loader import dtype_name
    from .loop import denoise
    from .preview import free_memory, vae_decode
    from .schedulers import SCHEDULERS

    frames.prepare_run_dir(run_dir, overwrite)
    manifest_path, image_path = run_dir / frames.MANIFEST, run_dir / frames.FINAL
    manifest = _manifest(req, source, device, dtype_name(pipe.unet.dtype), width, height)
    manifest["timings"]["load"] = round(load_seconds, 4)
    frames.write_json(manifest_path, manifest)

    writer = frames.FrameWriter(run_dir / frames.FRAMES, req.frame_format) if previewer else None
    run_started = time.perf_counter()
    finite = []  # per-step device-side flags: checking them at the end costs no per-step sync
    try:
        latents = None
        for ev in denoise(pipe, req, cancelled=cancelled):
            if latents is None:  # first step: what came before it was prompt encoding and latent set-up
                manifest["timings"]["prepare"] = round(time.perf_counter() - run_started - ev.seconds, 4)
                manifest.update(first_step=ev.first_step, total_steps=ev.total_steps)
                emit({"event": "start", "run_dir": str(run_dir), "seed": req.seed, "model": source.name,
                      "first_step": ev.first_step, "total_steps": ev.total_steps, "width": width, "height": height})
            latents = ev.latents
            finite.append(torch.isfinite(latents).all())
            frame = None
            if writer and ((ev.step - ev.first_step) % req.frames_every == 0 or ev.step == ev.total_steps):
                frame = writer.submit(ev.step, previewer(ev))
                manifest["frames"].append(
                    {"step": ev.step, "timestep": ev.timestep, "file": str(frame.relative_to(run_dir))}
                )
            manifest["timings"]["steps"].append(round(ev.seconds, 4))
            if ev.injected:
                manifest["injected_at"].append(ev.step)
            emit({"event": "step", "step": ev.step, "total_steps": ev.total_steps,
                  "progress": round(ev.progress, 2), "timestep": ev.timestep,
                  "frame": str(frame) if frame else None})

        finite = torch.stack(finite)
        if not bool(finite.all()):
            bad = manifest["first_step"] + int(finite.logical_not().nonzero()[0])
            raise SdstreamError(
                f"the latents became NaN/inf at step {bad} ({manifest['dtype']} on {device})",
                hint="try --dtype fp32 (or bf16), a lower --guidance or --noise-strength",
            )
        decode_started = time.perf_counter()
        image = vae_decode(pipe, latents, manifest["recoveries"])
        sampler = SCHEDULERS[req.scheduler][2]
        frames.save_image(image, image_path, pnginfo=_pnginfo(req, width, height, source.name, sampler))
        manifest["timings"]["decode"] = round(time.perf_counter() - decode_started, 4)
        if writer:
            writer.close()
        manifest.update(status="complete", image=frames.FINAL)
    except KeyboardInterrupt:
        _finish(writer, manifest, "interrupted", None)
        raise
    except torch.OutOfMemoryError as e:
        _finish(writer, manifest, "failed", e)
        free_memory()
        raise SdstreamError(
            f"out of memory on {device} at {width}x{height}",
            hint="try --cpu-offload, --vae-tiling, --attention-slicing, or a smaller --width/--height",
        ) from e
    except BaseException as e:
        _finish(writer, manifest, "failed", e)
        raise
    finally:
        manifest["timings"]["total"] = round(time.perf_counter() - t0, 4)
        manifest["finished"] = _now()
        frames.write_json(manifest_path, manifest)

    emit({"event": "done", "image": str(image_path), "manifest": str(manifest_path), "run_dir": str(run_dir),
          "seed": req.seed, "frames": len(manifest["frames"]), "seconds": manifest["timings"]["total"]})
    return RunResult(run_dir, image_path, manifest_path, req.seed)


@dataclass
class Prepared:
    """A request's loaded pipeline and what follows from it; nothing has been written yet."""

    pipe: object
    device: str
    width: int
    height: int
    previewer: object  # preview.Previewer, or None for --preview none


def prepare(req: GenerationRequest, source: registry.ModelSource) -> Prepared:
    """Load (cached) the pipeline REQ asks for and check REQ against it. Raises BadInput, writes nothing.

    Everything that generates (run(), the server) starts here.
    """
    from .loader import quiet_libraries

    quiet_libraries()  # before diffusers is first imported
    from .errors import BadInput
    from .loader import Speed, load_pipeline, resolve_device, resolve_dtype
    from .loop import check_against_model, size_of
    from .preview import Previewer

    device = resolve_device(req.device)
    if req.cpu_offload and not device.startswith("cuda"):
        raise BadInput(f"--cpu-offload moves models between a GPU and the CPU; the device here is {device}")
    speed = Speed(req.compile, req.cpu_offload, req.vae_tiling, req.attention_slicing)
    pipe = load_pipeline(source, device, resolve_dtype(req.dtype, device), speed)
    check_against_model(pipe, req)
    width, height = size_of(pipe, req)
    previewer = Previewer(pipe, req.preview, req.frame_source, req.taesd) if req.preview != "none" else None
    return Prepared(pipe, device, width, height, previewer)


def _finish(writer, manifest: dict, status: str, error: BaseException | None) -> None:
    """Flush frames already handed over, then record how the run ended."""
    if writer:
        try:
            writer.close()
        except Exception as e:  # a write error while failing: keep the first error, note this one
            error = error or e
    manifest["status"] = status
    if error is not None:
        manifest["error"] = f"{type(error).__name__}: {error}"


def _manifest(req: GenerationRequest, source, device: str, dtype: str, width: int, height: int) -> dict:
    import diffusers
    import torch
    import transformers

    return {
        "sdstream": __version__,
        "status": "running",
        "error": None,
        "request": req.to_dict(),
        "model": {"name": source.name, "alias": source.alias, "kind": source.kind, "location": source.location},
        "seed": req.seed,
        "scheduler": req.scheduler,
        "device": device,
        "dtype": dtype,
        "width": width,
        "height": height,
        "first_step": None,
        "total_steps": None,
        "injected_at": [],
        "recoveries": [],  # safe fixes applied on the way: vae_tiled_retry, vae_fp32_retry
        "versions": {
            "sdstream": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "timings": {"load": None, "prepare": None, "steps": [], "decode": None, "total": None},
        "frames": [],
        "image": None,
        "created": _now(),
        "finished": None,
    }


def _pnginfo(req: GenerationRequest, width: int, height: int, model: str, sampler: str):
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", frames.a1111_parameters(req, width, height, model, sampler))
    info.add_text("sdstream", json.dumps(req.to_dict()))
    return info


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
