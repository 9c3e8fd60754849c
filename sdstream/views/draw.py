"""Drawing for the views: cells, labels, grids, heat maps, animations. Pillow and numpy only, never torch.

numpy is imported inside functions (the CLI's import path stays light; ruff TID253).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import BadInput
from ..record import files as _files
from ..record.rundir import Frame, RunRecord

ANIMATION_FORMATS = ("gif", "webp")
HOLD_SECONDS = 1.0  # the last frame of an animation stays this much longer on screen
MAX_FPS = 50  # GIF delays are in 1/100 s and most viewers slow anything under 2/100 s
MIN_FPS = 0.1  # a frame at most 10 s on screen
MAX_HOLD = 60.0  # GIF delays are 16-bit hundredths of a second: at most 655 s, and the last frame's holds it
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


def pick_steps(run: RunRecord, steps: list[int] | None = None, count: int | None = None) -> list[Frame]:
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
    if not MIN_FPS <= fps <= MAX_FPS:
        raise BadInput(f"--fps {fps:g} is not allowed: give a number from {MIN_FPS:g} to {MAX_FPS}")
    if not 0 <= hold <= MAX_HOLD:
        raise BadInput(f"--hold {hold:g} is not allowed: give a number of seconds from 0 to {MAX_HOLD:g}")


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
    _files.atomic_write(
        path, lambda f: first.save(f, save_all=True, append_images=rest, duration=durations, **kwargs)
    )


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
