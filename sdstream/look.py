"""Looking at finished runs: animation, contact sheet, side-by-side comparison, timing summary.

Pure Pillow and numpy; nothing here imports torch. Everything reads a run folder as the runner
wrote it (run.json plus frames/step-NNNN.<ext>) and writes its output atomically.

    from sdstream.look import make_animation
    make_animation("outputs/fox", "gif").path     # -> outputs/fox/animation.gif

numpy is imported inside functions (the CLI's import path stays light; ruff TID253).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import frames as _frames
from .errors import BadInput

ANIMATION_FORMATS = ("gif", "webp")
ALIGNMENTS = ("index", "progress")
HOLD_SECONDS = 1.0  # the last frame of an animation stays this much longer on screen
MAX_FPS = 50  # GIF delays are in 1/100 s and most viewers slow anything under 2/100 s
DEFAULT_CELL = 256  # longer side of each picture in a sheet or comparison
SHEET_COUNT = 16  # steps on a contact sheet by default (evenly spaced, the last included)
COMPARE_COUNT = 8  # rows on a comparison sheet by default
GAP = 4  # pixels between cells (and around the edge) on sheets and comparison strips
LABEL_H = 16  # the text strip under each cell
BACKGROUND = (24, 24, 24)
INK = (230, 230, 230)
SIZE_RANGE = (8, 4096)

# A coarse 'inferno' colour map (dark = equal, bright = different), interpolated linearly.
_INFERNO = (
    (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
    (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164),
)


# --------------------------------------------------------------------------- reading a run


@dataclass(frozen=True)
class Frame:
    step: int
    timestep: float | int | None
    path: Path


@dataclass
class Run:
    """A run folder: its manifest, the frames on disk, and the frame files it lists but lacks."""

    dir: Path
    manifest: dict
    frames: list[Frame]
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.dir.resolve().name

    @property
    def manifest_path(self) -> Path:
        return self.dir / _frames.MANIFEST

    def progress(self, frame: Frame) -> float:
        """Fraction of this run's own steps done at FRAME (as the 'progress' of a step event, over 1)."""
        first = self.manifest.get("first_step") or 1
        total = self.manifest.get("total_steps") or self.frames[-1].step
        return (frame.step - first + 1) / max(1, total - first + 1)


