"""`sdstream compare`: runs side by side, step by step, with heat maps of where they differ."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..record import files as _files
from ..record.rundir import Frame, RunRecord, read_run
from .draw import (
    COMPARE_COUNT,
    DEFAULT_CELL,
    GAP,
    HOLD_SECONDS,
    _check_animation,
    _check_columns,
    _check_size,
    badge_text,
    cells,
    colour_bar,
    durations_ms,
    fit,
    font_px,
    frame_label,
    grid,
    header_px,
    heatmap,
    image_size,
    injections,
    layout,
    open_frame,
    save_animation,
    spaced_indices,
    stack,
    text_block,
)
from .runs import find_runs, label, settings, telling

ALIGNMENTS = ("index", "progress")
STRIP_GAP = 3 * GAP  # between the steps (and the columns of steps) on a comparison sheet


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
    columns: int = 1,
    loop: bool = True,
    hold: float = HOLD_SECONDS,
    overwrite: bool = False,
    attention: str | None = None,
) -> dict:
    """Compare two or more runs step by step into OUT_DIR; returns what compare.json holds.

    RUN_DIRS are run folders, or folders of run folders (a batch's --out). The runs are lettered A, B, C... and
    each column is headed by what sets its run apart (the options whose values differ: 'mask circle · inject
    10' against 'no mask'; the folder's name where none do).

    Writes compare.<fmt> (per step: each run's frame side by side, then a heat map of |run k - run A| for k =
    B, C, ...), sheet.png (COUNT evenly spaced rows of the same, always with the rows that show an injection of
    noise, in COLUMNS columns of rows), diff/step-NNNN.png (the heat maps at the image's size, NNNN the first
    run's step, one panel per compared run) and compare.json. Difference = mean over channels of |A - B| in
    levels of 0..255; its mean over pixels is 'mad'. Heat maps share one scale, shown in a colour bar: bright =
    the largest difference anywhere in the comparison. Frames that show an injection carry a 'noise' badge.

    ATTENTION (a word of runs made with --attention) compares that word's heat maps instead of the frames.
    """
    import numpy as np

    fmt = fmt.lower()
    _check_animation(fmt, fps, hold)
    _check_size(size)
    _check_columns(columns)
    if count < 1:
        raise BadInput(f"--count {count}: must be 1 or more")
    dirs = find_runs(run_dirs)
    if len(dirs) < 2:
        raise BadInput("compare needs two or more run folders")
    runs = [read_run(d, need_frames=attention is None) for d in dirs]
    if attention is not None:
        from .sheet import attention_frames

        runs = [attention_frames(r, attention)[0] for r in runs]
    rows = align_runs(runs, align)
    out = Path(out_dir) if out_dir is not None else default_compare_dir()

    # Pass 1: differences at the image's size (frames at latent size enlarged to it; the sizes must match), so
    # heat maps can share one scale.
    natives = [image_size(r) for r in runs]
    diffs: list[list] = []  # per row, per compared run: HxW float32
    for row in rows:
        arrays = [np.asarray(open_frame(f, None, nat), dtype=np.float32) for f, nat in zip(row, natives)]
        if any(a.shape != arrays[0].shape for a in arrays):
            shapes = ", ".join(f"{r.name}: {a.shape[1]}x{a.shape[0]}" for r, a in zip(runs, arrays))
            raise BadInput(f"runs have different picture sizes ({shapes}); compare needs the same size")
        diffs.append([np.abs(a - arrays[0]).mean(axis=2) for a in arrays[1:]])
    diff_max = max((float(d.max()) for ds in diffs for d in ds), default=0.0)
    _prepare_out_dir(out, overwrite)

    # What tells the runs apart: their letters, and the options whose values differ.
    letters = [_letter(i) for i in range(len(runs))]
    values = [settings(r) for r in runs]
    differs = telling(values)
    labels = [label(v, differs) or r.name for v, r in zip(values, runs)]
    headers = [f"{n}: {t}" for n, t in zip(letters, labels)] + [f"difference |{n} - A|" for n in letters[1:]]
    marks = [injections(r) for r in runs]

    # Pass 2: heat maps at full resolution to disk; per row the pictures, labels and badges of its cells.
    row_pictures, row_labels, row_badges, records = [], [], [], []
    for i, (row, ds) in enumerate(zip(rows, diffs)):
        maps = [heatmap(d, diff_max) for d in ds]
        diff_path = out / "diff" / f"step-{row[0].step:04d}.png"
        _files.save_image(_side_by_side(maps), diff_path, "png")
        mads = [round(float(d.mean()), 4) for d in ds]
        row_pictures.append([open_frame(f, size, nat) for f, nat in zip(row, natives)]
                            + [fit(m, size, natives[0]) for m in maps])
        row_labels.append([frame_label(f) for f in row] + [f"mad {mad:.2f}" for mad in mads])
        row_badges.append([badge_text(f.step, mk[f.step]) if f.step in mk else None for f, mk in zip(row, marks)]
                          + [None] * len(maps))
        records.append({
            "row": i + 1,
            "steps": [f.step for f in row],
            "timesteps": [f.timestep for f in row],
            "progress": [round(100 * r.progress(f), 2) for r, f in zip(runs, row)],
            "injected": [f.step in mk for f, mk in zip(row, marks)],
            "mad": mads,
            "diff": str(diff_path),
        })

    # One cell size and one label layout for every row; the header row above, the colour scale below.
    width = max(p.width for ps in row_pictures for p in ps)
    lay = layout([t for ls in row_labels for t in ls], width)
    px = header_px(width)
    head_lay = layout(headers, max(width, lay.width), px=px, max_lines=3, uniform=False)
    cell_w = max(width, lay.width, head_lay.width)  # a header's word wider than a small cell widens them all
    n = len(headers)
    strips = [grid(cells(ps, None, bs, label_layout=lay.part(i * n, n), width=cell_w), n, margin=0)
              for i, (ps, bs) in enumerate(zip(row_pictures, row_badges))]
    header = _header_strip(headers, head_lay, cell_w)
    n_columns = n

    anim_path, sheet_path, json_path = out / f"compare.{fmt}", out / "sheet.png", out / "compare.json"
    title_text = " · ".join(f"{n} = {r.name}" for n, r in zip(letters, runs))  # wraps between runs
    if attention is not None:
        title_text = f"attention to {attention!r} · {title_text}"
    frame_w = strips[0].width + 2 * GAP
    legend = colour_bar(frame_w, diff_max, font_px(cell_w))
    title = text_block(title_text, frame_w, px=px)
    frames = [stack(title, _framed(header), _framed(s), legend) for s in strips]
    pauses = {i for i, rec in enumerate(records) if any(rec["injected"])}
    save_animation(frames, anim_path, fmt, durations_ms(len(frames), fps, hold, pauses), loop)

    chosen = spaced_indices(len(strips), count, pauses)
    per_row = min(columns, len(chosen))
    body = grid([strips[i] for i in chosen], per_row, gap=STRIP_GAP, margin=GAP)
    heads = grid([header] * per_row, per_row, gap=STRIP_GAP, margin=GAP)
    sheet = stack(text_block(title_text, body.width, px=px), heads, body,
                  colour_bar(body.width, diff_max, font_px(cell_w)))
    _files.save_image(sheet, sheet_path, "png")
    result = {
        "out": str(out),
        "runs": [str(r.dir) for r in runs],
        "letters": letters,
        "labels": labels,
        "differs": ["--" + n.replace("_", "-") for n in differs],
        "align": align or "step",
        "attention": attention,
        "files": {
            "animation": str(anim_path),
            "sheet": str(sheet_path),
            "json": str(json_path),
            "diffs": [r["diff"] for r in records],
        },
        "diff_max": round(diff_max, 4),
        "mean_mad": [round(sum(r["mad"][k] for r in records) / len(records), 4) for k in range(len(runs) - 1)],
        "sheet_rows": [records[i]["row"] for i in chosen],
        "columns": n_columns,
        "cell": [cell_w, strips[0].height],
        "steps": records,
    }
    _files.write_json(json_path, result)
    return result


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"R{i + 1}"


def _header_strip(headers: list[str], lay, cell_w: int):
    """The column headers, one per cell, GAP apart, in a strip as wide as a row of cells."""
    from PIL import Image

    from .draw import BACKGROUND, draw_lines

    w = max(cell_w, lay.width)
    strip = Image.new("RGB", (len(headers) * w + (len(headers) - 1) * GAP, lay.height), BACKGROUND)
    for i, lines in enumerate(lay.lines):
        draw_lines(strip, lines, (i * (w + GAP), 0, i * (w + GAP) + w, lay.height), lay.font)
    return strip


def _framed(strip):
    """STRIP with GAP pixels of background around it."""
    return grid([strip], 1, margin=GAP)


def _side_by_side(pictures: list):
    """PICTURES in one row, GAP apart."""
    from PIL import Image

    from .draw import BACKGROUND

    strip = Image.new("RGB", (sum(p.width for p in pictures) + GAP * (len(pictures) - 1),
                              max(p.height for p in pictures)), BACKGROUND)
    x = 0
    for p in pictures:
        strip.paste(p, (x, 0))
        x += p.width + GAP
    return strip
