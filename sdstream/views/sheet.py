"""`sdstream sheet`: chosen steps of a run on one contact sheet."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..record import files as _files
from ..record.rundir import read_run, register_files
from .draw import DEFAULT_CELL, _check_size, _check_target, frame_label, grid, labelled, open_frame, pick_steps


@dataclass
class Sheet:
    path: Path
    steps: list[int]
    columns: int
    rows: int
    cell: tuple[int, int]  # one cell: the picture plus its label strip
    size: tuple[int, int]


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
    """A contact sheet PNG of chosen steps, each labelled 'step N  t=T', in RUN_DIR/sheet.png (or OUT).

    STEPS picks exact steps; COUNT picks that many evenly spaced (first and last included); by
    default up to 16. Pictures are scaled so their longer side is SIZE. COLUMNS defaults to a
    near-square grid. Sheet size: columns*cell + (columns+1)*GAP wide, likewise for rows.
    """
    _check_size(size)
    if columns is not None and columns < 1:
        raise BadInput(f"--columns {columns}: must be 1 or more")
    run = read_run(run_dir)
    chosen = pick_steps(run, steps, count)
    out_path = Path(out) if out is not None else run.dir / "sheet.png"
    _check_target(out_path, overwrite)
    columns = columns or math.ceil(math.sqrt(len(chosen)))

    cells = [labelled(open_frame(f, size), frame_label(f)) for f in chosen]
    sheet = grid(cells, columns)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _files.save_image(sheet, out_path, "png")
    if out_path.parent.resolve() == run.dir.resolve():  # a file in the run folder is listed as the run's own
        register_files(run.dir, [out_path.name])
    return Sheet(out_path, [f.step for f in chosen], columns, math.ceil(len(cells) / columns), cells[0].size,
                 sheet.size)
