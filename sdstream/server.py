"""`sdstream serve`: the original HTTP streaming API, on the same core (extra: sdstream[serve]).

    POST /generate   JSON body -> text/event-stream: one `data: {...}` per step, a final
                     `data: {..., "done": true}`, then `data: [DONE]`
    GET  /           service info      GET /health   queue and counters
    GET  /diagnostics                  GET /ui       a page that drives /generate
    GET  /openapi.json (and /docs)

The body becomes a GenerationRequest (uploaded pictures are decoded strictly and written to a
temporary folder), validated by the same code as the CLI; a bad value is a 422 naming it.
Generation is loop.denoise with preview.Previewer, on ONE worker thread: one run at a time on the
device, a bounded waiting line (503 when full), and a client that goes away cancels its run at the
next step through denoise's `cancelled` hook. Only the serve command imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import queue
import re
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware

from . import __version__, masks, registry
from .errors import BadInput, SdstreamError
from .request import GenerationRequest
from .schedulers import SCHEDULERS

MAX_BODY_BYTES = 20 * 1024 * 1024  # a JSON body, base64 pictures included
MAX_IMAGE_PIXELS = 4096 * 4096  # per uploaded picture, enforced by Pillow through images.open_image
DEFAULT_MAX_QUEUE = 8  # requests waiting behind the running one
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
JPEG_QUALITY = 90
EVENT_BUFFER = 8  # events a slow client may fall behind before the run waits for it
_D = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}


# ---------------------------------------------------------------------------------------------
# The body: the original service's fields, then sdstream's additions


class GenerateBody(BaseModel):
    """POST /generate. Pictures are base64 (optionally a `data:image/...;base64,` URL)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field("", description="What to draw.")
    steps: int = Field(_D["steps"], description="Denoising steps, 1-1000.")
    model: str | None = Field(
        None, description="One of GET /'s available_models (with --any-model also a Hugging Face repo id or "
                          "server-side folder). Default: $SDSTREAM_MODEL or compressibility.")
    guidance_scale: float = Field(_D["guidance"], description="Classifier-free guidance, 0-100; off at 1 or below.")
    negative_prompt: str = Field("", description="What to steer away from.")
    start_step: int | None = Field(None, description="With start_image: the step (1..steps) it enters at.")
    start_image: str | None = Field(None, description="Base64 picture, encoded and denoised from start_step.")
    noise_mask_type: str | None = Field(
        None, description=f"Where to inject noise: {', '.join(masks.PATTERNS)} (or the original names such as "
                          "center_circle); null or 'none' for no injection.")
    noise_strength: float = Field(
        _D["noise_strength"], description="Injected noise, 0-2, in units of the latent's noise level at that step.")
    inject_at_step: int | list[int] | None = Field(
        None, description="Step(s) at which to inject; default with a mask: 30% into the run.")
    init_image: str | None = Field(None, description="Base64 picture for img2img.")
    strength: float | None = Field(None, description="img2img strength, 0-1 (default 0.75).")
    prompt_image: str | None = Field(None, description="Base64 picture used as the prompt (CLIP image embedding).")
    # sdstream's additions
    seed: int | None = Field(None, description="Random seed; default random, returned in the final event.")
    width: int | None = Field(None, description="Default: the model's size.")
    height: int | None = Field(None, description="Default: the model's size.")
    scheduler: str = Field(_D["scheduler"], description=", ".join(SCHEDULERS))
    preview: Literal["approx", "vae", "taesd", "none"] = Field(
        _D["preview"], description="How step frames are decoded; none sends steps without pictures.")
    frame_source: Literal["x0", "latent"] = Field(
        _D["frame_source"], description="x0 (the model's clean estimate) or latent (the noisy state).")


IMAGE_FIELDS = ("init_image", "start_image", "prompt_image")
# validated() speaks in CLI options; the API answers in its own field names
_API_NAMES = {"--guidance": "guidance_scale", "--mask": "noise_mask_type"}


def prompt_image_supported() -> bool:
    return "prompt_image" in {f.name for f in dataclasses.fields(GenerationRequest)}


