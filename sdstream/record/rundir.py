"""Run folders: the one module that writes them (RunFolder, a sink) and reads them (read_run, open_run).

    RUN/run.json             the manifest; its "files" lists every file sdstream wrote into the folder
    RUN/final.png            the image, with its parameters as PNG text
    RUN/frames/step-NNNN.png a picture per step (or every Nth)
    RUN/attention/...        --attention's maps and heat maps (record/attention.py, written through write())

A folder is known as a run by its manifest (written by sdstream, listing its files), never by file names:
--overwrite replaces only what that list names, refuses a folder holding anything else, and never follows a
link. While a run writes its folder it holds an exclusive lock on it (flock on the folder itself): a second
run into it is refused at once, and a reader tells a run that died (status "running", no lock) from one that
is running. run.json tells the truth as the run goes: frames are listed once they are on disk (rewritten at
most once a second, and at the end), and every way a run ends is recorded, with its error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import BadInput, SdstreamError
from .files import Writer, atomic_write, new_dir, picture_encoder, save_image, slug, write_json
from .sinks import Outcome, RunInfo, Sink, Step, error_text

MANIFEST = "run.json"
FINAL = "final.png"
FRAMES = "frames"
TENSORS = "tensors"  # tensors/step-NNNN.safetensors: --save-tensors
STATE = "state"  # state/step-NNNN.safetensors: what to continue from after step NNNN
ATTENTION = "attention"  # attention/step-NNNN.safetensors, attention/<word>/step-NNNN.png: --attention
OWN_FOLDERS = (FRAMES, TENSORS, STATE, ATTENTION)  # the folders of per-step files a run makes
TENSOR_NOTICE_BYTES = 256 * 2**20  # --save-tensors says how much it will write past this
FLUSH_SECONDS = 1.0  # run.json is rewritten during a run at most this often (frames so far, heartbeat)
RESERVE = 4096  # trailing spaces in run.json: room for its last word when the disk is full


# ------------------------------------------------------------------------------------------ ownership


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "sdstream" in data else None


def listed_files(manifest: dict) -> set[str]:
    """The files (relative paths) a run's manifest says sdstream wrote into its folder."""
    files = set(manifest.get("files") or ())
    files |= {str(f.get("file")) for f in manifest.get("frames") or () if isinstance(f, dict)}  # older manifests
    if manifest.get("image"):
        files.add(str(manifest["image"]))
    return files | {MANIFEST}


def _step_file(rel: str) -> bool:
    """Whether REL is a per-step file in one of the folders a run makes (frames/step-0003.png,
    attention/red/step-0003.png): a run killed between two rewrites of run.json leaves some unlisted."""
    parts = Path(rel).parts
    return (len(parts) >= 2 and parts[0] in OWN_FOLDERS and (len(parts) == 2 or parts[0] == ATTENTION)
            and re.fullmatch(r"step-\d{4,}\.[a-z]+", parts[-1]) is not None)


def foreign_entries(path: Path, listed: set[str]) -> list[str]:
    """What PATH holds that LISTED does not name: other files, unlisted folders, links (never followed).
    A listed name ending in / is a folder the run made; the per-step files of a run's own folders are its own
    even where a killed run did not get to list them."""
    folders = {f.rstrip("/") for f in listed if f.endswith("/")} | {str(Path(f).parent) for f in listed} - {"."}
    folders |= {str(p) for f in folders for p in Path(f).parents if str(p) != "."}
    found = []

    def walk(folder: Path, rel: str) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    found.append(f"{name} (a link)")
                elif entry.is_dir(follow_symlinks=False):
                    parts = Path(name).parts
                    if name in folders or name in OWN_FOLDERS or (len(parts) == 2 and parts[0] == ATTENTION):
                        walk(Path(entry.path), name)
                    else:
                        found.append(name + "/")
                elif name not in listed and not _step_file(name) and not (
                        entry.name.startswith(".") and entry.name.endswith(".tmp")):
                    found.append(name)  # (.name.*.tmp: a temporary file of an interrupted atomic write)

    walk(path, "")
    return sorted(found)


