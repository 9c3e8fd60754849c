"""Writing files: atomically (a temporary name in the same folder, then a rename, so a reader or a crash never
sees half a file), and frames off the loop's thread.
"""

from __future__ import annotations

import json
import os
import queue
import re
import tempfile
import threading
from datetime import datetime
from pathlib import Path

from ..errors import SdstreamError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def slug(text: str, limit: int = 40) -> str:
    """A filesystem-safe fragment of TEXT: lowercase ascii words joined by '-', bounded length."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words)[:limit].strip("-") or "run"


def new_dir(root: Path, name: str, create: bool = False) -> Path:
    """ROOT/<time>-NAME, or with -2, -3… appended: a folder name nothing has taken. With CREATE the folder is
    made here, exclusively: two runs started at the same moment with the same name get different folders."""
    base = root / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"
    path, n = base, 1
    while True:
        if not create and not os.path.lexists(path):
            return path
        if create:
            root.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()
                return path
            except FileExistsError:
                pass
        n += 1
        path = base.with_name(f"{base.name}-{n}")


def atomic_write(path: Path, write) -> None:
    """Call write(file_object) on a temp file next to PATH, then rename it over PATH."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the user's usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(image, path: Path, fmt: str = "png", pnginfo=None, fast: bool = False) -> None:
    """Write IMAGE atomically; FAST trades about a tenth more bytes for PNG encoding 2-3 times quicker."""
    kwargs = {"pnginfo": pnginfo} if pnginfo is not None else {}
    if fast and fmt == "png":
        kwargs["compress_level"] = 1
    if fmt in ("jpg", "webp"):
        kwargs["quality"] = 90
    atomic_write(path, lambda f: image.save(f, format=_PIL_FORMAT[fmt], **kwargs))


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


class FrameWriter:
    """Encodes and writes frames on background threads; the loop only hands over pictures.

    Image encoding (zlib, libwebp) releases the GIL, so a few threads keep up with a fast GPU
    where one could not. The queue is bounded so a slow disk applies back-pressure instead of
    filling memory. The first write error is re-raised on the loop's thread at the next
    submit() or at close().
    """

    def __init__(self, folder: Path, fmt: str, depth: int = 8, threads: int = min(4, os.cpu_count() or 1),
                 written=lambda step, path: None, size: tuple[int, int] | None = None):
        self.folder, self.fmt, self.written = folder, fmt, written  # written(step, path): a frame is on disk
        self.size = size  # (width, height) the frames are scaled to, on the writer's threads
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._work, name="sdstream-frames", daemon=True) for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:04d}.{self.fmt}"

    def submit(self, step: int, picture) -> Path:
        """Queue PICTURE (a PIL image, or a uint8 (H, W, 3) tensor on any device) for step STEP.

        A CUDA tensor is copied into pinned host memory without blocking the loop; the writer
        thread waits for that copy alone.
        """
        self._raise_if_failed()
        path = self.path_for(step)
        self._queue.put((step, path, _to_host(picture)))
        return path

    def close(self) -> None:
        """Wait until every submitted frame is on disk; raise the first write error."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._raise_if_failed()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after a failure, drain without writing
                step, path, (picture, copied) = item
                try:
                    save_image(_scaled(_to_pil(picture, copied), self.size), path, self.fmt, fast=True)
                    self.written(step, path)
                except BaseException as e:
                    self._error = self._error or e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise SdstreamError(f"could not write frame: {self._error}") from self._error


def _to_host(picture):
    """(host picture, CUDA event marking the end of its copy or None)."""
    if not hasattr(picture, "is_cuda"):  # already a PIL image
        return picture, None
    if not picture.is_cuda:
        return picture.cpu(), None
    import torch

    host = torch.empty(picture.shape, dtype=picture.dtype, pin_memory=True)
    host.copy_(picture, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _scaled(image, size):
    """IMAGE at SIZE: smooth both ways (a latent-size approx frame enlarged, a full-size one reduced)."""
    if size is None or image.size == tuple(size):
        return image
    from PIL import Image

    larger = size[0] > image.size[0]
    return image.resize(size, Image.Resampling.BILINEAR if larger else Image.Resampling.LANCZOS)


def _to_pil(picture, copied):
    from PIL import Image

    if copied is not None:
        copied.synchronize()
    return picture if isinstance(picture, Image.Image) else Image.fromarray(picture.numpy())
