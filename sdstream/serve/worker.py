"""The server's one worker thread: one run at a time on the device, through the orchestrator like every run,
and a bounded waiting line. A job whose client leaves is dropped from the line at once (its slot is free
again) or, while it runs, cancelled before its next step.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, SdstreamError
from ..record.sinks import Sink
from .schema import Limits, api_message

JPEG_QUALITY = 90
EVENT_BUFFER = 8  # events a slow client may fall behind before the run waits for it


@dataclass
class Job:
    req: object  # the validated GenerationRequest
    inputs: object  # its pictures, decoded
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    credits: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(EVENT_BUFFER))
    cancel: threading.Event = field(default_factory=threading.Event)

    def push(self, item: tuple, wait: bool = True) -> None:
        """Hand ITEM to the client's coroutine; with WAIT, first wait until it is not too far behind."""
        while wait and not self.credits.acquire(timeout=0.2):
            if self.cancel.is_set():
                raise KeyboardInterrupt
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the server is shutting down: its event loop is closed
            pass


class Stream(Sink):
    """A run's events as the original service's SSE payloads: a JPEG of the frame with each step, then the
    final image (JPEG and PNG). The step fields are the shared ones of `--json` (Step.to_dict). With `attention`,
    a step with a frame also carries `attention`: word -> a PNG of its heat map over the frame (attention's sink)."""

    pictures = True
    heat_maps = True  # a run with --attention needs no run folder: its heat maps come here

    def __init__(self, job: Job, limits: Limits):
        self.job, self.limits = job, limits

    def start(self, info) -> None:
        self.limits.check_run(info.total_steps - info.first_step + 1, info.width, info.height)
        self.model, self.started, self.size = info.model.name, time.perf_counter(), (info.width, info.height)
        self.job.push(("ready",), wait=False)  # from here on the answer is a 200 stream

    def step(self, step) -> None:
        picture = None
        if step.picture is not None:
            picture = _b64(_frame(step.picture, self.size), "JPEG")
        data = {k: v for k, v in step.to_dict().items() if k not in ("event", "frame")}
        if step.heat is not None:  # (at the frame's own size, as decoded: the page scales it beside the frame)
            data["attention"] = {word: _b64(_frame(heat, None), "PNG") for word, heat in step.heat.items()}
        self.job.push(("event", {**data, "image": picture, "done": False, "model": self.model}))

    def finish(self, info, outcome) -> None:
        if outcome.status != "complete":
            return
        image = outcome.image
        self.job.push(("event", {
            "step": info.total_steps, "total_steps": info.total_steps, "image": _b64(image, "JPEG"),
            "png": _b64(image, "PNG"), "progress": 100.0, "done": True, "model": self.model,
            "seed": info.request.seed, "width": info.width, "height": info.height,
            "seconds": round(time.perf_counter() - self.started, 3)}))


class Worker:
    """A single thread that runs the jobs of a bounded waiting line, so runs never share the device."""

    def __init__(self, max_queue: int, limits: Limits, save: Path | None = None):
        self.max_queue, self.limits, self.save = max_queue, limits, save
        self.waiting: collections.deque[Job] = collections.deque()
        self.running = False
        # completed, cancelled (client left), invalid (a 422 found once the model was loaded), failed,
        # rejected (503: the waiting line was full)
        self.counts = {"completed": 0, "cancelled": 0, "invalid": 0, "failed": 0, "rejected": 0}
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="sdstream-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue JOB; False (and counted as rejected) when the waiting line is full."""
        with self._changed:
            if len(self.waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                return False
            self.waiting.append(job)
            self._changed.notify()
            return True

    def withdraw(self, job: Job) -> None:
        """JOB's client left: stop it, and free its place in the line if it has not started."""
        job.cancel.set()
        with self._changed:
            if job in self.waiting:
                self.waiting.remove(job)
                self.counts["cancelled"] += 1

    def state(self) -> dict:
        with self._changed:
            return {"running": self.running, "waiting": len(self.waiting), "max_queue": self.max_queue,
                    **self.counts}

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()

    def _next(self) -> Job | None:
        with self._changed:
            while not self.waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return None
            self.running = True
            return self.waiting.popleft()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            outcome = "failed"
            try:
                self._run(job)
                outcome = "completed"
            except KeyboardInterrupt:
                outcome = "cancelled"
            except BadInput as e:  # a check that needs the model (size vs VAE factor), or a bound
                outcome = "invalid"
                job.push(("error", 422, api_message(str(e)), e.hint), wait=False)
            except SdstreamError as e:
                job.push(("error", 500, str(e), e.hint), wait=False)
            except Exception as e:
                job.push(("error", 500, f"{type(e).__name__}: {e}", None), wait=False)
            finally:
                with self._changed:
                    self.running = False
                    self.counts[outcome] += 1
                job.push(("end",), wait=False)

    def _run(self, job: Job) -> None:
        from ..record.orchestrator import run
        from ..record.rundir import RunFolder

        sinks = [RunFolder(None, root=self.save)] if self.save else []
        run(job.req, [*sinks, Stream(job, self.limits)], inputs=job.inputs, cancelled=job.cancel.is_set)


def _frame(picture, size: tuple[int, int] | None):
    """A preview tensor (uint8 H, W, 3 on the device) as a PIL image at the output size (SIZE; None: its own)."""
    from PIL import Image

    image = Image.fromarray(picture.cpu().numpy())
    return image if size is None or image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def _b64(image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")
