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


class Writer:
    """Writes files on background threads; the loop only hands over what goes in them (frames, tensors, state).

    Encoding (zlib, libwebp, safetensors) releases the GIL, so a few threads keep up with a fast GPU where one
    could not. The queue is bounded so a slow disk applies back-pressure instead of filling memory. The first
    write error is re-raised on the loop's thread at the next submit() or at close(). WRITTEN(kind, step, path)
    is called (on a writer thread) once a file is on disk.
    """

    def __init__(self, depth: int = 8, threads: int = min(4, os.cpu_count() or 1),
                 written=lambda kind, step, path: None):
        self.written = written
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._work, name="sdstream-writer", daemon=True) for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, path: Path, payload, encode, kind: str = "frame", step: int = 0) -> Path:
        """Queue PAYLOAD (a PIL image, a tensor or a dict of tensors, on any device) for PATH, where ENCODE(payload)
        makes its bytes on a writer thread.

        Tensors on a GPU are copied into pinned host memory without blocking the loop; the writer thread waits
        for that copy alone.
        """
        self._raise_if_failed()
        self._queue.put((kind, step, path, encode, *_to_host(payload)))
        return path

    def close(self) -> None:
        """Wait until every submitted file is on disk; raise the first write error."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._raise_if_failed()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after a failure, drain without writing
                kind, step, path, encode, payload, copied = item
                try:
                    if copied is not None:
                        copied.synchronize()
                    data = encode(payload)
                    atomic_write(path, lambda f, data=data: f.write(data))
                    self.written(kind, step, path)
                except BaseException as e:
                    self._error = self._error or e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise SdstreamError(f"could not write {getattr(self._error, 'filename', None) or 'a file'}: "
                                f"{self._error}") from self._error


def picture_encoder(fmt: str, size: tuple[int, int] | None = None):
    """ENCODE for Writer.submit: a uint8 (H, W, 3) tensor or a PIL image as FMT bytes, scaled to SIZE."""
    import io

    def encode(picture) -> bytes:
        from PIL import Image

        image = picture if isinstance(picture, Image.Image) else Image.fromarray(picture.numpy())
        buf = io.BytesIO()
        kwargs = {"compress_level": 1} if fmt == "png" else {"quality": 90}  # PNG: 2-3x quicker, a tenth bigger
        _scaled(image, size).save(buf, format=_PIL_FORMAT[fmt], **kwargs)
        return buf.getvalue()

    return encode


def _to_host(payload):
    """(host payload, CUDA event marking the end of its copies or None): tensors, or dicts of them, off the GPU."""
    if isinstance(payload, dict):
        copies = {k: _host_copy(v) for k, v in payload.items()}
        events = [e for _, e in copies.values() if e is not None]
        return {k: t for k, (t, _) in copies.items()}, events[-1] if events else None
    return _host_copy(payload)


def _host_copy(tensor):
    if not hasattr(tensor, "is_cuda"):  # a PIL image
        return tensor, None
    if not tensor.is_cuda:
        return tensor.cpu(), None
    import torch

    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
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
