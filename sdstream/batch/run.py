"""Running a planned batch: each line through the orchestrator into its own run folder (models load once, the
loader caches them), OUT/batch.json summing up every line. Under `accelerate launch` the lines are split across
the processes (distribute.py); with ray= they go to a pool of Ray workers (ray_pool.py), planned and summed up
by the same code."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import BadInput
from ..record.files import new_dir, write_json
from ..record.rundir import open_run, write_failed
from ..request import GenerationRequest
from .distribute import distributed, distributed_state, from_main, process_device, shared_out
from .plan import BatchRun, plan

SUMMARY = "batch.json"
STATUSES = ("complete", "stopped", "failed", "interrupted", "pending")  # of a line's run
FINISHED = ("complete", "stopped")  # what the line asked for was done (--stop-at-step: stopped there, state kept)


@dataclass
class BatchResult:
    out: Path
    rows: list[dict]  # one per line, in line order: line, prompt, seed, status, seconds, run_dir, error, skipped
    interrupted: bool = False
    is_main: bool = True  # False in the other processes of a multi-process batch

    @property
    def counts(self) -> dict:
        counts = {"runs": len(self.rows)}
        for status in STATUSES:
            counts[status] = sum(r["status"] == status for r in self.rows)
        counts["skipped"] = sum(bool(r["skipped"]) for r in self.rows)
        return counts

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if all(r["status"] in FINISHED for r in self.rows) else 1


def run_batch(
    source,
    out: str | Path | None = None,
    defaults=None,
    *,
    force: bool = False,
    keep_going: bool = False,
    sinks: tuple = (),
    on_event: Callable[[dict], None] = lambda event: None,
    animations: Iterable[str] = (),
    check: Callable[[GenerationRequest], None] | None = None,
    ray=None,
) -> BatchResult:
    """Run every line of SOURCE into OUT (default outputs/<time>-batch), each into OUT/NNNN-<prompt>/.

    DEFAULTS (field -> value, or a GenerationRequest) apply to every line. SINKS see each run's steps (as in
    orchestrator.run). ON_EVENT gets batch events: {"event": "begin", ...} before a run, {"event": "run", ...} for
    each finished, kept or bad line, {"event": "warning", ...}, and finally {"event": "summary", ...}. With
    several processes each reports its own runs; the main one also reports the kept and bad lines, then (with
    "gathered": true) the other processes' runs, and the summary. A KeyboardInterrupt stops the batch: the
    current run is left "interrupted", OUT/batch.json is written, and the exception is re-raised with the
    BatchResult as its .batch_result.

    RAY (a ray_pool.RayCluster) runs the lines on a pool of Ray workers instead, scheduled as they free up, a
    line whose worker died retried elsewhere; SINKS are not used there (the steps happen on the workers).
    """
    if ray is not None:
        from .ray_pool import run_batch_ray

        return run_batch_ray(source, out, defaults, ray, force=force, keep_going=keep_going, on_event=on_event,
                             animations=animations, check=check)
    if isinstance(source, (str, Path)) and str(source) == "-" and distributed():
        raise BadInput("a batch read from stdin ('-') runs in one process; give accelerate launch a file")
    auto_named, out = out is None, Path(out) if out is not None else new_dir(Path("outputs"), "batch")
    _check_summary(out)
    runs = plan(source, out, defaults, force=force, keep_going=keep_going, check=check)
    animations = tuple(animations)
    started = _now()

    state = distributed_state()  # None in a plain single process
    is_main = state is None or state.is_main_process
    if auto_named and state is not None:  # every process writes into the folder the main one named
        main_out = Path(from_main(state, str(out)))
        if main_out != out:
            out, runs = main_out, plan(source, main_out, defaults, force=force, keep_going=keep_going, check=check)
    emitted: set[int] = set()

    def report(run: BatchRun, row: dict) -> None:
        emitted.add(run.line)
        on_event({"event": "run", **row})

    todo = [r for r in runs if r.request is not None and not r.skip]
    if is_main:
        _announce(runs, animations, on_event, report)
    out.mkdir(parents=True, exist_ok=True)

    mine = todo
    if state is not None:
        shared_out(state, out)  # several machines: one --out for all, or nothing runs
        state.wait_for_everyone()  # every process has read the run folders before any run starts
        with state.split_between_processes(todo) as share:
            mine = list(share)
    device = process_device(state)

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
            outcomes[current.line] = row = {**_row(current), "status": "interrupted"}
            report(current, row)
        result = BatchResult(out, _rows(runs, outcomes, todo_status="pending"), interrupted=True, is_main=is_main)
        if is_main:
            _summarise(result, source, started, on_event)
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
        _summarise(result, source, started, on_event)
    return result


def _announce(runs: list[BatchRun], animations, on_event, report) -> None:
    """Before any run: a warning for each complete run that is made again, and the rows of the kept and bad lines
    (a kept run gets the animations it lacks)."""
    for run in runs:
        if run.redo:
            on_event({"event": "warning", "line": run.line,
                      "message": f"line {run.line}: the complete run in {run.run_dir} was made with a different "
                                 f"{', '.join(run.redo)}; making it again"})
    for run in runs:
        if run.request is None or run.skip:
            if run.skip and animations:
                try:
                    _animate(run.run_dir, animations, missing_only=True)
                except Exception as e:  # a kept run stays kept; say why it has no animation
                    on_event({"event": "warning", "line": run.line, "message": f"line {run.line}: {e}"})
            report(run, _row(run))


def _check_summary(out: Path) -> None:
    """A batch.json in OUT that is not a batch summary of sdstream's is the user's: never replaced."""
    path = out / SUMMARY
    if not path.exists():
        return
    try:
        ours = "sdstream" in json.loads(path.read_text()) and path.is_file() and not path.is_symlink()
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise BadInput(f"--out {str(out)!r} holds a {SUMMARY} sdstream did not write; choose another folder")


def _execute(run: BatchRun, request: GenerationRequest, sinks, animations, cancelled=None) -> dict:
    """Run one line; a failure is recorded (in run.json too) and returned, never raised. CANCELLED (asked before
    each step, see orchestrator.run) stops it as an interrupt: KeyboardInterrupt, the run left "interrupted"."""
    from ..record.orchestrator import run as orchestrate
    from ..record.rundir import RunFolder

    started = time.perf_counter()
    folder = RunFolder(run.run_dir, overwrite=True)
    try:
        orchestrate(request, [folder, *sinks], inputs=run.inputs, cancelled=cancelled)
        _animate(run.run_dir, animations)
    except Exception as e:
        if folder.manifest == {}:  # failed before the run started (the model could not load, a model check)
            write_failed(run.run_dir, request, e, time.perf_counter() - started)
        return {**_row(run), "status": "failed"}
    return _row(run)


def _animate(run_dir: Path, animations, missing_only: bool = False) -> None:
    from ..views.animate import make_animation

    for fmt in animations:
        if not (missing_only and (run_dir / f"animation.{fmt}").exists()):
            make_animation(run_dir, fmt, overwrite=True)


def _row(run: BatchRun) -> dict:
    """The summary row for RUN from its run folder (or its line error)."""
    manifest, status = {}, "failed"
    if run.run_dir is not None:
        try:
            kept = open_run(run.run_dir)
            manifest, status = kept.manifest, kept.status
        except BadInput:
            pass
    return {
        "line": run.line,
        "prompt": run.prompt,
        "seed": manifest.get("seed", run.request.seed if run.request else run.values.get("seed")),
        "status": "failed" if run.error else status,
        "seconds": (manifest.get("timings") or {}).get("total"),
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
            row = _row(run)
            rows.append({**row, "status": todo_status, "error": None, "seed": row["seed"] if run.seeded else None})
        else:
            rows.append(_row(run))
    return rows


def _summarise(result: BatchResult, source, started: str, on_event, extra: dict | None = None) -> None:
    """OUT/batch.json (EXTRA: more top-level fields, e.g. the Ray pool's), then the summary event."""
    write_json(result.out / SUMMARY, {
        "sdstream": __version__,
        "file": source if isinstance(source, str) else str(source) if isinstance(source, Path) else None,
        "out": str(result.out),
        "started": started,
        "finished": _now(),
        "interrupted": result.interrupted,
        "exit_code": result.exit_code,
        "counts": result.counts,
        **(extra or {}),
        "rows": result.rows,
    })
    on_event({"event": "summary", **result.counts, "out": str(result.out), "batch": str(result.out / SUMMARY),
              "exit_code": result.exit_code})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