def decode_base64(value: str, name: str) -> bytes:
    """Strict base64 (no stray characters), optionally inside a data: URL; BadInput otherwise."""
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadInput(f"{name}: a data URL must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{name} is not valid base64 (standard alphabet, padded, no line breaks)") from None
    if not data:
        raise BadInput(f"{name} is empty")
    return data


def build_request(body: GenerateBody, folder: Path, device: str) -> GenerationRequest:
    """The validated GenerationRequest for BODY; uploaded pictures are written into FOLDER."""
    uploads: dict[str, Path] = {}
    try:
        if body.prompt_image is not None and not prompt_image_supported():
            raise BadInput("prompt_image is not supported yet by this sdstream version")
        values = dict(
            prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model, steps=body.steps,
            guidance=body.guidance_scale, seed=body.seed, width=body.width, height=body.height,
            scheduler=body.scheduler, strength=body.strength, start_step=body.start_step,
            noise_strength=body.noise_strength, preview=body.preview, frame_source=body.frame_source, device=device,
        )
        mask = body.noise_mask_type
        if mask is not None and mask.strip().lower() != "none":
            # a pattern name only: a server never reads a mask from a path the client names
            name = masks.canonical(mask)
            if name is None:
                raise BadInput(f"noise_mask_type {mask!r} is not one of: {', '.join(masks.PATTERNS)}, none")
            values["mask"] = name
        inject = body.inject_at_step
        values["inject_at_step"] = () if inject is None else (inject,) if isinstance(inject, int) else tuple(inject)
        for name in IMAGE_FIELDS:
            value = getattr(body, name)
            if value is not None:
                path = folder / name
                path.write_bytes(decode_base64(value, name))
                uploads[name] = path
                values[name] = str(path)
        registry.resolve(body.model)  # a bad name is a 422 now, not when its turn comes
        return GenerationRequest(**values).validated()
    except BadInput as e:
        raise BadInput(_api_message(str(e), uploads)) from None


def _api_message(message: str, uploads: dict[str, Path]) -> str:
    for path in uploads.values():  # never show the temporary path
        message = message.replace(repr(str(path)), "(uploaded)").replace(str(path), "(uploaded)")
    return re.sub(r"--([a-z][a-z-]*)", lambda m: _API_NAMES.get(m.group(0), m.group(1).replace("-", "_")), message)


# ---------------------------------------------------------------------------------------------
# The worker: one generation at a time on the device, a bounded waiting line


@dataclass
class Job:
    req: GenerationRequest
    folder: tempfile.TemporaryDirectory
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    credits: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(EVENT_BUFFER))
    cancel: threading.Event = field(default_factory=threading.Event)

    def push(self, item: tuple, wait: bool = True) -> None:
        """Hand ITEM to the client's coroutine; with WAIT, first wait until it is not too far behind."""
        while wait and not self.credits.acquire(timeout=0.2):
            if self.cancel.is_set():
                raise KeyboardInterrupt
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    """A single thread that runs the jobs of a bounded queue, so runs never share the device."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.running = False
        # completed, cancelled (client left), invalid (a 422 found once the model was loaded), failed,
        # rejected (503: the waiting line was full)
        self.counts = {"completed": 0, "cancelled": 0, "invalid": 0, "failed": 0, "rejected": 0}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="sdstream-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue JOB; False (and counted as rejected) when the waiting line is full."""
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            self._count("rejected")
            return False

    def state(self) -> dict:
        return {"running": self.running, "waiting": self.jobs.qsize(), "max_queue": self.max_queue, **self.counts}

    def stop(self) -> None:
        self.jobs.put(None)

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.running = True
            outcome = "failed"
            try:
                if job.cancel.is_set():  # its client left while it waited
                    raise KeyboardInterrupt
                generate(job)
                outcome = "completed"
            except KeyboardInterrupt:
                outcome = "cancelled"
            except BadInput as e:  # a check that needs the model (size vs VAE factor, inject step range)
                outcome = "invalid"
                job.push(("error", 422, _api_message(str(e), {}), e.hint), wait=False)
            except SdstreamError as e:
                job.push(("error", 500, str(e), e.hint), wait=False)
            except Exception as e:
                job.push(("error", 500, f"{type(e).__name__}: {e}", None), wait=False)
            finally:
                self.running = False
                self._count(outcome)
                job.folder.cleanup()
                try:
                    job.push(("end",), wait=False)
                except RuntimeError:  # the server is shutting down: its event loop is closed
                    pass


