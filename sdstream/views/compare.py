"""`sdstream compare`: runs side by side, step by step, with heat maps of where they differ."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..record import files as _files
from ..record.rundir import Frame, RunRecord, read_run
from .draw import (
    BACKGROUND,
    COMPARE_COUNT,
    DEFAULT_CELL,
    GAP,
    HOLD_SECONDS,
    INK,
    LABEL_H,
    _check_animation,
    _check_size,
    _font,
    durations_ms,
    evenly_spaced,
    frame_label,
    grid,
    heatmap,
    labelled,
    open_frame,
    save_animation,
    scale,
)

ALIGNMENTS = ("index", "progress")

def align_runs(runs: list[RunRecord], align: str | None = None) -> list[tuple[Frame, ...]]:
    """Rows of frames, one per run, to compare side by side.

    Runs with the same recorded steps pair step by step. Otherwise ALIGN must say how:
    'index' pairs the i-th frames (as many rows as the shortest run has frames); 'progress'
    follows the first run's frames and pairs each with every other run's frame nearest in
    progress through its own schedule.
    """
    if align is not None and align not in ALIGNMENTS:
        raise BadInput(f"--align {align!r}: choose {' or '.join(ALIGNMENTS)}")
    step_lists = [[f.step for f in r.frames] for r in runs]
    if all(s == step_lists[0] for s in step_lists):
        return list(zip(*(r.frames for r in runs)))
    if align is None:
        described = "; ".join(
            f"{r.name}: {len(r.frames)} frames of {r.manifest.get('total_steps')} steps" for r in runs
        )
        raise BadInput(f"runs have different steps ({described}); pass --align index or --align progress")
    if align == "index":
        return list(zip(*(r.frames for r in runs)))  # zip stops at the shortest
    rows = []
    for frame in runs[0].frames:
        p = runs[0].progress(frame)
        rows.append((frame, *(min(r.frames, key=lambda f, r=r: abs(r.progress(f) - p)) for r in runs[1:])))
    return rows


def default_compare_dir(root: Path = Path("outputs")) -> Path:
    return _files.new_dir(root, "compare")


def _prepare_out_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise BadInput(f"--out {str(path)!r} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise BadInput(f"--out {str(path)!r} is not empty; pass --overwrite or choose another folder")
        for old in (path / "diff").glob("step-*.png"):  # stale heat maps of an earlier, longer comparison
            old.unlink()
    (path / "diff").mkdir(parents=True, exist_ok=True)


def make_compare(
    run_dirs: list[str | Path],
    out_dir: str | Path | None = None,
    *,
    align: str | None = None,
    fmt: str = "gif",
    fps: float = 10,
    size: int = DEFAULT_CELL,
    count: int = COMPARE_COUNT,
    loop: bool = True,
    hold: float = HOLD_SECONDS,
    overwrite: bool = False,
) -> dict:
    """Compare two or more runs step by step into OUT_DIR; returns what compare.json holds.

    Writes compare.<fmt> (per step: each run's frame side by side, then a heat map of |run k - run 1|
    for k = 2..N), sheet.png (COUNT evenly spaced rows of the same), diff/step-NNNN.png (the heat
    maps at frame resolution, NNNN the first run's step, one panel per compared run) and
    compare.json. Difference = mean over channels of |A - B| in 0..255; its mean over pixels is
    'mad'. Heat maps share one scale: bright = the largest difference anywhere in the comparison.
    """
    import numpy as np

    if len(run_dirs) < 2:
        raise BadInput("compare needs two or more run folders")
    fmt = fmt.lower()
    _check_animation(fmt, fps, hold)
    _check_size(size)
    if count < 1:
        raise BadInput(f"--count {count}: must be 1 or more")
    runs = [read_run(d) for d in run_dirs]
    rows = align_runs(runs, align)
    out = Path(out_dir) if out_dir is not None else default_compare_dir()

    # Pass 1: full-resolution differences (sizes must match), so heat maps can share one scale.
    diffs: list[list] = []  # per row, per compared run: HxW float32
    for row in rows:
        arrays = [np.asarray(open_frame(f), dtype=np.float32) for f in row]
        if any(a.shape != arrays[0].shape for a in arrays):
            shapes = ", ".join(f"{r.name}: {a.shape[1]}x{a.shape[0]}" for r, a in zip(runs, arrays))
            raise BadInput(f"runs have different picture sizes ({shapes}); compare needs the same size")
        diffs.append([np.abs(a - arrays[0]).mean(axis=2) for a in arrays[1:]])
    diff_max = max((float(d.max()) for ds in diffs for d in ds), default=0.0)
    _prepare_out_dir(out, overwrite)

    # Pass 2: pictures. Heat maps at full resolution to disk; rows of cells for animation and sheet.
    names = [f"{i + 1}" for i in range(len(runs))]
    row_cells, records = [], []
    for i, (row, ds) in enumerate(zip(rows, diffs)):
        maps = [heatmap(d, diff_max) for d in ds]
        diff_path = out / "diff" / f"step-{row[0].step:04d}.png"
        _files.save_image(_side_by_side(maps), diff_path, "png")
        mads = [round(float(d.mean()), 4) for d in ds]
        cells = [labelled(open_frame(f, size), f"{n}: {frame_label(f)}") for n, f in zip(names, row)]
        cells += [labelled(scale(m, size), f"|{n}-1| mad {mad:.2f}", cells[0].width) for n, m, mad in
                  zip(names[1:], maps, mads)]
        row_cells.append(cells)
        records.append({
            "row": i + 1,
            "steps": [f.step for f in row],
            "timesteps": [f.timestep for f in row],
            "progress": [round(100 * r.progress(f), 2) for r, f in zip(runs, row)],
            "mad": mads,
            "diff": str(diff_path),
        })

    anim_path, sheet_path, json_path = out / f"compare.{fmt}", out / "sheet.png", out / "compare.json"
    columns = len(row_cells[0])
    strips = [grid(cells, columns) for cells in row_cells]
    save_animation(strips, anim_path, fmt, durations_ms(len(strips), fps, hold), loop)
    chosen = evenly_spaced(row_cells, count)
    sheet = _with_legend(grid([c for cells in chosen for c in cells], columns), runs)
    _files.save_image(sheet, sheet_path, "png")
    result = {
        "out": str(out),
        "runs": [str(r.dir) for r in runs],
        "align": align or "step",
        "files": {
            "animation": str(anim_path),
            "sheet": str(sheet_path),
            "json": str(json_path),
            "diffs": [r["diff"] for r in records],
        },
        "diff_max": round(diff_max, 4),
        "mean_mad": [round(sum(r["mad"][k] for r in records) / len(records), 4) for k in range(len(runs) - 1)],
        "steps": records,
    }
    _files.write_json(json_path, result)
    return result


def _side_by_side(pictures: list):
    """PICTURES in one row, GAP apart."""
    from PIL import Image

    strip = Image.new("RGB", (sum(p.width for p in pictures) + GAP * (len(pictures) - 1),
                              max(p.height for p in pictures)), BACKGROUND)
    x = 0
    for p in pictures:
        strip.paste(p, (x, 0))
        x += p.width + GAP
    return strip


def _with_legend(sheet, runs: list[RunRecord]):
    """SHEET under a line naming the runs: '1 = <folder>   2 = <folder> ...'."""
    from PIL import Image, ImageDraw

    legend = "   ".join(f"{i + 1} = {r.name}" for i, r in enumerate(runs))
    out = Image.new("RGB", (sheet.width, sheet.height + LABEL_H), BACKGROUND)
    ImageDraw.Draw(out).text((GAP, GAP), legend, fill=INK, font=_font())
    out.paste(sheet, (0, LABEL_H))
    return out
