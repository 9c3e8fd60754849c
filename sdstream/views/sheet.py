"""`sdstream sheet`: chosen steps of a run on one contact sheet."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import BadInput
from ..record.rundir import ATTENTION, Frame, RunRecord, read_run
from .draw import (
    DEFAULT_CELL,
    DIM_INK,
    GAP,
    PICTURE_FORMATS,
    SEP,
    _check_columns,
    _check_size,
    badge_text,
    cells,
    check_out,
    frame_label,
    grid,
    header_px,
    image_size,
    injections,
    open_frame,
    pick_steps,
    save_picture,
    stack,
    text_block,
)
from .runs import summary


@dataclass
class Sheet:
    path: Path
    steps: list[int]
    columns: int
    rows: int
    cell: tuple[int, int]  # one cell: the picture plus its label strip
    size: tuple[int, int]
    injected: list[int] = field(default_factory=list)  # the steps on the sheet that carry the noise badge
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # each cell's (x0, y0, x1, y1) on the sheet
    picture: tuple[int, int] = (0, 0)  # the picture part of a cell


def make_sheet(
    run_dir: str | Path,
    *,
    steps: list[int] | None = None,
    count: int | None = None,
    columns: int | None = None,
    size: int = DEFAULT_CELL,
    out: str | Path | None = None,
    overwrite: bool = False,
    attention: str | None = None,
) -> Sheet:
    """A contact sheet of chosen steps, each labelled 'step N · t=T', in RUN_DIR/sheet.png (or OUT: .png, .jpg
    or .webp), under a line saying what the run was.

    STEPS picks exact steps; COUNT picks that many evenly spaced (first and last included); by default up to
    16. Either way the frames that show an injection of noise carry a 'noise' badge, and the even pick always
    includes them. Pictures are scaled so their longer side is SIZE (smoothly up to the run's image size, then
    nearest-neighbour). COLUMNS defaults to a near-square grid.

    ATTENTION (a word of a run made with --attention) lays out that word's heat maps instead of the frames, in
    RUN_DIR/sheet-attention-WORD.png, each labelled with the word's mean and largest share of the attention.
    """
    _check_size(size)
    _check_columns(columns)
    run = read_run(run_dir, need_frames=attention is None)
    word = None
    if attention is not None:
        run, word, folder = attention_frames(run, attention)
    chosen = pick_steps(run, steps, count)
    default = "sheet.png" if word is None else f"sheet-attention-{Path(folder).name}.png"
    out_path = Path(out) if out is not None else run.dir / default
    fmt = check_out(out_path, PICTURE_FORMATS, overwrite)
    columns = min(columns or math.ceil(math.sqrt(len(chosen))), len(chosen))

    native, marks = image_size(run), injections(run)
    badges = [badge_text(f.step, marks[f.step]) if f.step in marks else None for f in chosen]
    pictures = [open_frame(f, size, native) for f in chosen]
    labels = [frame_label(f) for f in chosen]
    if word is not None:
        labels = [f"{label}{SEP}{share}" for label, share in zip(labels, shares(run, word, [f.step for f in chosen]))]
    made = cells(pictures, labels, badges)
    body = grid(made, columns)
    px = header_px(made[0].width)
    title = text_block(f"{summary(run)} · {run.name}", body.width, px=px)
    if word is not None:
        legend = (f"colour: the share of each place's cross-attention that goes to {word!r}, relative to the step's "
                  "largest (dark: none, bright: the largest; bright all over: spread evenly); under each step: its "
                  "mean share over the picture (max: at its brightest place)")
        title = stack(text_block(f"attention to {word!r}{SEP}{summary(run)}{SEP}{run.name}", body.width, px=px),
                      text_block(legend, body.width, px=max(10, px * 3 // 4), fill=DIM_INK, max_lines=4))
    sheet = stack(title, body)
    save_picture(sheet, out_path, fmt)

    cw, ch = made[0].size
    top = title.height + GAP
    boxes = [(GAP + c * (cw + GAP), top + r * (ch + GAP), GAP + c * (cw + GAP) + cw, top + r * (ch + GAP) + ch)
             for r, c in (divmod(i, columns) for i in range(len(made)))]
    return Sheet(out_path, [f.step for f in chosen], columns, math.ceil(len(made) / columns), (cw, ch), sheet.size,
                 [f.step for f, b in zip(chosen, badges) if b], boxes, (max(p.width for p in pictures),
                                                                         max(p.height for p in pictures)))


def attention_frames(run: RunRecord, word: str) -> tuple[RunRecord, str, str]:
    """(RUN with WORD's heat maps for frames, the word as run.json names it, its folder): --attention's pictures."""
    entry = run.manifest.get("attention")
    words = entry.get("words") if isinstance(entry, dict) else None
    if not words:
        why = "it drew no heat maps (--attention-words)" if isinstance(entry, dict) else "it ran without --attention"
        raise BadInput(f"run {str(run.dir)!r} has no attention heat maps: {why}")
    key = word if word in words else next((k for k in words if k.lower() == word.lower()), None)
    if key is None:
        raise BadInput(f"--attention {word!r}: run {str(run.dir)!r} has heat maps of {', '.join(words)}")
    folder, inside = str(words[key]), run.dir.resolve()
    timesteps = {f.step: f.timestep for f in run.frames}
    frames = []
    for name in run.manifest.get("files") or ():
        found = re.fullmatch(re.escape(folder) + r"step-(\d+)\.png", str(name))
        path = run.dir / str(name)
        if found and path.resolve().is_relative_to(inside) and path.is_file():
            step = int(found.group(1))
            frames.append(Frame(step, timesteps.get(step), path))
    if not frames:
        raise BadInput(f"run {str(run.dir)!r} has no heat maps of {key!r} on disk")
    return replace(run, frames=sorted(frames, key=lambda f: f.step)), key, folder


def shares(run: RunRecord, word: str, steps: list[int]) -> list[str]:
    """'8% (max 11%)' for each of STEPS: WORD's mean share of the cross-attention over the picture, and its largest."""
    from safetensors import safe_open

    out = []
    for step in steps:
        path = run.dir / ATTENTION / f"step-{step:04d}.safetensors"
        try:
            with safe_open(str(path), framework="np") as f:
                keys = json.loads(f.metadata()["tokens"])
                row = f.get_slice("maps")[keys.index(word)].astype("float32")
            out.append(f"{row.mean():.0%} (max {row.max():.0%})")
        except (OSError, KeyError, ValueError):  # (no maps of that step, or of that word at it)
            out.append("share ?")
    return out