def generate(job: Job) -> None:
    """Load (cached), check, then denoise with the library's loop, pushing one event per step."""
    from .loop import denoise
    from .preview import vae_decode
    from .runner import prepare

    req = job.req
    source = registry.resolve(req.model)
    ready = prepare(req, source)
    pipe, width, height, previewer = ready.pipe, ready.width, ready.height, ready.previewer
    job.push(("ready",), wait=False)  # from here on the answer is a 200 stream

    started, ev = time.perf_counter(), None
    for ev in denoise(pipe, req, cancelled=job.cancel.is_set):
        picture = None
        if previewer is not None:
            picture = _b64(_frame(previewer(ev), (width, height)), "JPEG")
        job.push(("event", {"step": ev.step, "total_steps": ev.total_steps, "image": picture,
                            "progress": round(ev.progress, 2), "done": False, "model": source.name,
                            "timestep": ev.timestep}))
    final = vae_decode(pipe, ev.latents)
    job.push(("event", {"step": ev.step, "total_steps": ev.total_steps, "image": _b64(final, "JPEG"),
                        "png": _b64(final, "PNG"), "progress": 100.0, "done": True, "model": source.name,
                        "seed": req.seed, "width": width, "height": height,
                        "seconds": round(time.perf_counter() - started, 3)}))


