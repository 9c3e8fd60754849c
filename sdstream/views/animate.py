"""`sdstream animate`: a run's frames as an animated GIF or WebP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..record.rundir import read_run, register_files
from .draw import (
    HOLD_SECONDS,
    _check_animation,
    _check_size,
    _check_target,
    _resolve_format,
    durations_ms,
    every_nth,
    open_frame,
    save_animation,
)


@dataclass
class Animation:
    path: Path
    steps: list[int]  # one picture per step, in order
    size: tuple[int, int]
    durations_ms: list[int]  # the last one includes the hold


def make_animation(
    run_dir: str | Path,
    fmt: str | None = "gif",
    *,
    out: str | Path | None = None,
    fps: float = 10,
    every: int = 1,
    size: int | None = None,
    loop: bool = True,
    hold: float = HOLD_SECONDS,
    overwrite: bool = False,
) -> Animation:
    """Animate a run's frames into RUN_DIR/animation.<fmt> (or OUT).

    One picture per chosen frame (every EVERY-th recorded frame, the last always); each shows for
    1/FPS s and the last for HOLD s longer. Consecutive identical pictures may be merged by the
    encoder (their display times add up). FMT None: from OUT's suffix, else gif. SIZE scales the
    longer side. Refuses to replace an existing file unless OVERWRITE.
    """
    out_path = None if out is None else Path(out)
    fmt = _resolve_format(fmt, out_path)
    _check_animation(fmt, fps, hold)
    _check_size(size)
    if every < 1:
        raise BadInput(f"--every {every}: must be 1 or more")
    run = read_run(run_dir)
    out_path = out_path or run.dir / f"animation.{fmt}"
    _check_target(out_path, overwrite)

    chosen = every_nth(run.frames, every)
    pictures = [open_frame(f, size) for f in chosen]
    durations = durations_ms(len(pictures), fps, hold)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_animation(pictures, out_path, fmt, durations, loop)
    if out_path.parent.resolve() == run.dir.resolve():  # a file in the run folder is listed as the run's own
        register_files(run.dir, [out_path.name])
    return Animation(out_path, [f.step for f in chosen], pictures[0].size, durations)
