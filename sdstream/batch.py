"""Batch runs: many requests from one file, each into its own run folder, models loaded once.

    from sdstream import GenerationRequest
    from sdstream.batch import run_batch
    result = run_batch("prompts.jsonl", "outputs/sweep", GenerationRequest(model="tiny", steps=10))

A batch file is JSON Lines (one object per line, keys are GenerationRequest fields, dashes or
underscores) or plain text (one prompt per line; blank lines and `#` comments skipped). The
format is told by the first non-blank line: `{` means JSON Lines. Every line is validated
before any run starts. Line N runs into OUT/NNNN-<prompt slug>/, written by runner.run exactly
as `generate` writes a run; a rerun skips folders whose run.json says "complete".

Started by `accelerate launch` (or torchrun), the runs are split across the processes with
accelerate's PartialState.split_between_processes; the main process gathers the results from
the run folders and writes OUT/batch.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, frames
from .errors import BadInput
from .request import GenerationRequest
from .tiny import check_prompts, folder_notes

SUMMARY = "batch.json"
FIELDS = tuple(f.name for f in fields(GenerationRequest))  # value types are checked by validated()
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # as accelerate reads

Event = dict
Sink = Callable[[Event], None]


class BadLines(BadInput):
    """One or more lines of a batch file are invalid; .errors holds (line, message) for each."""

    def __init__(self, errors: list[tuple[int, str]]):
        self.errors = errors
        line, message = errors[0]
        more = f" (and {len(errors) - 1} more bad line{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
        super().__init__(f"line {line}: {message}{more}")


@dataclass
class BatchRun:
    """One line of the batch: its request (validated) and run folder, or why the line is bad."""

    line: int
    values: dict  # what the line itself set
    request: GenerationRequest | None = None
    run_dir: Path | None = None
    error: str | None = None  # the line is invalid
    skip: bool = False  # already complete on disk (resume)
    seeded: bool = False  # the seed was asked for (else it is random, drawn at validation)
    changed: list[str] = field(default_factory=list)  # options that differ from the kept complete run

    @property
    def prompt(self) -> str:
        return self.request.prompt if self.request else str(self.values.get("prompt", ""))


@dataclass
class BatchResult:
    out: Path
    rows: list[dict]  # one per line, in line order: line, prompt, seed, status, seconds, run_dir, error, skipped
    interrupted: bool = False
    is_main: bool = True  # False in the other processes of a multi-process batch

    @property
    def counts(self) -> dict:
        counts = {"runs": len(self.rows)}
        for status in ("complete", "failed", "interrupted", "pending"):
            counts[status] = sum(r["status"] == status for r in self.rows)
        counts["skipped"] = sum(bool(r["skipped"]) for r in self.rows)
        return counts

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if all(r["status"] == "complete" for r in self.rows) else 1


# ---------------------------------------------------------------------------------- reading


def read_source(source) -> list[tuple[int, dict]]:
    """(line number, values) for each run in SOURCE: a path, '-' for stdin, or a list of dicts/prompts.

    Raises BadLines for lines that can't be read as a run (bad JSON, unknown keys, wrong types).
    """
    if isinstance(source, (list, tuple)):
        items = [(i, item if isinstance(item, dict) else {"prompt": item}) for i, item in enumerate(source, 1)]
        parsed, errors = [], []
        for number, values in items:
            try:
                parsed.append((number, _normalise(values)))
            except BadInput as e:
                errors.append((number, str(e)))
        return _or_raise(parsed, errors)
    return parse_text(_read_text(source))


def _read_text(source) -> str:
    if str(source) == "-":
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        raise BadInput(f"batch file {str(path)!r} does not exist" if not path.exists() else
                       f"batch file {str(path)!r} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"batch file {str(path)!r} cannot be read: {e}") from None


def parse_text(text: str) -> list[tuple[int, dict]]:
    """JSON Lines if the first line that is not blank or a # comment starts with '{', else one prompt per line."""
    lines = text.splitlines()
    first = next((s.strip() for s in lines if s.strip() and not s.strip().startswith("#")), "")
    jsonl = first.startswith("{")
    parsed, errors = [], []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not jsonl:
            parsed.append((number, {"prompt": line}))
            continue
        try:
            try:
                values = json.loads(line)
            except ValueError as e:
                raise BadInput(f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(values, dict):
                raise BadInput(f"expected a JSON object like {{\"prompt\": \"...\"}}, got {type(values).__name__}")
            parsed.append((number, _normalise(values)))
        except BadInput as e:
            errors.append((number, str(e)))
    return _or_raise(parsed, errors)


def _or_raise(parsed, errors):
    if errors:
        e = BadLines(errors)
        e.parsed = parsed  # the good lines, for keep_going
        raise e
    return parsed


def _normalise(values: dict) -> dict:
    """Keys as GenerationRequest field names, inject_at_step as a tuple."""
    out = {}
    for key, value in values.items():
        name = str(key).strip().replace("-", "_")
        if name not in FIELDS:
            raise BadInput(f"unknown key {key!r}; allowed: {', '.join(FIELDS)}")
        if name in out:
            raise BadInput(f"key {key!r} is given twice")
        out[name] = value
    if "inject_at_step" in out:
        steps = out["inject_at_step"]
        steps = [] if steps is None else steps if isinstance(steps, list) else [steps]
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise BadInput(f"--inject-at-step {out['inject_at_step']!r} is not allowed: give a step number or a list")
        out["inject_at_step"] = tuple(steps)
    return out


# ---------------------------------------------------------------------------------- planning


def plan(
    source,
    out: str | Path,
    defaults: GenerationRequest | None = None,
    *,
    force: bool = False,
    keep_going: bool = False,
    check: Callable[[GenerationRequest], None] | None = None,
) -> list[BatchRun]:
    """Read and validate every line, name its run folder and decide whether it needs running.

    Nothing is written. Raises BadLines (unless KEEP_GOING, which keeps bad lines as runs with
    .error) and BadInput for a bad OUT. CHECK is an extra per-request check (e.g. the CLI's
    animation flags need frames).
    """
    defaults = defaults or GenerationRequest()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {str(out)!r} is a file, not a folder")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {str(out)!r}: {str(parent)!r} is not writable")
    try:
        parsed, errors = read_source(source), []
    except BadLines as e:
        parsed, errors = e.parsed, list(e.errors)
    runs = [BatchRun(line, values) for line, values in parsed]
    width = max([4] + [len(str(line)) for line, _ in parsed + errors])
    notes: dict[str | None, dict] = {}  # per model, read once: its folder's sdstream.json
    for run in runs:
        try:
            run.request = replace(defaults, **run.values).validated()
            if run.request.model not in notes:
                notes[run.request.model] = folder_notes(run.request.model)
            check_prompts(run.request, notes[run.request.model].get("vocabulary"))  # before any model loads
            run.seeded = "seed" in run.values or defaults.seed is not None
            if check:
                check(run.request)
            run.run_dir = out / f"{run.line:0{width}d}-{frames.slug(run.request.prompt)}"
            frames.check_run_dir(run.run_dir, overwrite=True)  # refuses folders with files we did not write
        except (BadInput, TypeError, ValueError) as e:  # TypeError/ValueError: a value of an odd JSON type
            run.request, run.run_dir = None, None
            errors.append((run.line, str(e)))
    errors.sort()
    if errors and not keep_going:
        raise BadLines(errors)
    bad = dict(errors)
    for run in runs:
        run.error = bad.pop(run.line, None)
    runs += [BatchRun(line, {}, error=message) for line, message in bad.items()]  # lines that did not parse
    runs.sort(key=lambda r: r.line)

    for run in runs:
        if run.request is None:
            continue
        manifest = read_manifest(run.run_dir)
        if manifest and manifest.get("status") == "complete" and not force:
            run.skip = True
            run.changed = _changed(manifest.get("request") or {}, run)
    return runs


