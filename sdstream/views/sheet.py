"""`sdstream sheet`: chosen steps of a run on one contact sheet."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..record.rundir import read_run
from .draw import (
    DEFAULT_CELL,
    GAP,
    PICTURE_FORMATS,
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
) -> Sheet:
    """A contact sheet of chosen steps, each labelled 'step N · t=T', in RUN_DIR/sheet.png (or OUT: .png, .jpg
    or .webp), under a line saying what the run was.

    STEPS picks exact steps; COUNT picks that many evenly spaced (first and last included); by default up to
    16. Either way the frames that show an injection of noise carry a 'noise' badge, and the even pick always
    includes them. Pictures are scaled so their longer side is SIZE (smoothly up to the run's image size, then
    nearest-neighbour). COLUMNS defaults to a near-square grid.
    """
    _check_size(size)
    _check_columns(columns)
    run = read_run(run_dir)
    chosen = pick_steps(run, steps, count)
    out_path = Path(out) if out is not None else run.dir / "sheet.png"
    fmt = check_out(out_path, PICTURE_FORMATS, overwrite)
    columns = min(columns or math.ceil(math.sqrt(len(chosen))), len(chosen))

    native, marks = image_size(run), injections(run)
    badges = [badge_text(f.step, marks[f.step]) if f.step in marks else None for f in chosen]
    pictures = [open_frame(f, size, native) for f in chosen]
    made = cells(pictures, [frame_label(f) for f in chosen], badges)
    body = grid(made, columns)
    title = text_block(f"{summary(run)} · {run.name}", body.width, px=header_px(made[0].width))
    sheet = stack(title, body)
    save_picture(sheet, out_path, fmt)

    cw, ch = made[0].size
    top = title.height + GAP
    boxes = [(GAP + c * (cw + GAP), top + r * (ch + GAP), GAP + c * (cw + GAP) + cw, top + r * (ch + GAP) + ch)
             for r, c in (divmod(i, columns) for i in range(len(made)))]
    return Sheet(out_path, [f.step for f in chosen], columns, math.ceil(len(made) / columns), (cw, ch), sheet.size,
                 [f.step for f, b in zip(chosen, badges) if b], boxes, (max(p.width for p in pictures),
                                                                         max(p.height for p in pictures)))