def _frame(picture, size: tuple[int, int]):
    """A preview tensor (uint8 H, W, 3 on the device) as a PIL image at the output size."""
    from PIL import Image

    image = Image.fromarray(picture.cpu().numpy())
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def _b64(image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Safety: request body size


class BodyLimit:
    """Refuse (413) a request body over LIMIT bytes, declared or streamed, before the app reads it."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        too_large = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # the body is small by definition: read it all, then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------------
# The app


async def _next(job: Job, request: Request) -> tuple | None:
    """The worker's next item for JOB, or None once the client has disconnected."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.25)
            if done:
                return getter.result()
            if await request.is_disconnected():
                return None
    finally:
        if not getter.done():
            getter.cancel()


def _sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(
    device: str = "auto",
    max_queue: int = DEFAULT_MAX_QUEUE,
    allowed_hosts: tuple[str, ...] = (),
    models: tuple[str, ...] = (),
    any_model: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> FastAPI:
    """The FastAPI app. ALLOWED_HOSTS extends the loopback names accepted in the Host header.

    Clients may ask for the aliases and MODELS (what --preload named); ANY_MODEL lets them name any
    Hugging Face repo id or server-side folder as well.
    """
    from PIL import Image

    from .loader import loaded_models, resolve_device

    if max_queue < 1:
        raise BadInput(f"--max-queue {max_queue} is not allowed: give a whole number of at least 1")
    if max_image_pixels:
        Image.MAX_IMAGE_PIXELS = max_image_pixels  # this process serves; open_image refuses bigger pictures
    device = resolve_device(device)
    worker = Worker(max_queue)
    served = set(registry.ALIASES) | set(models)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(
        title="sdstream",
        version=__version__,
        description="Stream every denoising step of Stable Diffusion as server-sent events.",
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*LOCAL_HOSTS, *allowed_hosts])

    def models_loaded() -> list[str]:
        by_repo = {repo: alias for alias, (repo, _, _) in registry.ALIASES.items()}
        names = []
        for key, dev, dtype in loaded_models():
            kind, _, location = key.partition(":")
            names.append({"name": "tiny" if kind == "tiny" else by_repo.get(location, location),
                          "device": dev, "dtype": dtype})
        return names

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}", "errors": _plain(errors)},
                            status_code=422)

    @app.get("/", summary="Service info")
    def info() -> dict:
        return {
            "status": "running",
            "service": "sdstream",
            "version": __version__,
            "device": device,
            "loaded_models": [m["name"] for m in models_loaded()],
            "available_models": [*registry.ALIASES, *(m for m in models if m not in registry.ALIASES)],
            "default_model": registry.default_model(),
            "masks": list(masks.PATTERNS),
            "schedulers": list(SCHEDULERS),
            "prompt_image": prompt_image_supported(),
        }

    @app.get("/health", summary="Liveness, queue and run counters")
    def health() -> dict:
        return {"status": "ok", "device": device, "queue": worker.state(), "loaded_models": models_loaded()}

    @app.get("/diagnostics", summary="System, library and GPU facts (as `sdstream diagnostics --json`)")
    def diagnostics() -> dict:
        from . import diagnostics as diag

        return diag.collect()

    @app.get("/ui", response_class=HTMLResponse, summary="A page that drives /generate", include_in_schema=True)
    def ui() -> HTMLResponse:
        return HTMLResponse(resources.files("sdstream").joinpath("static/ui.html").read_text(encoding="utf-8"))

    @app.post(
        "/generate",
        summary="Generate, streaming every step as server-sent events",
        response_class=StreamingResponse,
        responses={
            200: {"description": "`data: {step, total_steps, image, progress, done: false, model, timestep}` per "
                                 "step, then `data: {..., done: true, image, png, seed, width, height, seconds}`, "
                                 "then `data: [DONE]`. A failure mid-run is `data: {error}` before [DONE].",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            422: {"description": "A bad value: `{detail: one-line message}`"},
            500: {"description": "The run could not start (e.g. the model is not on disk): `{detail, hint}`"},
            503: {"description": "The waiting line is full; retry later"},
        },
    )
    async def generate_route(body: GenerateBody, request: Request):
        from starlette.concurrency import run_in_threadpool

        if not any_model and body.model is not None and body.model not in served:
            return JSONResponse({"detail": f"model {body.model!r} is not served here: give one of "
                                           f"{', '.join(sorted(served))} (or start the server with --any-model)"},
                                status_code=422)
        folder = tempfile.TemporaryDirectory(prefix="sdstream-serve-")
        try:
            req = await run_in_threadpool(build_request, body, Path(folder.name), device)
        except BadInput as e:
            folder.cleanup()
            return JSONResponse({"detail": str(e)}, status_code=422)
        except BaseException:
            folder.cleanup()
            raise
        job = Job(req, folder, asyncio.get_running_loop())
        if not worker.submit(job):
            folder.cleanup()
            return JSONResponse({"detail": f"busy: {worker.max_queue} request(s) already waiting; retry later"},
                                status_code=503, headers={"Retry-After": "5"})
        try:
            first = await _next(job, request)  # waits its turn, then loading and the model checks
        except BaseException:
            job.cancel.set()
            raise
        if first is None:
            job.cancel.set()
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        if first[0] == "error":
            _, status, detail, hint = first
            return JSONResponse({"detail": detail, "hint": hint}, status_code=status)

        async def stream():
            try:
                while (item := await _next(job, request)) is not None:
                    if item[0] == "event":
                        job.credits.release()
                        yield _sse(item[1])
                    elif item[0] == "error":
                        yield _sse({"error": item[2], "hint": item[3], "done": False})
                    elif item[0] == "end":
                        yield _sse("[DONE]")
                        return
            finally:
                job.cancel.set()  # the client left (or the run is over): stop at the next step

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _plain(errors: list) -> list:
    """Pydantic's error dicts with only JSON-safe values (ctx may hold exceptions)."""
    return [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]


def preload(models: list[str], device: str) -> list[str]:
    """Load MODELS on DEVICE before serving; BadInput / SdstreamError when one can't be had."""
    from .loader import load_pipeline, quiet_libraries, resolve_device, resolve_dtype

    sources = [registry.resolve(m) for m in models]  # every name checked before anything loads
    quiet_libraries()
    dev = resolve_device(device)
    for source in sources:
        load_pipeline(source, dev, resolve_dtype("auto", dev))
    return [s.name for s in sources]
