"""The orchestrator: the only driver of the loop. The CLI, batch, the server, diagnostics, tools and tests all
call run(request, sinks); they differ only in the sinks they pass (a run folder, progress, JSON lines, SSE).

    phase 1, no torch:  validate the request, decode its pictures, find the model (on disk? its words?),
                        claim the run folder (sinks' claim)
    phase 2:            load the model (cached), the checks that need it, the hooks; then the loop, each step to
                        every sink with its tensors and, on frame steps, its preview picture; the final decode

Out-of-memory, NaN/inf, cancellation and interruption are handled here, once, and end every sink the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .. import interrupts
from ..core.families import family_of
from ..errors import BadInput, SdstreamError
from ..inputs import Inputs, load_inputs
from ..models.registry import ModelSource, check_available, check_family, family_of_source, for_family
from .sinks import Measures, NanCheck, Outcome, RunInfo, Sink, Step, as_sink

OOM_HINT = "try --cpu-offload, --vae-tiling, --attention-slicing, or a smaller --width/--height"


class Cancelled(KeyboardInterrupt):
    """The run's `cancelled` callback said stop (a server client went away)."""


@dataclass
class Result:
    """A complete run: its final image and what it was."""

    image: object  # PIL image
    info: RunInfo
    outcome: Outcome

    @property
    def seed(self) -> int:
        return self.info.request.seed

    @property
    def run_dir(self):
        return self.info.run_dir

    @property
    def image_path(self):
        return self.outcome.image_path

    @property
    def manifest_path(self):
        return self.outcome.manifest_path


@dataclass
class Prepared:
    """A request's loaded pipeline and what follows from it; nothing has been written yet."""

    pipe: object
    device: str
    width: int
    height: int
    previewer: object | None  # core.preview.Previewer, or None for --preview none
    hooks: list
    preview: str  # the frame decoder, with auto decided
    request: object  # the request, with --scheduler auto decided for the model's family


