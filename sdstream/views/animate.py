"""`sdstream animate`: a run's frames as an animated GIF or WebP."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..record.rundir import read_run
from .draw import (
    HOLD_SECONDS,
    _check_animation,
    _check_size,
    _check_target,
    _resolve_format,
    badge_text,
    cells,
    durations_ms,
    every_nth,
    frame_label,
    image_size,
    injections,
    open_frame,
    register_if_in_run,
    save_animation,
)


@dataclass
class Animation:
    path: Path
    steps: list[int]  # one picture per step, in order
    size: tuple[int, int]
    durations_ms: list[int]  # the last one includes the hold
    injected: list[int] = field(default_factory=list)  # the steps whose picture carries the noise badge


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
    caption: bool = False,
    badge: bool = True,
) -> Animation:
    """Animate a run's frames into RUN_DIR/animation.<fmt> (or OUT, ending in .gif or .webp).

    One picture per chosen frame (every EVERY-th recorded frame, the last and the ones that show an injection
    always); each shows for 1/FPS s, the last for HOLD s longer and those that show an injection (with BADGE)
    for INJECT_HOLD s longer. Consecutive identical pictures may be merged
    by the encoder (their display times add up). FMT None: from OUT's suffix, else gif. Pictures are at the
    run's image size (frames at latent size are enlarged smoothly), or SIZE on their longer side. BADGE marks
    the frames that show an injection of noise; CAPTION adds 'step N · t=T' under each. Refuses to replace an
    existing file unless OVERWRITE.
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

    marks = injections(run) if badge else {}
    kept = {f.step for f in every_nth(run.frames, every)} | set(marks)
    chosen = [f for f in run.frames if f.step in kept]
    native = image_size(run)
    pictures = [open_frame(f, size, native) for f in chosen]
    badges = [badge_text(f.step, marks[f.step]) if f.step in marks else None for f in chosen]
    pictures = cells(pictures, [frame_label(f) for f in chosen] if caption else None, badges)
    durations = durations_ms(len(pictures), fps, hold, {i for i, b in enumerate(badges) if b})
    save_animation(pictures, out_path, fmt, durations, loop)
    register_if_in_run(out_path)
    return Animation(out_path, [f.step for f in chosen], pictures[0].size, durations,
                     [f.step for f, b in zip(chosen, badges) if b])