def check_folder(path: Path, overwrite: bool, option: str = "--out", locked_by_us: bool = False) -> None:
    """BadInput unless PATH can become a run folder now: absent or empty, or (with OVERWRITE) an earlier run
    holding only its own files and not being written; and writable (tried, not guessed)."""
    long = next((part for part in Path(path).parts if len(part.encode()) > 255), None)
    if long is not None:
        raise BadInput(f"{option} {str(path)!r}: the name {long[:40]!r}… is {len(long.encode())} bytes long; a folder "
                       "name can have at most 255")
    if os.path.lexists(path) and not path.is_dir():
        raise BadInput(f"{option} {str(path)!r} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise BadInput(f"{option} {str(path)!r} is not empty; pass --overwrite or choose another folder")
        manifest = _read_manifest(path)
        if manifest is None:
            raise BadInput(f"{option} {str(path)!r} is not an sdstream run folder (no run.json of sdstream's); "
                           "--overwrite only replaces an earlier run")
        foreign = foreign_entries(path, listed_files(manifest))
        if foreign:
            raise BadInput(f"{option} {str(path)!r} holds files sdstream did not write ({', '.join(foreign[:3])}); "
                           "--overwrite only replaces an earlier run")
        if not locked_by_us and is_locked(path):
            raise BadInput(f"{option} {str(path)!r} is being written by another sdstream run right now")
    probe_writable(path, option)


def probe_writable(path: Path, option: str = "--out") -> None:
    """Create and remove a file in PATH (or its nearest existing parent): only trying tells (root, read-only mounts)."""
    parent = Path(path).absolute()
    while not parent.exists():
        parent = parent.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".sdstream-probe-", dir=parent)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise BadInput(f"{option} {str(path)!r} cannot be written: {e.strerror or e} ({parent})") from None


def lock(path: Path) -> int | None:
    """An exclusive lock on folder PATH (a file descriptor to keep open), or None when someone else holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def is_locked(path: Path) -> bool:
    """Whether a live sdstream process is writing folder PATH."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def clear(path: Path, manifest: dict) -> None:
    """Remove the files MANIFEST lists from PATH, and the folders that leaves empty; nothing else, no link followed."""
    listed = sorted(listed_files(manifest), key=lambda f: f.count("/"), reverse=True)
    for name in listed:
        target = path / name
        if target.is_file() and not target.is_symlink():
            target.unlink()
    made = {Path(f) for f in listed if f.endswith("/")} | {Path(f).parent for f in listed}
    for folder in sorted(made - {Path(".")}, key=lambda p: len(p.parts), reverse=True):
        try:
            (path / folder).rmdir()
        except OSError:
            pass
    for stale in path.rglob(".*.tmp"):
        stale.unlink(missing_ok=True)
    for own in OWN_FOLDERS:  # step files a killed run did not list, and the folders they leave empty
        if (path / own).is_dir() and not (path / own).is_symlink():
            for step in sorted((path / own).rglob("step-*"), key=lambda p: len(p.parts), reverse=True):
                if step.is_file() and not step.is_symlink() and _step_file(str(step.relative_to(path))):
                    step.unlink()
            for folder in sorted((p for p in (path / own).rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                 reverse=True) + [path / own]:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def register_files(run_dir: Path, names: list[str]) -> None:
    """Add NAMES (files a viewer wrote into a run folder: animation.gif, sheet.png) to its manifest's list."""
    manifest = _read_manifest(run_dir)
    if manifest is None:
        return
    files = set(manifest.get("files") or ()) | set(names)
    write_json(run_dir / MANIFEST, {**manifest, "files": sorted(files)})


def _write_in_place(path: Path, text: bytes) -> bool:
    """TEXT over the file PATH, padded with spaces to its size, without allocating: False if it doesn't fit."""
    try:
        size = path.stat().st_size
        if len(text) > size:
            return False
        with open(path, "r+b") as f:
            f.write(text + b" " * (size - len(text)))
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False


def write_failed(path: Path, req, error: BaseException, seconds: float) -> None:
    """A run.json saying why a run failed before it started (the model did not load), in its folder cleared of
    any earlier run: for batches, whose summary points at every line's folder."""
    try:
        earlier = _read_manifest(path)
        if earlier is not None:
            clear(path, earlier)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / MANIFEST, {
            "sdstream": __version__, "status": "failed", "error": error_text(error), "request": req.to_dict(),
            "seed": req.seed, "timings": {"total": round(seconds, 4)}, "frames": [], "image": None,
            "files": [MANIFEST], "created": _now(), "finished": _now(),
        })
    except OSError:  # the folder itself is the problem; the batch summary still records the error
        pass