def run(req, sinks: Sequence = (), *, inputs: Inputs | None = None,
        cancelled: Callable[[], bool] | None = None, continuation=None) -> Result:
    """Run REQ to SINKS (Sink objects, or functions of event dicts). Raises BadInput before anything is written
    for a bad request, SdstreamError (with a hint) for a failed run, KeyboardInterrupt when interrupted.

    CANCELLED is asked before each step and, inside a step, before each of the UNet's and the VAE decoder's
    blocks: a long step (a big picture on a CPU) stops within a block, not after minutes. CONTINUATION (or a
    request that names a parent run) makes the run continue another (record/continuation.py)."""
    from .attention import attention_maps, check_request, recording
    from .continuation import branch_of
    from .rundir import RunFolder

    req = req.validated()
    if continuation is None and req.parent is not None:
        continuation = branch_of(req)
    own = [Measures(), NanCheck()]  # the orchestrator's own sinks, first
    sinks = [*own, *(as_sink(s) for s in sinks)]
    check_request(req, sinks)  # --attention's checks that need no model
    inputs = inputs if inputs is not None else load_inputs(req)
    source = check_available(req)
    req = for_family(req, family_of_source(source))
    info, finished = None, set()
    try:
        for sink in sinks:
            sink.claim(req)
        for sink in sinks:
            sink.load(source)
        started = time.perf_counter()
        ready = prepare(req, source, inputs, previews=any(sink.pictures for sink in sinks), continuation=continuation)
        interrupts.raise_if_pending()  # a Ctrl-C that an import or a load swallowed
        req = ready.request
        maps = attention_maps(req, ready, sinks, continuation)  # --attention: [its sink], or BadInput now, or []
        # after the folder it writes into (or the orchestrator's own sinks), before the sinks that read its heat maps
        at = next((i + 1 for i, sink in enumerate(sinks) if isinstance(sink, RunFolder)), len(own))
        sinks[at:at] = maps
        info = _info(req, source, ready, time.perf_counter() - started, continuation)
        for sink in sinks:
            sink.start(info)
        with _cancellable(ready.pipe, cancelled), recording(maps):  # the maps' processors: for the loop alone
            image = _denoise(req, ready, info, sinks, cancelled or (lambda: False), continuation)
        outcome = Outcome("complete" if image is not None else "stopped", image)
        info.timings["total"] = round(time.perf_counter() - started, 4)
        for sink in sinks:
            sink.finish(info, outcome)
            finished.add(id(sink))
        return Result(image, info, outcome)
    except BaseException as e:
        failure = _failure(e)
        if info is not None:
            info.timings["total"] = round(time.perf_counter() - started, 4)
        outcome = Outcome("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=failure)
        for sink in sinks:
            if id(sink) not in finished:
                try:
                    sink.finish(info, outcome)
                except Exception:  # a sink failing while the run fails: the run's own error is what counts
                    pass
        if failure is e:
            raise
        raise failure from e


@contextmanager
def _cancellable(pipe, cancelled):
    """Forward pre-hooks on the UNet's and the VAE decoder's blocks that stop the run when CANCELLED says so."""
    denoiser = family_of(pipe).denoiser
    if cancelled is None or getattr(denoiser, "_compiled_call_impl", None) is not None:  # (compiled: no hooks)
        yield
        return

    def check(module, args):
        if cancelled():
            raise Cancelled

    if hasattr(denoiser, "down_blocks"):  # a UNet
        blocks = [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]
    else:  # a transformer (SD3, FLUX): its blocks, joint and single
        blocks = [*getattr(denoiser, "transformer_blocks", ()), *getattr(denoiser, "single_transformer_blocks", ())]
    blocks += list(pipe.vae.decoder.up_blocks)
    handles = [block.register_forward_pre_hook(check) for block in blocks if block is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _failure(e: BaseException) -> BaseException:
    """The error to report for E: out of memory (GPU or CPU) becomes one line with the knobs; the rest as it is."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
        from ..core.preview import free_memory

        free_memory()  # so that a batch or a server goes on
        return SdstreamError(f"out of memory: {str(e).splitlines()[0][:160]}", hint=OOM_HINT)
    return e


def _info(req, source: ModelSource, ready: Prepared, load_seconds: float, continuation) -> RunInfo:
    from ..models.loader import dtype_name

    first = continuation.at if continuation else req.first_step
    info = RunInfo(req, source, ready.device, dtype_name(family_of(ready.pipe).dtype), ready.width, ready.height,
                   first, req.total_steps, ready.preview, continuation=continuation)
    info.timings["load"] = round(load_seconds, 4)
    if continuation and continuation.state is None and first > continuation.parent.first_step:
        info.notices.append(f"{continuation.parent_dir} kept no state after step {first - 1} (--save-state): "
                            f"replaying steps {continuation.parent.first_step}-{first - 1} exactly first")
    return info


def _denoise(req, ready: Prepared, info: RunInfo, sinks: list[Sink], cancelled, continuation) -> object:
    """The loop, each step to every sink (steps replayed for a continuation to none); then the checks of the
    finished steps and the final image (None when the run stops early, at --stop-at-step)."""
    from ..core.loop import denoise
    from ..core.preview import vae_decode

    previewer, latents, at = ready.previewer, None, info.first_step
    began = time.perf_counter()
    events = denoise(ready.pipe, continuation.parent if continuation else req, ready.width, ready.height,
                     ready.hooks)
    while True:
        if cancelled():  # asked before each step is computed
            raise Cancelled
        interrupts.raise_if_pending()
        ev = next(events, None)
        if ev is None:
            break
        if ev.step < at:  # a continuation's steps before it are the parent's, computed again exactly
            continue
        if latents is None:  # what came before the first step was prompt encoding and latent set-up
            info.timings["prepare"] = round(time.perf_counter() - began - ev.seconds, 4)
        latents = ev.latents
        due = previewer is not None and ((ev.step - at) % req.frames_every == 0 or ev.step == ev.total_steps)
        step = Step(ev, previewer(ev) if due else None)
        info.timings["steps"].append(round(ev.seconds, 4))
        for sink in sinks:
            sink.step(step)
        if ev.step == req.stop_at_step:
            break
    for sink in sinks:
        sink.steps_done(info)
    if req.stop_at_step is not None:
        return None
    decode_started = time.perf_counter()
    image = vae_decode(ready.pipe, latents, info.recoveries, (ready.width, ready.height))
    info.timings["decode"] = round(time.perf_counter() - decode_started, 4)
    return image


# ------------------------------------------------------------------------------------------ phase 2: the model


def prepare(req, source: ModelSource, inputs: Inputs, previews: bool = True, continuation=None) -> Prepared:
    """Load (cached) the pipeline REQ asks for, make the checks that need it, build the hooks (and, with
    PREVIEWS, the frame decoder). Writes nothing."""
    from ..models.loader import quiet_libraries

    quiet_libraries()  # before diffusers is first imported
    from ..core.preview import Previewer
    from ..models.loader import Speed, load_pipeline, resolve_device, resolve_dtype

    device = resolve_device(req.device)
    if req.cpu_offload and not device.startswith("cuda"):
        raise BadInput(f"--cpu-offload moves models between a GPU and the CPU; the device here is {device}")
    speed = Speed(req.compile, req.cpu_offload, req.vae_tiling, req.attention_slicing)
    pipe = load_pipeline(source, device, resolve_dtype(req.dtype, device), speed)
    family = family_of(pipe)
    check_family(req, family.traits)  # (for a hub model downloaded just now: known only once loaded)
    req = for_family(req, family.traits)
    width, height = size_of(pipe, req, inputs)
    check_against_model(pipe, req, width, height)
    hooks = hooks_for(pipe, req, inputs, continuation)
    mode = preview_mode(req, pipe)
    wanted = previews and mode != "none"
    previewer = Previewer(pipe, mode, req.frame_source, req.taesd, (width, height)) if wanted else None
    return Prepared(pipe, device, width, height, previewer, hooks, mode, req)


def preview_mode(req, pipe) -> str:
    """--preview, with auto decided for the model: what its folder's sdstream.json declares (tiny: vae, whose
    decode of 32x32 costs next to nothing and whose linear colours are rough), else TAESD when it is on disk,
    else the linear approximation."""
    if req.preview != "auto":
        return req.preview
    declared = getattr(pipe, "sdstream_notes", {}).get("preview")
    if declared in ("approx", "vae", "taesd"):
        return declared
    from ..models.registry import DEFAULT_TAESD, hub_file

    return "taesd" if hub_file(DEFAULT_TAESD, "config.json") is not None else "approx"


def size_of(pipe, req, inputs: Inputs) -> tuple[int, int]:
    """(width, height): as asked; else a starting picture's size, rounded down to the VAE factor (diffusers'
    img2img keeps the picture's size); else the model's native size."""
    family = family_of(pipe)
    factor = family.size_multiple
    picture = inputs.get("init_image") or inputs.get("start_image")
    if picture is not None:
        native = (max(factor, picture.width // factor * factor), max(factor, picture.height // factor * factor))
    else:
        native = family.native_size()
    return req.width or native[0], req.height or native[1]


def check_against_model(pipe, req, width: int, height: int) -> None:
    """The checks that need the model, raised before any output exists."""
    from ..core.schedulers import make_scheduler

    family = family_of(pipe)
    factor = family.size_multiple
    for option, value in (("--width", width), ("--height", height)):
        if value % factor:
            raise BadInput(f"{option} {value} is not a multiple of {factor} (this model's size step)")
    import torch

    scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    family.set_timesteps(scheduler, req.steps, width, height)
    if len(scheduler.timesteps) != req.total_steps:  # the step arithmetic checked before loading assumed it
        raise BadInput(f"--scheduler {req.scheduler}: this model's scheduler config gives {len(scheduler.timesteps)}"
                       f" timesteps for {req.steps} steps, not {req.total_steps}")
    if family.flow:  # flow matching has one prediction type, the velocity
        return
    try:  # one step on a 2x2 nothing: a scheduler that can't take this model's prediction type says so now
        zeros = torch.zeros(1, 1, 2, 2)
        scheduler.step(zeros, scheduler.timesteps[0], scheduler.scale_model_input(zeros, scheduler.timesteps[0]))
    except (ValueError, NotImplementedError) as e:
        kind = scheduler.config.prediction_type
        raise BadInput(f"--scheduler {req.scheduler} does not work with this model's prediction type {kind!r} "
                       f"({str(e).splitlines()[0]})") from None


def hooks_for(pipe, req, inputs: Inputs, continuation=None) -> list:
    """The loop's hooks for REQ's interventions, in the order they act. For a continuation, the parent's before
    its step (the injections, the prompt editing), REQ's from it, and the parent's saved state to start from."""
    from ..core.hooks import ChangeAt, ImagePrompt, StartFromPicture

    base = continuation.parent if continuation else req
    at = continuation.at if continuation else req.first_step
    resume = continuation is not None and continuation.state is not None
    hooks = []
    picture = inputs.get("init_image") or inputs.get("start_image")
    if picture is not None and not resume:
        hooks.append(StartFromPicture(picture))
    if base.prompt_image is not None:
        from ..models.clip import embedder_for

        embedder = embedder_for(pipe, base.clip_model)  # loads it; its width must be the UNet's cross-attention's
        hooks.append(ImagePrompt(embedder, inputs.get("prompt_image"), base.image_weight))
    hooks += _injection(base, inputs, lambda k: k < at) + _injection(req, inputs, lambda k: k >= at)
    if continuation is not None:
        changed = {name: getattr(req, field) for name, field in (("prompt", "prompt"), ("negative", "negative_prompt"),
                   ("guidance", "guidance"), ("seed", "seed")) if getattr(req, field) != getattr(base, field)}
        if changed:
            hooks.append(ChangeAt(at, **changed))
    hooks += [ChangeAt(k, prompt=text) for k, text in base.prompt_at if k < at]
    hooks += [ChangeAt(k, prompt=text) for k, text in req.prompt_at if k >= at]
    if resume:
        from ..core.hooks import Resume
        from ..core.state import load

        hooks.append(Resume(at, *load(continuation.state)))
    return hooks


def _injection(req, inputs: Inputs, when) -> list:
    from ..core.hooks import NoiseInjection

    steps = [k for k in req.inject_steps if when(k)]
    if not steps:
        return []
    pattern = req.mask if req.mask_is_pattern else None
    return [NoiseInjection(steps, req.noise_strength, req.seed, pattern, inputs.get("mask"))]