def read_manifest(run_dir: Path | None) -> dict | None:
    try:
        data = json.loads((Path(run_dir) / frames.MANIFEST).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def _changed(kept: dict, run: BatchRun) -> list[str]:
    """Options in which a kept complete run differs from what the line asks for now."""
    now = run.request.to_dict()
    ignore = {"device"}
    if not run.seeded:
        ignore.add("seed")  # a random seed differs every time by design
    return [f"--{k.replace('_', '-')}" for k in now if k not in ignore and k in kept and kept[k] != now[k]]


# ---------------------------------------------------------------------------------- running


def run_batch(
    source,
    out: str | Path | None = None,
    defaults: GenerationRequest | None = None,
    *,
    force: bool = False,
    keep_going: bool = False,
    sinks: tuple[Sink, ...] = (),
    on_event: Sink = lambda event: None,
    animations: Iterable[str] = (),
    check: Callable[[GenerationRequest], None] | None = None,
) -> BatchResult:
    """Run every line of SOURCE into OUT (default outputs/<time>-batch); see the module docstring.

    SINKS get each run's step events (as runner.run sends them). ON_EVENT gets batch events:
    {"event": "begin", ...} before a run, {"event": "run", ...} for each finished, kept or bad
    line, {"event": "warning", ...}, and finally {"event": "summary", ...}. With several processes
    each reports its own runs; the main one also reports the kept and bad lines, then (with
    "gathered": true) the other processes' runs, and the summary.
    A KeyboardInterrupt stops the batch: the current run is left "interrupted", OUT/batch.json is
    written, and the exception is re-raised with the BatchResult as its .batch_result.
    """
    if isinstance(source, (str, Path)) and str(source) == "-" and distributed():
        raise BadInput("a batch read from stdin ('-') runs in one process; give accelerate launch a file")
    auto_named, out = out is None, Path(out) if out is not None else default_out()
    runs = plan(source, out, defaults, force=force, keep_going=keep_going, check=check)
    animations = tuple(animations)
    started = _now()

    state = _distributed_state()  # None in a plain single process
    is_main = state is None or state.is_main_process
    if auto_named and state is not None:  # every process writes into the folder the main one named
        main_out = Path(_from_main(state, str(out)))
        if main_out != out:
            out, runs = main_out, plan(source, main_out, defaults, force=force, keep_going=keep_going, check=check)
    emitted: set[int] = set()

    def report(run: BatchRun, row: dict) -> None:
        emitted.add(run.line)
        on_event({"event": "run", **row})

    todo = [r for r in runs if r.request is not None and not r.skip]
    if is_main:
        for run in runs:
            if run.skip and run.changed:
                on_event({"event": "warning", "line": run.line,
                          "message": f"line {run.line}: kept the complete run in {run.run_dir}, made with a different "
                                     f"{', '.join(run.changed)}; pass --force to redo it"})
        for run in runs:
            if run.request is None or run.skip:
                if run.skip and animations:
                    try:
                        _animate(run.run_dir, animations, missing_only=True)
                    except Exception as e:  # a kept run stays kept; say why it has no animation
                        on_event({"event": "warning", "line": run.line, "message": f"line {run.line}: {e}"})
                report(run, _row(run, read_manifest(run.run_dir)))
    out.mkdir(parents=True, exist_ok=True)

    mine = todo
    if state is not None:
        state.wait_for_everyone()  # every process has read the run folders before any run starts
        with state.split_between_processes(todo) as share:
            mine = list(share)
    device = _process_device(state)

    outcomes: dict[int, dict] = {}
    try:
        for index, run in enumerate(mine, 1):
            request = run.request
            if device and request.device == "auto":
                request = replace(request, device=device)
            on_event({"event": "begin", "line": run.line, "index": index, "of": len(mine), "prompt": run.prompt,
                      "seed": request.seed, "run_dir": str(run.run_dir)})
            outcomes[run.line] = row = _execute(run, request, sinks, animations)
            report(run, row)
    except KeyboardInterrupt as e:
        current = mine[len(outcomes)] if len(outcomes) < len(mine) else None
        if current is not None:
            outcomes[current.line] = row = {**_row(current, read_manifest(current.run_dir)), "status": "interrupted"}
            report(current, row)
        rows = _rows(runs, outcomes, todo_status="pending")
        result = BatchResult(out, rows, interrupted=True, is_main=is_main)
        if is_main:
            _write_summary(result, source, started)
            on_event({"event": "summary", **result.counts, "out": str(out), "batch": str(out / SUMMARY),
                      "exit_code": result.exit_code})
        e.batch_result = result
        raise

    if state is not None:
        state.wait_for_everyone()  # every run is on disk
    rows = _rows(runs, outcomes, todo_status=None)
    result = BatchResult(out, rows, is_main=is_main)
    if is_main:
        for run in runs:
            if run.line not in emitted:  # run by another process
                on_event({"event": "run", **next(r for r in rows if r["line"] == run.line), "gathered": True})
        _write_summary(result, source, started)
        on_event({"event": "summary", **result.counts, "out": str(out), "batch": str(out / SUMMARY),
                  "exit_code": result.exit_code})
    return result


def default_out(root: Path = Path("outputs")) -> Path:
    return frames.new_dir(root, "batch")


def _execute(run: BatchRun, request: GenerationRequest, sinks, animations) -> dict:
    """Run one line; a failure is recorded (in run.json too) and returned, never raised."""
    from .runner import run as run_one

    manifest_path = run.run_dir / frames.MANIFEST
    before = _identity(manifest_path)
    started = time.perf_counter()
    try:
        run_one(request, run.run_dir, overwrite=True, sinks=tuple(sinks))
        _animate(run.run_dir, animations)
    except Exception as e:
        error = f"{type(e).__name__}: {e}" if not isinstance(e, BadInput) else str(e)
        if _identity(manifest_path) == before:  # failed before runner wrote a manifest (e.g. model checks)
            _write_failed_manifest(run.run_dir, request, error, time.perf_counter() - started)
        row = _row(run, read_manifest(run.run_dir))
        return {**row, "status": "failed", "error": row["error"] or error}
    return _row(run, read_manifest(run.run_dir))


def _animate(run_dir: Path, animations, missing_only: bool = False) -> None:
    from .look import make_animation

    for fmt in animations:
        if not (missing_only and (run_dir / f"animation.{fmt}").exists()):
            make_animation(run_dir, fmt, overwrite=True)


def _identity(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _write_failed_manifest(run_dir: Path, request: GenerationRequest, error: str, seconds: float) -> None:
    """A run.json saying why the run failed, in a folder cleared of any earlier run."""
    try:
        frames.prepare_run_dir(run_dir, overwrite=True)
        frames.write_json(run_dir / frames.MANIFEST, {
            "sdstream": __version__, "status": "failed", "error": error, "request": request.to_dict(),
            "seed": request.seed, "timings": {"total": round(seconds, 4)}, "frames": [], "image": None,
            "created": _now(), "finished": _now(),
        })
    except Exception:  # the folder itself is the problem; the batch summary still records the error
        pass


def _row(run: BatchRun, manifest: dict | None) -> dict:
    """The summary row for RUN from its manifest (or its line error)."""
    manifest = manifest or {}
    seconds = (manifest.get("timings") or {}).get("total")
    return {
        "line": run.line,
        "prompt": run.prompt,
        "seed": manifest.get("seed", run.request.seed if run.request else run.values.get("seed")),
        "status": "failed" if run.error else manifest.get("status", "failed"),
        "seconds": seconds,
        "run_dir": str(run.run_dir) if run.run_dir else None,
        "error": run.error or manifest.get("error") or (None if manifest else "no run.json was written"),
        "skipped": run.skip,
    }


def _rows(runs: list[BatchRun], outcomes: dict[int, dict], todo_status: str | None) -> list[dict]:
    """Rows for every line: this process's outcomes, else what the run folder says.

    TODO_STATUS, when given, is the status of runs this process has not reached (an interrupt).
    """
    rows = []
    for run in runs:
        if run.line in outcomes:
            rows.append(outcomes[run.line])
        elif run.request is not None and not run.skip and todo_status:
            row = _row(run, None)
            rows.append({**row, "status": todo_status, "error": None, "seed": row["seed"] if run.seeded else None})
        else:
            rows.append(_row(run, read_manifest(run.run_dir) if run.run_dir else None))
    return rows


def _write_summary(result: BatchResult, source, started: str) -> None:
    frames.write_json(result.out / SUMMARY, {
        "sdstream": __version__,
        "file": source if isinstance(source, str) else str(source) if isinstance(source, Path) else None,
        "out": str(result.out),
        "started": started,
        "finished": _now(),
        "interrupted": result.interrupted,
        "exit_code": result.exit_code,
        "counts": result.counts,
        "rows": result.rows,
    })


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- several processes


def distributed() -> bool:
    """Started by accelerate launch / torchrun / mpirun with more than one process?"""
    for name in _WORLD_SIZE_VARS:
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def is_main_process() -> bool:
    """Rank 0 (or no launcher), from the environment alone: usable before PartialState exists."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "0").strip() not in ("", "0"):
            return False
    return True


def _distributed_state():
    if not distributed():
        return None
    import torch
    from accelerate import PartialState

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if gpus and local > gpus:  # accelerate gives process i the GPU cuda:i
        raise BadInput(f"{local} processes on this machine but {gpus} CUDA GPU(s): one process per GPU, "
                       f"e.g. accelerate launch --num_processes {gpus} -m sdstream batch ...")
    # Without CUDA, PartialState only joins the other processes (gloo) when told it runs on CPU.
    return PartialState(cpu=not gpus)


def _from_main(state, value):
    """VALUE as the main process has it, in every process."""
    if state is None:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _process_device(state) -> str | None:
    """The device this process should use for requests that say 'auto': PartialState's."""
    if state is None:
        return None
    device = state.device
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type if device.type in ("cpu", "mps") else None
