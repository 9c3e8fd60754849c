"""`sdstream grid`: runs laid out by the options they differ in (an X/Y plot, like AUTOMATIC1111's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..record.rundir import RunRecord, read_run
from .draw import (
    BACKGROUND,
    DEFAULT_CELL,
    DIM_INK,
    GAP,
    PICTURE_FORMATS,
    SEP,
    _check_size,
    _ranges,
    badge_text,
    check_out,
    draw_lines,
    fit,
    header_px,
    image_size,
    injections,
    layout,
    new_file,
    open_frame,
    open_picture,
    save_picture,
    stack,
    text_block,
)
from .runs import NA, dependents, describe, differing, find_runs, flag, is_default, option_name, order, settings

SHARED = ("prompt", "model", "steps", "scheduler", "guidance")  # said once in the title when they do not vary


@dataclass
class Grid:
    path: Path
    x: str | None  # the option along the columns (a field name), None for a single column
    y: str | None  # the option down the rows, None for a single row
    columns: list[str]  # the column headers, left to right
    rows: list[str]  # the row headers, top to bottom
    cells: list[dict]  # per run: run, row, column, x, y (values), box (x0, y0, x1, y1), injected
    headers: list[dict]  # per header: axis ("x" or "y"), text, box
    size: tuple[int, int]
    step: int | None  # the step shown, None for the final images

    def to_json(self) -> dict:
        return {"grid": str(self.path), "x": flag(self.x)[2:] if self.x else None,
                "y": flag(self.y)[2:] if self.y else None, "columns": self.columns, "rows": self.rows,
                "step": self.step, "width": self.size[0], "height": self.size[1], "cells": self.cells,
                "headers": self.headers}


def default_grid_path(root: Path = Path("outputs")) -> Path:
    return new_file(root, "grid", ".png")


def make_grid(
    run_dirs: list[str | Path],
    *,
    x: str | None = None,
    y: str | None = None,
    step: int | None = None,
    size: int = DEFAULT_CELL,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> Grid:
    """The runs in RUN_DIRS (run folders, or folders of run folders) in a grid, into OUT (default: a new
    ./outputs/<time>-grid.png).

    The options whose values differ between the runs are found from their requests; the runs are laid out by
    them, X along the columns and Y down the rows (options as generate spells them: seed, mask,
    inject-at-step...). Unnamed axes are the varying options left, the one with more values across. Each cell
    shows a run's final image, or its frame of STEP (with the noise badge where that frame shows an
    injection), its longer side SIZE pixels; a combination no run has is an empty cell. Runs that differ in
    more than two options, or two runs at the same place, are refused. Options that do not change the pictures
    shown (--device, --dtype...; for final images --preview, --frames-every...) are axes only where named.
    """
    _check_size(size)
    if step is not None and step < 1:
        raise BadInput(f"--step {step}: give a step number, 1 or more")
    x = option_name(x, "--x") if x is not None else None
    y = option_name(y, "--y") if y is not None else None
    if x is not None and x == y:
        raise BadInput(f"--x and --y are both {flag(x)[2:]}; give two different options")
    out_path = Path(out) if out is not None else default_grid_path()
    fmt = check_out(out_path, PICTURE_FORMATS, overwrite)

    dirs = list({d.resolve(): d for d in find_runs(run_dirs)}.values())  # a folder given twice counts once
    runs = [read_run(d, need_frames=step is not None) for d in dirs]
    values = [settings(r) for r in runs]
    x, y = _axes(values, x, y, _unseen(step))
    places = _places(runs, values, x, y)
    x_values = order([values[i][x] for i in range(len(runs))]) if x else [None]
    y_values = order([values[i][y] for i in range(len(runs))]) if y else [None]
    pictures, badges = zip(*(_picture(r, step, size) for r in runs))

    cw, ch = max(p.width for p in pictures), max(p.height for p in pictures)
    px = header_px(cw)
    col_texts = [_header(x, v, values, (x, y)) for v in x_values] if x else []
    row_texts = [_header(y, v, values, (x, y)) for v in y_values] if y else []
    col_lay = layout(col_texts, cw, px=px, max_lines=3, uniform=False) if x else None
    cw = max(cw, col_lay.width) if col_lay else cw
    row_lay = None
    if y:  # a column as wide as the longest header needs, up to a cell (or 160 pixels beside small cells)
        from .draw import MIN_FONT, _width, font

        natural = max(_width(font(px), t) for t in row_texts) + 2 * GAP
        width = int(min(natural, max(cw, 160)))
        for size in range(px, MIN_FONT - 1, -1):  # and a font small enough for the lines to fit in a row
            row_lay = layout(row_texts, width, px=size, max_lines=6, uniform=False, pad=GAP)
            if row_lay.height <= ch:
                break
    rw = row_lay.width if row_lay else 0
    hh = col_lay.height if col_lay else 0

    left = GAP + (rw + GAP if y else 0)
    body_w = left + len(x_values) * cw + (len(x_values) - 1) * GAP + GAP
    title = text_block(_title(runs, values, x, y, step), body_w, px=px)
    top = title.height + (hh + GAP if x else 0)
    body_h = top + len(y_values) * ch + (len(y_values) - 1) * GAP + GAP

    from PIL import Image

    body = Image.new("RGB", (body_w, body_h - title.height), BACKGROUND)
    header_boxes, cell_boxes = [], {}
    for j, text in enumerate(col_texts):
        box = (left + j * (cw + GAP), title.height, left + j * (cw + GAP) + cw, title.height + hh)
        draw_lines(body, col_lay.lines[j], _shift(box, -title.height), col_lay.font, valign="center")
        header_boxes.append({"axis": "x", "text": text, "box": list(box)})
    for i, text in enumerate(row_texts):
        box = (GAP, top + i * (ch + GAP), GAP + rw, top + i * (ch + GAP) + ch)
        draw_lines(body, row_lay.lines[i], _shift(box, -title.height), row_lay.font, valign="center", pad=GAP)
        header_boxes.append({"axis": "y", "text": text, "box": list(box)})
    for i in range(len(y_values)):
        for j in range(len(x_values)):
            cell_boxes[(i, j)] = (left + j * (cw + GAP), top + i * (ch + GAP),
                                  left + j * (cw + GAP) + cw, top + i * (ch + GAP) + ch)

    index = {(_key(vx), _key(vy)): k for k, (vx, vy) in places.items()}
    cell_rows = []
    for i, vy in enumerate(y_values):
        for j, vx in enumerate(x_values):
            box = cell_boxes[(i, j)]
            k = index.get((_key(vx), _key(vy)))
            if k is None:  # a combination no run has
                lay = layout(["no run"], cw)
                draw_lines(body, lay.lines[0], _shift(box, -title.height), lay.font, fill=DIM_INK, valign="center")
                continue
            picture = pictures[k]
            body.paste(picture, (box[0] + (cw - picture.width) // 2, box[1] - title.height + (ch - picture.height)
                                 // 2))
            cell_rows.append({"run": str(runs[k].dir), "row": i, "column": j, "x": _json(vx) if x else None,
                              "y": _json(vy) if y else None, "box": list(box), "injected": badges[k]})
    grid_image = stack(title, body)
    save_picture(grid_image, out_path, fmt)
    cell_rows.sort(key=lambda c: (c["row"], c["column"]))
    return Grid(out_path, x, y, col_texts, row_texts, cell_rows, header_boxes, grid_image.size, step)


def _unseen(step: int | None) -> set[str]:
    """The options that do not change the pictures a grid shows, left out of its axes unless named: how a run
    ran (device, dtype, offloading...) and, for the final images, how its frames were written."""
    from ..request import DEVICE, FRAMES, OPTIONS

    panels = {DEVICE} if step is not None else {DEVICE, FRAMES}
    return {name for name, opt in OPTIONS.items() if opt.panel in panels}


def _axes(values: list[dict], x: str | None, y: str | None, unseen: set[str] = frozenset()
          ) -> tuple[str | None, str | None]:
    """The options along X and Y: the ones named (which must vary), then the varying ones left (those in UNSEEN
    only where named)."""
    named = [n for n in (x, y) if n is not None]
    varying = [n for n in differing(values) if n not in unseen or n in named]
    for axis, name in (("--x", x), ("--y", y)):
        if name is not None and name not in varying:
            same = {v[name] for v in values if v[name] is not NA}
            what = describe(name, next(iter(same))) if len(same) == 1 else f"{flag(name)[2:]} n/a"
            raise BadInput(f"{axis} {flag(name)[2:]}: every run has {what}; the runs differ in "
                           f"{_names(varying) if varying else 'nothing'}")
    if len(varying) > 2:
        raise BadInput(f"the runs differ in {len(varying)} options ({_names(varying)}); a grid lays out at most "
                       "two: give runs that differ in one or two")
    rest = sorted((n for n in varying if n not in named),
                  key=lambda n: -len({v[n] for v in values}))  # more values across (a stable sort keeps the order)
    if x is None and rest:
        x = rest.pop(0)
    if y is None and rest:
        y = rest.pop(0)
    return x, y


def _header(name: str, value, values: list[dict], axes: tuple) -> str:
    """'mask circle', with what the runs of that row (or column) share of the options that apply only with it:
    'mask circle · inject 10'."""
    from ..request import OPTIONS

    text = describe(name, value)
    group = [v for v in values if _key(v[name]) == _key(value)]
    for dep in dependents(name):
        shared = {g[dep] for g in group}
        if dep not in axes and len(shared) == 1:
            only = next(iter(shared))
            if only is not NA and not is_default(OPTIONS[dep], only):
                text += SEP + describe(dep, only)
    return text


def _names(names: list[str]) -> str:
    return ", ".join(flag(n)[2:] for n in names)


def _key(value):
    return ("n/a",) if value is NA else value


def _json(value):
    if value is NA:
        return "n/a"
    return list(value) if isinstance(value, tuple) else value


def _places(runs: list[RunRecord], values: list[dict], x: str | None, y: str | None) -> dict[int, tuple]:
    """Run index -> (x value, y value); two runs at one place are refused."""
    places, seen = {}, {}
    for k, v in enumerate(values):
        place = (v[x] if x else None, v[y] if y else None)
        key = (_key(place[0]), _key(place[1]))
        if key in seen:
            other = runs[seen[key]]
            where = " and ".join(describe(n, p) for n, p in zip((x, y), place) if n) or "the same options"
            axes = f"{_names([n for n in (x, y) if n])}" if x or y else "no option"
            raise BadInput(f"runs {str(other.dir)!r} and {str(runs[k].dir)!r} both have {where}: a grid by "
                           f"{axes} needs one run per cell")
        seen[key] = k
        places[k] = place
    return places


def _picture(run: RunRecord, step: int | None, size: int):
    """(the run's picture for the grid, the injected steps its noise badge names or None)."""
    native = image_size(run)
    if step is None:
        name = run.manifest.get("image")
        path = run.dir / str(name) if name else None
        if path is None or not path.is_file() or not path.resolve().is_relative_to(run.dir.resolve()):
            raise BadInput(f"run {str(run.dir)!r} has no final image (status {run.status}); pass --step K to show "
                           "a step of every run instead")
        return fit(open_picture(path, "image"), size, native), None
    frame = next((f for f in run.frames if f.step == step), None)
    if frame is None:
        raise BadInput(f"--step {step}: run {str(run.dir)!r} has no frame for step {step}; it has frames for "
                       f"steps {_ranges(run.steps)}")
    marks = injections(run)
    picture = open_frame(frame, size, native)
    if step in marks:
        from .draw import with_badge

        return with_badge(picture, badge_text(step, marks[step])), marks[step]
    return picture, None


def _title(runs: list[RunRecord], values: list[dict], x: str | None, y: str | None, step: int | None) -> str:
    """What the runs share (prompt, model, steps, ...) and what the cells show."""
    parts = []
    for name in SHARED:
        if name in (x, y):
            continue
        shown = {v[name] for v in values}
        if len(shown) == 1 and (value := next(iter(shown))) not in (None, NA):
            parts.append(f'"{value}"' if name == "prompt" else f"{value} steps" if name == "steps" else
                         str(value) if name in ("model", "scheduler") else describe(name, value))
    parts.append(f"step {step}" if step is not None else "final images")
    return " · ".join(parts)


def _shift(box: tuple[int, int, int, int], dy: int) -> tuple[int, int, int, int]:
    return box[0], box[1] + dy, box[2], box[3] + dy
