"""`sdstream serve`: the original HTTP streaming API, on the same core (extra: sdstream[serve]).

    POST /generate   JSON body -> text/event-stream: one `data: {...}` per step, a final
                     `data: {..., "done": true}`, then `data: [DONE]`
    GET  /           service info, the options (for /ui) and the limits
    GET  /health     queue and counters          GET /diagnostics
    GET  /ui         a page that drives /generate GET /openapi.json (and /docs)

The body (schema.py) becomes a GenerationRequest checked by the same declarations as the CLI's; a bad value is
a 422 naming its field. The run goes through the orchestrator on one worker thread (worker.py). Only the serve
command imports this module.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__, masks
from ..core.schedulers import SCHEDULERS
from ..errors import BadInput
from ..models import registry
from .schema import SERVED, GenerateBody, Limits, build_request
from .worker import Job, Worker

DEFAULT_MAX_QUEUE = 8  # requests waiting behind the running one
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
KEEPALIVE_SECONDS = 15.0  # a comment line while a stream is idle (a slow step), so proxies keep it open


async def _first(job: Job, request: Request) -> tuple | None:
    """The worker's first item for JOB (ready, or an error), or None when the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    getter, gone = asyncio.ensure_future(job.events.get()), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
        return getter.result() if getter in done else None
    finally:
        for task in (getter, gone):
            task.cancel()


def _sse(data) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data))


def create_app(
    device: str = "auto",
    max_queue: int = DEFAULT_MAX_QUEUE,
    allowed_hosts: tuple[str, ...] = (),
    models: tuple[str, ...] = (),
    any_model: bool = False,
    limits: Limits | None = None,
    save: Path | None = None,
) -> FastAPI:
    """The FastAPI app. ALLOWED_HOSTS extends the loopback names accepted in the Host header.

    Clients may ask for the aliases and MODELS (what --preload named); ANY_MODEL lets them name any
    Hugging Face repo id or server-side folder as well. SAVE: each run also into a run folder under it.
    """
    from PIL import Image

    from ..models.loader import loaded_models, resolve_device

    limits = limits or Limits()
    if max_queue < 1:
        raise BadInput(f"--max-queue {max_queue} is not allowed: give a whole number of at least 1")
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # this process serves; open_image refuses bigger pictures
    device = resolve_device(device)
    worker = Worker(max_queue, limits, save)
    served = set(registry.ALIASES) | set(models)
    default_model = models[0] if models else None  # a request naming no model gets what the server preloaded

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="sdstream", version=__version__, lifespan=lifespan, max_body_size=limits.max_body_bytes,
                  description="Stream every denoising step of Stable Diffusion as server-sent events.")
    app.state.worker = worker
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*LOCAL_HOSTS, *allowed_hosts])

    def models_loaded() -> list[dict]:
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
        plain = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]  # JSON-safe
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}", "errors": plain}, status_code=422)

    @app.api_route("/", methods=["GET", "HEAD"], summary="Service info, the options and the limits")
    def info() -> dict:
        return {
            "status": "running",
            "service": "sdstream",
            "version": __version__,
            "device": device,
            "loaded_models": [m["name"] for m in models_loaded()],
            "available_models": [*registry.ALIASES, *(m for m in models if m not in registry.ALIASES)],
            "default_model": default_model or registry.default_model(),
            "masks": list(masks.PATTERNS),
            "schedulers": list(SCHEDULERS),
            "prompt_image": True,
            "options": [opt.describe() for opt in SERVED.values()],
            "limits": asdict(limits),
        }

    @app.api_route("/health", methods=["GET", "HEAD"], summary="Liveness, queue and run counters")
    def health() -> dict:
        return {"status": "ok", "device": device, "queue": worker.state(), "loaded_models": models_loaded()}

    @app.get("/diagnostics", summary="System, library and GPU facts (as `sdstream diagnostics --json`)")
    def diagnostics() -> dict:
        from .. import diagnostics as diag

        return diag.collect()

    @app.get("/ui", response_class=HTMLResponse, summary="A page that drives /generate")
    def ui() -> HTMLResponse:
        return HTMLResponse(resources.files("sdstream").joinpath("static/ui.html").read_text(encoding="utf-8"))

    @app.post(
        "/generate",
        summary="Generate, streaming every step as server-sent events",
        # not response_class=EventSourceResponse: that makes FastAPI expect a generator, and this route first
        # waits for the run to start so that a request refused then is a plain 422/500 answer
        responses={
            200: {"description": "`data: {step, total_steps, image, progress, timestep, injected, done: false, "
                                 "model}` per step, then `data: {..., done: true, image, png, seed, width, height, "
                                 "seconds}`, then `data: [DONE]`. A failure mid-run is `data: {error}` before [DONE].",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            413: {"description": "The body is over the server's upload limit (GET / `limits.max_body_bytes`)"},
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
        try:  # the checks that need no model, and the pictures decoded (off the event loop)
            req, inputs = await run_in_threadpool(build_request, body, device, limits, default_model)
            await run_in_threadpool(registry.check_available, req)
        except BadInput as e:
            from .schema import api_message

            return JSONResponse({"detail": api_message(str(e))}, status_code=422)
        job = Job(req, inputs, asyncio.get_running_loop())
        if not worker.submit(job):
            return JSONResponse({"detail": f"busy: {worker.max_queue} request(s) already waiting; retry later"},
                                status_code=503, headers={"Retry-After": "5"})
        first = None
        try:
            first = await _first(job, request)  # waits its turn, then loading and the model checks
        finally:
            if first is None:  # the client left before its run started: its place in the line is free again
                worker.withdraw(job)
        if first is None:
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        if first[0] == "error":
            _, status, detail, hint = first
            return JSONResponse({"detail": detail, "hint": hint}, status_code=status)

        async def stream():
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(job.events.get(), KEEPALIVE_SECONDS)
                    except TimeoutError:
                        yield KEEPALIVE_COMMENT
                        continue
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

        return EventSourceResponse(stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def preload(models: list[str], device: str) -> list[str]:
    """Load MODELS on DEVICE before serving; BadInput / SdstreamError when one can't be had."""
    from ..models.loader import load_pipeline, quiet_libraries, resolve_device, resolve_dtype

    sources = [registry.resolve(m) for m in models]  # every name checked before anything loads
    quiet_libraries()
    dev = resolve_device(device)
    for source in sources:
        load_pipeline(source, dev, resolve_dtype("auto", dev))
    return [s.name for s in sources]