def load_run(run_dir: str | Path, *, need_frames: bool = True) -> Run:
    """Read RUN_DIR/run.json. BadInput (one line) if it isn't a run folder or, with need_frames, has no frames."""
    path = Path(run_dir)
    if not path.exists():
        raise BadInput(f"run folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise BadInput(f"{str(path)!r} is a file, not a run folder")
    manifest_path = path / _frames.MANIFEST
    if not manifest_path.is_file():
        raise BadInput(f"{str(path)!r} has no {_frames.MANIFEST}; is it an sdstream run folder?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {str(manifest_path)!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise BadInput(f"{str(manifest_path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(manifest, dict):
        raise BadInput(f"{str(manifest_path)!r} does not hold a run manifest (a JSON object)")

    found, missing = [], []
    for entry in manifest.get("frames") or []:
        try:
            frame = Frame(int(entry["step"]), entry.get("timestep"), path / entry["file"])
        except (TypeError, KeyError, ValueError) as e:
            raise BadInput(f"{str(manifest_path)!r}: malformed frame entry {entry!r}") from e
        if frame.path.is_file():
            found.append(frame)
        else:
            missing.append(str(entry["file"]))
    found.sort(key=lambda f: f.step)
    run = Run(path, manifest, found, missing)
    if need_frames and not found:
        if missing:
            why = f"none of the {len(missing)} frame files run.json lists are on disk"
        elif (manifest.get("request") or {}).get("frames") is False:
            why = "it was generated with --no-frames"
        else:
            why = f"run.json lists no frames (status {manifest.get('status')!r})"
        raise BadInput(f"run {str(path)!r} has no frames: {why}")
    return run


def open_frame(frame: Frame, size: int | None = None):
    """FRAME's picture as RGB, its longer side scaled to SIZE (nearest-neighbour when enlarging)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(frame.path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise BadInput(f"cannot read frame {str(frame.path)!r}: {e}") from e
    return scale(rgb, size)


def scale(im, size: int | None):
    """IM with its longer side SIZE pixels; nearest-neighbour up (crisp), Lanczos down."""
    from PIL import Image

    if size is None or max(im.size) == size:
        return im
    factor = size / max(im.size)
    new = (max(1, round(im.width * factor)), max(1, round(im.height * factor)))
    return im.resize(new, Image.Resampling.NEAREST if factor > 1 else Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------- choosing frames


def every_nth(frames: list[Frame], every: int) -> list[Frame]:
    """Every EVERY-th frame, starting with the first; the last frame always."""
    chosen = frames[::every]
    if (len(frames) - 1) % every:
        chosen.append(frames[-1])
    return chosen


def evenly_spaced(items: list, count: int) -> list:
    """COUNT items spread evenly over ITEMS, first and last included (all of them if fewer)."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[-1]]
    picks = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in picks]


def parse_steps(text: str) -> list[int]:
    """'1,5,10,20' -> [1, 5, 10, 20]."""
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise BadInput(f"--steps {text!r}: expected step numbers separated by commas, e.g. 1,5,10,20") from None
    if not steps:
        raise BadInput(f"--steps {text!r}: expected step numbers separated by commas, e.g. 1,5,10,20")
    return steps


def pick_steps(run: Run, steps: list[int] | None = None, count: int | None = None) -> list[Frame]:
    """The frames for STEPS (each must have a frame), or COUNT evenly spaced (default up to 16)."""
    if steps is not None and count is not None:
        raise BadInput("pass --steps or --count, not both")
    if steps is not None:
        by_step = {f.step: f for f in run.frames}
        absent = [s for s in steps if s not in by_step]
        if absent:
            raise BadInput(f"--steps: no frame for step {', '.join(map(str, absent))} in {str(run.dir)!r}; "
                           f"it has frames for steps {_ranges([f.step for f in run.frames])}")
        return [by_step[s] for s in steps]
    count = SHEET_COUNT if count is None else count
    if count < 1:
        raise BadInput(f"--count {count}: must be 1 or more")
    return evenly_spaced(run.frames, count)


def _ranges(steps: list[int]) -> str:
    """[1,2,3,5,7,8] -> '1-3, 5, 7-8'."""
    out, start = [], None
    for i, s in enumerate(steps):
        if start is None:
            start = s
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(str(start) if start == s else f"{start}-{s}")
            start = None
    return ", ".join(out)


# --------------------------------------------------------------------------- drawing


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def frame_label(frame: Frame) -> str:
    label = f"step {frame.step}"
    return label if frame.timestep is None else f"{label}  t={_num(frame.timestep)}"


def labelled(picture, label: str, width: int | None = None):
    """PICTURE on the background, centred in a cell WIDTH wide, with LABEL in a strip below it."""
    from PIL import Image, ImageDraw

    width = width or picture.width
    cell = Image.new("RGB", (width, picture.height + LABEL_H), BACKGROUND)
    cell.paste(picture, ((width - picture.width) // 2, 0))
    draw, font = ImageDraw.Draw(cell), _font()
    while draw.textlength(label, font=font) > width - 2 and " " in label:  # too wide: drop words from the end
        label = label.rsplit(" ", 1)[0].rstrip()
    x = max(1, (width - draw.textlength(label, font=font)) // 2)
    draw.text((x, picture.height + 2), label, fill=INK, font=font)
    return cell


def grid(cells: list, columns: int):
    """CELLS (all the same size) in rows of COLUMNS, GAP pixels apart and around the edge."""
    from PIL import Image

    cw, ch = cells[0].size
    rows = math.ceil(len(cells) / columns)
    sheet = Image.new("RGB", (columns * cw + (columns + 1) * GAP, rows * ch + (rows + 1) * GAP), BACKGROUND)
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        sheet.paste(cell, (GAP + c * (cw + GAP), GAP + r * (ch + GAP)))
    return sheet


def heatmap(diff, scale_max: float):
    """A 2-D array of differences (0..255) as an RGB picture: 0 dark, SCALE_MAX and above bright."""
    import numpy as np
    from PIL import Image

    anchors = np.asarray(_INFERNO, dtype=np.float32)
    x = np.clip(diff / max(scale_max, 1e-6), 0, 1) * (len(anchors) - 1)
    lo = np.floor(x).astype(np.int64).clip(0, len(anchors) - 2)
    frac = (x - lo)[..., None]
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- writing


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise BadInput(f"--out {str(path)!r} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise BadInput(f"{str(path)!r} exists; pass --overwrite or choose another --out")


def _check_size(size: int | None, flag: str = "--size") -> None:
    if size is not None and not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise BadInput(f"{flag} {size}: must be between {SIZE_RANGE[0]} and {SIZE_RANGE[1]} pixels")


def _check_animation(fmt: str, fps: float, hold: float) -> None:
    if fmt not in ANIMATION_FORMATS:
        raise BadInput(f"--format {fmt!r}: choose {' or '.join(ANIMATION_FORMATS)}")
    if not 0 < fps <= MAX_FPS:
        raise BadInput(f"--fps {fps:g}: must be above 0 and at most {MAX_FPS}")
    if hold < 0:
        raise BadInput(f"--hold {hold:g}: must be 0 or more seconds")


def _resolve_format(fmt: str | None, out: Path | None) -> str:
    """FMT, or the --out file's suffix, or gif; a suffix that contradicts FMT is an error."""
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    if fmt is None:
        return suffix if suffix in ANIMATION_FORMATS else "gif"
    fmt = fmt.lower()
    if suffix in ANIMATION_FORMATS and suffix != fmt:
        raise BadInput(f"--out {str(out)!r} ends in .{suffix} but --format is {fmt}")
    return fmt


def durations_ms(n: int, fps: float, hold: float = HOLD_SECONDS) -> list[int]:
    """Per-frame display times: 1/fps each, the last HOLD seconds longer."""
    each = max(10, round(1000 / fps))
    return [each] * (n - 1) + [each + round(1000 * hold)]


def save_animation(pictures: list, path: Path, fmt: str, durations: list[int], loop: bool = True) -> None:
    """Write PICTURES as an animated GIF or WebP, atomically. Loop forever, or play once."""
    first, rest = pictures[0], pictures[1:]
    if fmt == "gif":
        kwargs = {"format": "GIF", "optimize": False, "disposal": 1}
        if loop:
            kwargs["loop"] = 0  # no loop key: no NETSCAPE block, viewers play it once
    else:
        kwargs = {"format": "WEBP", "lossless": True, "loop": 0 if loop else 1}  # lossy merges near-equal steps
    _frames.atomic_write(
        path, lambda f: first.save(f, save_all=True, append_images=rest, duration=durations, **kwargs)
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
    run = load_run(run_dir)
    out_path = out_path or run.dir / f"animation.{fmt}"
    _check_target(out_path, overwrite)

    chosen = every_nth(run.frames, every)
    pictures = [open_frame(f, size) for f in chosen]
    durations = durations_ms(len(pictures), fps, hold)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_animation(pictures, out_path, fmt, durations, loop)
    return Animation(out_path, [f.step for f in chosen], pictures[0].size, durations)


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
    run = load_run(run_dir)
    chosen = pick_steps(run, steps, count)
    out_path = Path(out) if out is not None else run.dir / "sheet.png"
    _check_target(out_path, overwrite)
    columns = columns or math.ceil(math.sqrt(len(chosen)))

    cells = [labelled(open_frame(f, size), frame_label(f)) for f in chosen]
    sheet = grid(cells, columns)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _frames.save_image(sheet, out_path, "png")
    return Sheet(out_path, [f.step for f in chosen], columns, math.ceil(len(cells) / columns), cells[0].size,
                 sheet.size)


# --------------------------------------------------------------------------- comparing runs


def align_runs(runs: list[Run], align: str | None = None) -> list[tuple[Frame, ...]]:
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
    return _frames.new_dir(root, "compare")


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
    runs = [load_run(d) for d in run_dirs]
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
        _frames.save_image(_side_by_side(maps), diff_path, "png")
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
    _frames.save_image(sheet, sheet_path, "png")
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
    _frames.write_json(json_path, result)
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


def _with_legend(sheet, runs: list[Run]):
    """SHEET under a line naming the runs: '1 = <folder>   2 = <folder> ...'."""
    from PIL import Image, ImageDraw

    legend = "   ".join(f"{i + 1} = {r.name}" for i, r in enumerate(runs))
    out = Image.new("RGB", (sheet.width, sheet.height + LABEL_H), BACKGROUND)
    ImageDraw.Draw(out).text((GAP, GAP), legend, fill=INK, font=_font())
    out.paste(sheet, (0, LABEL_H))
    return out


# --------------------------------------------------------------------------- summary


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """VALUES as unicode bars, low to high; more than WIDTH values are averaged into WIDTH buckets."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return ""
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:]) if b > a]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / (hi - lo) * len(SPARKS)))] for v in values)