# ------------------------------------------------------------------------------------------ writing a run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunFolder(Sink):
    """A run's folder, as a sink. check() and claim() come before the model loads (claim creates and locks it);
    the sink methods write frames, run.json and final.png; the lock goes when the run ends."""

    pictures = True

    def __init__(self, path: str | Path | None = None, overwrite: bool = False, root: Path = Path("outputs"),
                 resume: bool = False):
        self.path = Path(path) if path is not None else None
        self.overwrite, self.root, self.resume = overwrite, root, resume  # resume: go on in the run's own folder
        self._fd: int | None = None
        self._created = False
        self._written: list[tuple[str, int, str]] = []  # (kind, step, file) on disk, from the writer's threads
        self._written_lock = threading.Lock()
        self._timesteps: dict[int, int] = {}
        self.manifest: dict = {}
        self.writer: Writer | None = None
        self._folders: set[str] = set()  # the folders write() made ("attention/")
        self._kept: set[str] = set()  # on resume: the files it wrote before, other than frames, tensors and states
        self._annotated: set[str] = set()  # run.json's entries that other sinks own (annotate())

    # ---------------------------------------------------------------- before the model loads

    def check(self, locked_by_us: bool = False) -> None:
        if self.path is None:
            probe_writable(self.root)
        elif self.resume:  # its own folder: sdstream's, holding only what it listed, and not being written
            manifest = _read_manifest(self.path)
            foreign = foreign_entries(self.path, listed_files(manifest)) if manifest else ["no run.json of sdstream's"]
            if foreign:
                raise BadInput(f"run {str(self.path)!r} holds files sdstream did not write ({', '.join(foreign[:3])})")
            if not locked_by_us and is_locked(self.path):
                raise BadInput(f"run {str(self.path)!r} is being written by another sdstream run right now")
        else:
            check_folder(self.path, self.overwrite, locked_by_us=locked_by_us)

    def claim(self, req) -> None:
        """Check, create and lock the folder (a default one is new and unique). BadInput when it can't be this run's."""
        self.check()
        if self.path is None:
            self.path = new_dir(self.root, f"{slug(req.prompt)}-{req.seed}", create=True)
            self._created = True
        else:
            self._created = not self.path.exists()
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BadInput(f"--out {str(self.path)!r} cannot be written: {e.strerror or e}") from None
        self._fd = lock(self.path)
        if self._fd is None:
            raise BadInput(f"--out {str(self.path)!r} is being written by another sdstream run right now")
        self.check(locked_by_us=True)  # again, now that nobody else can change it

    def release(self) -> None:
        """Unlock; a folder this run created and never wrote into is removed again (a failed load writes nothing)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._created and self.path is not None and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    # ---------------------------------------------------------------- the sink

    def start(self, info: RunInfo) -> None:
        path, req, cont = self.path, info.request, info.continuation
        info.run_dir, self._info = path, info
        earlier = _read_manifest(path)
        in_place = cont is not None and cont.in_place
        if earlier is not None and self.overwrite and not in_place:
            clear(path, earlier)
        try:
            self.manifest = _manifest(info)
            if in_place:  # resume: what the run wrote so far stays its own
                self._keep(earlier, cont.at)
            self.flush()  # run.json first: a folder with anything in it says whose it is
            if info.preview != "none":
                (path / FRAMES).mkdir(exist_ok=True)
            if cont is not None and not in_place:
                self._link_parent_frames(cont)
            self.writer = Writer(written=self._file_written)
        except OSError as e:  # a full or read-only disk before the first step: nothing half made stays behind
            self.manifest, self.writer = {}, None
            if not in_place:
                (path / MANIFEST).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    (path / FRAMES).rmdir()
            raise SdstreamError(f"cannot write the run folder {str(path)!r}: {e.strerror or e}") from None
        self._frame = picture_encoder(req.frame_format or "png", frame_size(req.frame_size, info.width, info.height))
        self._state, self._state_written = None, None

    def _keep(self, earlier: dict, at: int) -> None:
        for kind in ("frames", "tensors", "states"):
            for entry in earlier.get(kind) or ():
                if entry["step"] < at:
                    self._written.append((kind, entry["step"], entry["file"]))
                    self._timesteps[entry["step"]] = entry.get("timestep")
        for key in ("created", "injected_at"):
            if key in earlier:
                self.manifest[key] = earlier[key]
        self.manifest["resumed"] = [*earlier.get("resumed", []), {"at_step": at, "time": _now()}]
        self._kept = {f for f in earlier.get("files") or () if f not in (MANIFEST, FINAL)
                      and Path(f).parts[0] not in (FRAMES, TENSORS, STATE)}

    def _link_parent_frames(self, cont) -> None:
        """A branch's frames before its step are its parent's: linked (copied where links can't be), not redrawn."""
        for entry in cont.frames:
            source, target = cont.parent_dir / entry["file"], self.path / FRAMES / Path(entry["file"]).name
            if not source.is_file() or source.is_symlink():
                continue
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
            self._written.append(("frames", entry["step"], f"{FRAMES}/{target.name}"))
            self._timesteps[entry["step"]] = entry.get("timestep")

    def _file_written(self, kind: str, step: int, file: Path) -> None:
        with self._written_lock:
            self._written.append((kind, step, str(file.relative_to(self.path))))

    def step(self, step: Step) -> None:
        ev, req = step.event, self.manifest_request
        if step.picture is not None:
            step.frame = self.writer.submit(self.path / FRAMES / f"step-{ev.step:04d}.{req.frame_format}",
                                            step.picture, self._frame, "frames", ev.step)
            self._timesteps[ev.step] = ev.timestep
        if req.save_tensors:
            if ev.step == ev.first_step:
                self._warn_size(ev, req)
            self._save_tensors(ev, req)
        self._state = ev.state()  # the latest, kept on the device: written at every step with --save-state, and
        if req.save_state:  # always when the run stops before its end
            self._write_state()
        if ev.injected:
            self.manifest["injected_at"].append(ev.step)
        if time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()

    def write(self, name: str, payload, encode, step: int = 0) -> Path:
        """Write PAYLOAD into the run folder as NAME (a path inside it: attention/step-0001.safetensors) through the
        run's writer, off the loop's thread as frames are (ENCODE(payload) makes its bytes there; tensors on a GPU
        are copied without blocking): for other sinks' files. run.json's "files" lists the file once it is on
        disk, and its folders from now on."""
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{name!r} is not a path inside the run folder")
        folder = relative.parent
        if folder != Path(".") and f"{folder}/" not in self._folders:
            (self.path / folder).mkdir(parents=True, exist_ok=True)
            self._folders |= {f"{p}/" for p in (folder, *folder.parents) if p != Path(".")}
        return self.writer.submit(self.path / relative, payload, encode, "files", step)

    def annotate(self, key: str, value) -> None:
        """Another sink's own entry KEY in run.json (JSON values), written with the next flush."""
        if key in self.manifest and key not in self._annotated:
            raise ValueError(f"run.json's {key!r} is the run folder's own")
        self._annotated.add(key)
        self.manifest[key] = value

    @property
    def manifest_request(self):
        return self._info.request

    def _save_tensors(self, ev, req) -> None:
        import torch

        dtype = ev.latents.dtype if req.tensor_dtype == "run" else getattr(torch, {
            "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[req.tensor_dtype])
        sources = {"latents": ev.latents, "x0": ev.denoised, "eps": ev.eps, "eps-cond": ev.eps_cond,
                   "eps-uncond": ev.eps_uncond}
        tensors = {name: sources[name][0].to(dtype) for name in req.save_tensors if sources[name] is not None}
        meta = {"step": str(ev.step), "timestep": str(ev.timestep), "dtype": str(dtype).removeprefix("torch.")}
        self.path.joinpath(TENSORS).mkdir(exist_ok=True)
        self.writer.submit(self.path / TENSORS / f"step-{ev.step:04d}.safetensors", tensors,
                           lambda t, meta=meta: _safetensors(t, meta), "tensors", ev.step)

    def _warn_size(self, ev, req) -> None:
        per_step = sum(ev.latents[0].numel() for name in req.save_tensors if name != "eps-uncond" or ev.eps_uncond
                       is not None) * (4 if req.tensor_dtype == "fp32" else 2)
        total = per_step * (ev.total_steps - ev.first_step + 1)
        if total > TENSOR_NOTICE_BYTES:
            self._info.notices.append(f"--save-tensors will write about {total / 2**20:.0f} MB into {self.path}")

    def _write_state(self) -> None:
        from ..core.state import encode

        if self._state is None or self._state_written == self._state[1]["step"]:
            return
        tensors, meta = self._state
        self.path.joinpath(STATE).mkdir(exist_ok=True)
        self.writer.submit(self.path / STATE / f"step-{meta['step']:04d}.safetensors", tensors,
                           lambda t, meta=meta: encode(t, meta), "states", meta["step"])
        self._state_written = meta["step"]

    def flush(self) -> None:
        """Rewrite run.json with what is on disk now (and a heartbeat).

        run.json is written with RESERVE bytes of trailing spaces (JSON allows them): when the disk is full the
        atomic rewrite fails, and the manifest is written over the old one in place, into space it already has,
        so that a run that failed for lack of space still says so."""
        m = self.manifest
        with self._written_lock:
            written = sorted(self._written, key=lambda w: (w[0], w[1]))
        for kind in ("frames", "tensors", "states"):
            m[kind] = [{"step": step, **({"timestep": self._timesteps.get(step)} if kind == "frames" else {}),
                        "file": file} for k, step, file in written if k == kind]
        made = [f"{d}/" for d in (FRAMES, TENSORS, STATE) if (self.path / d).is_dir()] + sorted(self._folders)
        m["files"] = sorted({MANIFEST, *made, *self._kept, *(f for _, _, f in written),
                             *([m["image"]] if m["image"] else [])})
        m["updated"] = _now()
        text = (json.dumps(m, indent=2) + "\n").encode()
        try:
            atomic_write(self.path / MANIFEST, lambda f: f.write(text + b" " * RESERVE))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not _write_in_place(self.path / MANIFEST, text):
                raise
        self._flushed = time.monotonic()

    def finish(self, info: RunInfo | None, outcome: Outcome) -> None:
        try:
            if self.manifest:  # the run started: files first, then the picture, then the truth in run.json
                self._finish(info, outcome)
        finally:
            self.release()

    def _finish(self, info: RunInfo, outcome: Outcome) -> None:
        failure = None
        try:
            if outcome.status != "complete":
                self._write_state()  # what it takes to go on from the last step done
            if self.writer is not None:
                self.writer.close()
            if outcome.status == "complete":
                save_image(outcome.image, self.path / FINAL, pnginfo=pnginfo(info))
                self.manifest["image"] = FINAL
        except Exception as e:  # a write error (disk full) while finishing
            failure = e
            if outcome.status == "complete":  # then the run failed; a run already failing keeps its first error
                outcome.status, outcome.error = "failed", e
        error = outcome.error
        self.manifest.update(status=outcome.status, error=error_text(error) if error else None,
                             timings=info.timings, recoveries=info.recoveries, measures=info.measures,
                             finished=_now())
        self.flush()
        outcome.frames = len(self.manifest["frames"])
        outcome.image_path = self.path / FINAL if outcome.status == "complete" else None
        outcome.manifest_path = self.path / MANIFEST
        if failure is not None and outcome.error is failure:
            raise failure


def _safetensors(tensors: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    # an unguided step's eps-cond is its eps (one tensor): safetensors refuses shared memory, so copy repeats
    seen, unique = set(), {}
    for k, v in tensors.items():
        v = v.contiguous()
        unique[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return save(unique, metadata=meta)


def frame_size(longer: int | None, width: int, height: int) -> tuple[int, int]:
    """The (width, height) of frames on disk: the image's aspect, its longer side LONGER (default the image's,
    at most 512)."""
    longer = longer or min(max(width, height), 512)
    scale = longer / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _manifest(info: RunInfo) -> dict:
    import diffusers
    import torch
    import transformers

    req, model, cont = info.request, info.model, info.continuation
    return {
        "sdstream": __version__,
        "status": "running",
        "error": None,
        "request": req.to_dict(),
        "model": {"name": model.name, "alias": model.alias, "kind": model.kind, "location": model.location},
        "seed": req.seed,
        "scheduler": req.scheduler,
        "device": info.device,
        "dtype": info.dtype,
        "width": info.width,
        "height": info.height,
        "preview": info.preview,
        "first_step": info.first_step,
        "total_steps": info.total_steps,
        "inject_steps": list(req.inject_steps),
        "injected_at": [],
        "recoveries": info.recoveries,
        "versions": {
            "sdstream": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "timings": info.timings,
        "frames": [],
        "tensors": [],  # --save-tensors: [{step, file}], each file holding the step's tensors by name
        "states": [],  # [{step, file}]: what to continue from after that step
        "measures": None,  # per step (record.sinks.Measures), once the steps are done
        "branch": None if cont is None or cont.in_place else {"parent": str(cont.parent_dir), "at_step": cont.at,
                                                              "from_state": cont.state is not None},
        "image": None,
        "files": [MANIFEST],
        "process": {"pid": os.getpid(), "host": socket.gethostname()},
        "created": _now(),
        "updated": None,
        "finished": None,
    }


def a1111_parameters(req, width: int, height: int, model: str) -> str:
    """The 'parameters' text that A1111-compatible tools read from a PNG: prompt, negative prompt, then each
    option that has an A1111 name and is set, with the size and the model."""
    from ..core.schedulers import SCHEDULERS
    from ..request import OPTIONS

    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    fields = {"Steps": req.steps, "Sampler": SCHEDULERS[req.scheduler].label}
    for name, opt in OPTIONS.items():
        value = req.inject_steps if name == "inject_at_step" else getattr(req, name)
        if opt.a1111 and opt.a1111 not in fields and value not in (None, (), "") and (name != "eta" or value):
            if opt.kind == "pairs":
                value = "; ".join(f"{k}:{text}" for k, text in value)
            fields[opt.a1111] = (f"{value:g}" if isinstance(value, float) else
                                 " ".join(map(str, value)) if isinstance(value, tuple) else value)
    fields.update(Size=f"{width}x{height}", Model=model)
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def _quote(value) -> str:
    """A value as A1111 writes it: in JSON quotes when it holds a comma, a colon or a line break."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def pnginfo(info: RunInfo):
    from PIL.PngImagePlugin import PngInfo

    png = PngInfo()
    png.add_text("parameters", a1111_parameters(info.request, info.width, info.height, info.model.name))
    png.add_text("sdstream", json.dumps(info.request.to_dict()))
    return png


# ------------------------------------------------------------------------------------------ reading a run


@dataclass(frozen=True)
class Frame:
    step: int
    timestep: float | int | None
    path: Path


@dataclass
class RunRecord:
    """A run folder as written: its manifest, the frames on disk, and the frame files it lists but lacks."""

    dir: Path
    manifest: dict
    frames: list[Frame]
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.dir.resolve().name

    @property
    def status(self) -> str:
        """The manifest's status, or 'killed' for a run that says 'running' while nobody writes its folder."""
        status = self.manifest.get("status") or "unknown"
        return "killed" if status == "running" and not is_locked(self.dir) else status

    @property
    def steps(self) -> list[int]:
        """The steps that have a frame on disk."""
        return [f.step for f in self.frames]

    @property
    def injected(self) -> set[int]:
        return set(self.manifest.get("injected_at") or ())

    def progress(self, frame: Frame) -> float:
        """Fraction of this run's own steps done at FRAME (as the 'progress' of a step event, over 1)."""
        first = self.manifest.get("first_step") or 1
        total = self.manifest.get("total_steps") or self.frames[-1].step
        return (frame.step - first + 1) / max(1, total - first + 1)

    def tensors(self, step: int) -> dict:
        """STEP's tensors (--save-tensors) as a dict of name -> torch tensor: latents, x0, eps, eps-cond, eps-uncond."""
        from safetensors.torch import load_file

        entry = next((e for e in self.manifest.get("tensors") or () if e.get("step") == step), None)
        if entry is None:
            kept = [e["step"] for e in self.manifest.get("tensors") or ()]
            raise BadInput(f"run {str(self.dir)!r} kept no tensors of step {step}" +
                           (f" (it kept steps {kept[0]}-{kept[-1]})" if kept else " (it ran without --save-tensors)"))
        path = self.dir / entry["file"]
        if not path.resolve().is_relative_to(self.dir.resolve()) or not path.is_file():
            raise BadInput(f"run {str(self.dir)!r}: {entry['file']!r} is not in the run folder")
        return load_file(str(path))

    def attention(self, step: int) -> dict:
        """STEP's cross-attention maps (--attention) as a dict of word -> [h, w] float32 tensor on the latent grid:
        <start>, each word of the prompt as written (a repeated one as word#2), <end> (the end token and the
        padding). At each place the maps sum to 1: the share of the attention each gets (run.json's "attention")."""
        from safetensors import safe_open

        name = f"{ATTENTION}/step-{step:04d}.safetensors"
        files = set(self.manifest.get("files") or ())
        if name not in files:
            found = (re.fullmatch(rf"{ATTENTION}/step-(\d+)\.safetensors", f) for f in files)
            kept = sorted(int(m.group(1)) for m in found if m)
            raise BadInput(f"run {str(self.dir)!r} recorded no attention maps of step {step}" +
                           (f" (it has steps {kept[0]}-{kept[-1]})" if kept else " (it ran without --attention)"))
        path = self.dir / name
        if not path.resolve().is_relative_to(self.dir.resolve()) or not path.is_file():
            raise BadInput(f"run {str(self.dir)!r}: {name!r} is not in the run folder")
        with safe_open(str(path), framework="pt") as f:
            keys, maps = json.loads(f.metadata()["tokens"]), f.get_tensor("maps")
        return {key: maps[i].float() for i, key in enumerate(keys)}

    @property
    def measures(self) -> dict:
        """The per-step measures (x0_change, guidance_gap, latent_std, injected_rms, with their steps)."""
        return self.manifest.get("measures") or {}

    def frame(self, step: int):
        """The picture of STEP as a PIL image (RGB)."""
        from PIL import Image

        found = next((f for f in self.frames if f.step == step), None)
        if found is None:
            raise BadInput(f"run {str(self.dir)!r} has no frame for step {step}")
        with Image.open(found.path) as im:
            return im.convert("RGB")


def read_run(run_dir: str | Path, *, need_frames: bool = True) -> RunRecord:
    """Read RUN_DIR/run.json. BadInput (one line) if it isn't a run folder or, with need_frames, has no frames.
    Frame paths that lead outside the folder are not followed."""
    path = Path(run_dir)
    if not path.exists():
        raise BadInput(f"run folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise BadInput(f"{str(path)!r} is a file, not a run folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BadInput(f"{str(path)!r} has no {MANIFEST}; is it an sdstream run folder?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {str(manifest_path)!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise BadInput(f"{str(manifest_path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(manifest, dict):
        raise BadInput(f"{str(manifest_path)!r} does not hold a run manifest (a JSON object)")

    inside, found, missing = path.resolve(), [], []
    for entry in manifest.get("frames") or []:
        try:
            frame = Frame(int(entry["step"]), entry.get("timestep"), path / entry["file"])
        except (TypeError, KeyError, ValueError) as e:
            raise BadInput(f"{str(manifest_path)!r}: malformed frame entry {entry!r}") from e
        if not frame.path.resolve().is_relative_to(inside):
            raise BadInput(f"{str(manifest_path)!r}: frame {entry['file']!r} is outside the run folder")
        if frame.path.is_file():
            found.append(frame)
        else:
            missing.append(str(entry["file"]))
    found.sort(key=lambda f: f.step)
    run = RunRecord(path, manifest, found, missing)
    if need_frames and not found:
        if missing:
            why = f"none of the {len(missing)} frame files run.json lists are on disk"
        elif (manifest.get("request") or {}).get("preview") == "none":
            why = "it was generated with --preview none"
        else:
            why = f"run.json lists no frames (status {run.status!r})"
        raise BadInput(f"run {str(path)!r} has no frames: {why}")
    return run


def open_run(run_dir: str | Path) -> RunRecord:
    """A finished (or stopped, or failed) run folder, for scripts: .manifest, .steps, .frame(step),
    .tensors(step), .attention(step), .measures, .status."""
    return read_run(run_dir, need_frames=False)
