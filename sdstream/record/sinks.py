"""What a run tells its consumers, and the consumers every front end shares.

The orchestrator calls each sink, in order, at five points: load (before the model loads), start (the run
is set up), step (each denoising step, with its tensors and, on frame steps, the preview picture still on
the device), steps_done (after the last step; a sink may raise to fail the run, as the NaN check does) and
finish (exactly once, however the run ended). Events also have one dictionary form, shared by `--json`,
the server's SSE stream and library callables: as_sink(callable) turns a function of dicts into a sink.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdstreamError


@dataclass
class RunInfo:
    """A run once it is set up: what it is, where, and (filled in as it goes) its timings and recoveries."""

    request: object  # the validated GenerationRequest
    model: object  # models.registry.ModelSource
    device: str
    dtype: str
    width: int
    height: int
    first_step: int
    total_steps: int
    preview: str = "none"  # the frame decoder (--preview, with auto decided for the model)
    timings: dict = field(default_factory=lambda: {"load": None, "prepare": None, "steps": [], "decode": None,
                                                   "total": None})
    recoveries: list = field(default_factory=list)  # safe fixes applied on the way: vae_tiled_retry, vae_fp32_retry
    run_dir: Path | None = None  # set by the run folder's sink, when there is one
    continuation: object | None = None  # record.continuation.Continuation, for a branch or a resumed run
    measures: dict | None = None  # per step (record.sinks.Measures), once the steps are done
    notices: list = field(default_factory=list)  # what a person should know (a replay, the size of --save-tensors)

    def to_dict(self) -> dict:
        return {"event": "start", "run_dir": str(self.run_dir) if self.run_dir else None, "seed": self.request.seed,
                "model": self.model.name, "first_step": self.first_step, "total_steps": self.total_steps,
                "width": self.width, "height": self.height}


@dataclass
class Step:
    """One denoising step for the sinks: the loop's StepEvent (tensors), and the preview picture on frame steps."""

    event: object  # core.loop.StepEvent
    picture: object | None = None  # uint8 (H, W, 3) tensor on the model's device, on steps that get a frame
    frame: Path | None = None  # where the run folder writes it
    heat: dict | None = None  # --attention's heat maps of the step (word -> uint8 (H, W, 3)), from its sink

    def to_dict(self) -> dict:
        ev = self.event
        return {"event": "step", "step": ev.step, "total_steps": ev.total_steps, "progress": round(ev.progress, 2),
                "timestep": ev.timestep, "injected": ev.injected, "frame": str(self.frame) if self.frame else None}


@dataclass
class Outcome:
    """How a run ended: complete (with its image), failed (with its error) or interrupted."""

    status: str
    image: object | None = None  # the final PIL image
    error: BaseException | None = None
    image_path: Path | None = None  # set by the run folder's sink
    manifest_path: Path | None = None
    frames: int = 0

    def to_dict(self, info: RunInfo | None) -> dict:
        seconds = info.timings["total"] if info else None
        if self.status == "complete":
            return {"event": "done", "image": str(self.image_path) if self.image_path else None,
                    "manifest": str(self.manifest_path) if self.manifest_path else None,
                    "run_dir": str(info.run_dir) if info.run_dir else None, "seed": info.request.seed,
                    "frames": self.frames, "seconds": seconds}
        return {"event": self.status, "error": error_text(self.error) if self.error else None, "seconds": seconds}


def error_text(error: BaseException) -> str:
    """An error as one line: our own errors as their message, anything else with its type."""
    return str(error) if isinstance(error, SdstreamError) else f"{type(error).__name__}: {error}"


class Sink:
    """A consumer of a run's events; every method is optional. A sink that shows frames sets `pictures`: the
    preview decoder runs only when one does."""

    pictures = False

    def claim(self, req) -> None:
        """Before anything loads: take what the run will need (a run folder), or raise BadInput."""

    def load(self, model) -> None: ...

    def start(self, info: RunInfo) -> None: ...

    def step(self, step: Step) -> None: ...

    def steps_done(self, info: RunInfo) -> None: ...

    def finish(self, info: RunInfo | None, outcome: Outcome) -> None: ...


class CallableSink(Sink):
    """A function of event dictionaries (print, json lines, a test's list.append) as a sink."""

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def load(self, model) -> None:
        self.fn({"event": "load", "model": model.name, "location": model.location})

    def start(self, info: RunInfo) -> None:
        self.fn(info.to_dict())

    def step(self, step: Step) -> None:
        self.fn(step.to_dict())

    def finish(self, info: RunInfo | None, outcome: Outcome) -> None:
        self.fn(outcome.to_dict(info))


def as_sink(sink) -> Sink:
    return sink if isinstance(sink, Sink) else CallableSink(sink)


class Measures(Sink):
    """Per-step measures of the trajectory, computed on the device and read once, after the last step (or when the
    run ends early): no per-step sync.

      x0_change      |x0 - the previous step's x0| / |x0|: how much the picture-to-be still moves
      guidance_gap   the root mean square of eps_cond - eps_uncond: how much the prompt pulls (null unguided)
      latent_std     the standard deviation of the latents
      injected_rms   the root mean square of the noise injected before the step (0 where none was)
    """

    NAMES = ("x0_change", "guidance_gap", "latent_std", "injected_rms")

    def start(self, info: RunInfo) -> None:
        self.rows, self.steps, self.previous = [], [], None

    def step(self, step: Step) -> None:
        import torch

        ev = step.event
        x0 = ev.denoised.float()
        nan = torch.full((), float("nan"), device=x0.device)
        change = nan if self.previous is None else (x0 - self.previous).norm() / x0.norm().clamp_min(1e-12)
        gap = nan if ev.eps_uncond is None else (ev.eps_cond.float() - ev.eps_uncond.float()).pow(2).mean().sqrt()
        injected = ev.injected_rms if ev.injected_rms is not None else torch.zeros((), device=x0.device)
        self.rows.append(torch.stack([change, gap, ev.latents.float().std(), injected.float()]))
        self.steps.append(ev.step)
        self.previous = x0

    def steps_done(self, info: RunInfo) -> None:
        if info is None or info.measures is not None or not getattr(self, "rows", None):
            return
        import math

        import torch

        values = torch.stack(self.rows).cpu().tolist()  # the one read of the run
        info.measures = {"steps": self.steps, **{name: [None if math.isnan(row[i]) else round(row[i], 6)
                                                         for row in values] for i, name in enumerate(self.NAMES)}}

    def finish(self, info: RunInfo | None, outcome: Outcome) -> None:
        self.steps_done(info)  # a run that ended early keeps the measures of its steps


class NanCheck(Sink):
    """Fails the run when the latents became NaN/inf, naming the first bad step.

    The per-step flags stay on the device and are read once, after the last step: no per-step sync.
    """

    def start(self, info: RunInfo) -> None:
        self.flags, self.first = [], info.first_step

    def step(self, step: Step) -> None:
        import torch

        self.flags.append(torch.isfinite(step.event.latents).all())

    def steps_done(self, info: RunInfo) -> None:
        import torch

        finite = torch.stack(self.flags)
        if not bool(finite.all()):
            bad = self.first + int(finite.logical_not().nonzero()[0])
            raise SdstreamError(f"the latents became NaN/inf at step {bad} ({info.dtype} on {info.device})",
                                hint="try --dtype fp32 (or bf16), a lower --guidance or --noise-strength")
