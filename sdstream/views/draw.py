"""Drawing for the views: scaling, cells, labels, badges, grids, heat maps, animations. Pillow and numpy only.

numpy is imported inside functions (the CLI's import path stays light; ruff TID253).

Pictures are shown at the run's image size unless a size is asked for: a frame smaller than the image (the
latent-size `--preview approx` frames) is enlarged smoothly up to the image's size, and only beyond it with
nearest-neighbour (the image's own pixels stay crisp). Text is drawn in Pillow's own font at a size that follows
the cell, and is wrapped (or made smaller) to fit: a label never loses a word.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from ..errors import BadInput, SdstreamError
from ..record import files as _files
from ..record.rundir import Frame, RunRecord, register_files

ANIMATION_FORMATS = ("gif", "webp")
PICTURE_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}  # --out suffix -> format
HOLD_SECONDS = 1.0  # the last frame of an animation stays this much longer on screen
INJECT_HOLD = 0.5  # and a frame that shows an injection of noise this much longer (with its badge)
MAX_FPS = 50  # GIF delays are in 1/100 s and most viewers slow anything under 2/100 s
MIN_FPS = 0.1  # a frame at most 10 s on screen
MAX_HOLD = 60.0  # GIF delays are 16-bit hundredths of a second: at most 655 s, and the last frame's holds it
DEFAULT_CELL = 256  # longer side of each picture in a sheet, comparison or grid
SHEET_COUNT = 16  # steps on a contact sheet by default (evenly spaced, the last and the injected ones included)
COMPARE_COUNT = 8  # rows on a comparison sheet by default
GAP = 4  # pixels between cells (and around the edge) on sheets and comparison strips
BACKGROUND = (24, 24, 24)
INK = (230, 230, 230)
DIM_INK = (150, 150, 150)
BADGE = (255, 64, 192)  # the injected-noise badge: a colour no run of tiny's palette (or a heat map) makes
BADGE_INK = (16, 0, 10)
BADGE_TEXT = "noise"
SIZE_RANGE = (8, 4096)
MIN_FONT, MAX_FONT = 8, 48  # pixel sizes of the label font
SEP = " · "  # between the parts of a label; a label wraps here first

# A coarse 'inferno' colour map (dark = equal, bright = different), interpolated linearly.
_INFERNO = (
    (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
    (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164),
)

# --------------------------------------------------------------------------- pictures


def image_size(run: RunRecord) -> tuple[int, int] | None:
    """The run's image size (width, height) as run.json records it, or None."""
    w, h = run.manifest.get("width"), run.manifest.get("height")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h))
    return (w, h) if ok else None


def open_picture(path: Path, what: str = "frame"):
    """The picture at PATH as RGB, or BadInput naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise BadInput(f"cannot read {what} {str(path)!r}: {e}") from e


def open_frame(frame: Frame, size: int | None = None, native: tuple[int, int] | None = None):
    """FRAME's picture as RGB, scaled by `fit` (SIZE: its longer side; NATIVE: the run's image size)."""
    return fit(open_picture(frame.path), size, native)


def fit(im, size: int | None = None, native: tuple[int, int] | None = None):
    """IM with its longer side SIZE pixels (default: NATIVE's longer side, else as it is).

    A picture smaller than NATIVE (a latent-size preview) is enlarged smoothly (bicubic) up to NATIVE's size,
    and beyond it with nearest-neighbour, like the image itself; shrinking is Lanczos."""
    from PIL import Image

    longest = max(im.size)
    native_long = max(native) if native else longest
    target = size or native_long
    if target <= longest:
        return _resized(im, target, Image.Resampling.LANCZOS)
    if longest < native_long:
        im = _resized(im, min(target, native_long), Image.Resampling.BICUBIC)
        if target <= native_long:
            return im
    return _resized(im, target, Image.Resampling.NEAREST)


def _resized(im, side: int, method):
    factor = side / max(im.size)
    new = (max(1, round(im.width * factor)), max(1, round(im.height * factor)))
    return im if new == im.size else im.resize(new, method)


# --------------------------------------------------------------------------- choosing frames


def every_nth(frames: list[Frame], every: int) -> list[Frame]:
    """Every EVERY-th frame, starting with the first; the last frame always."""
    chosen = frames[::every]
    if (len(frames) - 1) % every:
        chosen.append(frames[-1])
    return chosen


def evenly_spaced(items: list, count: int) -> list:
    """COUNT items spread evenly over ITEMS, first and last included (all of them if fewer)."""
    return [items[i] for i in spaced_indices(len(items), count)]


def spaced_indices(n: int, count: int, must: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """COUNT indices spread evenly over range(N), first and last included, and every index in MUST.

    Each index of MUST that the even spread missed takes the place of the nearest pick that is neither an end
    nor in MUST (the later one on a tie, so the step before an injection stays); where none is left, it is
    added. So the count stays COUNT where it can."""
    if count >= n:
        return list(range(n))
    picks = [n - 1] if count == 1 else sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})
    for m in sorted(i for i in must if 0 <= i < n):
        if m in picks:
            continue
        free = [p for p in picks if p not in must and p not in (0, n - 1)]
        if free:
            picks.remove(min(free, key=lambda p: (abs(p - m), -p)))
        picks = sorted({*picks, m})
    return picks


def injections(run: RunRecord) -> dict[int, list[int]]:
    """Frame step -> the injected steps that frame is the first to show: its own step, or steps since the
    previous recorded frame (frames written every Nth step may skip the injected one)."""
    injected, marks, previous = sorted(run.injected), {}, -math.inf
    for frame in run.frames:
        hits = [k for k in injected if previous < k <= frame.step]
        if hits:
            marks[frame.step] = hits
        previous = frame.step
    return marks


def badge_text(step: int, hits: list[int]) -> str:
    """'noise' on the injected step's own frame, 'noise @10' on a later frame that is the first to show it."""
    return BADGE_TEXT if hits == [step] else f"{BADGE_TEXT} @{','.join(map(str, hits))}"


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
    """The frames for STEPS (each must have a frame), or COUNT evenly spaced (default up to 16), first and last
    included and always the frames that show an injection."""
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
    marked = injections(run)
    must = {i for i, f in enumerate(run.frames) if f.step in marked}
    return [run.frames[i] for i in spaced_indices(len(run.frames), count, must)]


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

# --------------------------------------------------------------------------- text


@lru_cache(maxsize=64)
def font(px: int):
    """Pillow's own font at PX pixels (its fixed bitmap font where Pillow has no FreeType)."""
    from PIL import ImageFont, features

    if features.check("freetype2"):
        return ImageFont.load_default(size=px)
    return ImageFont.load_default()


def font_px(width: int) -> int:
    """The label font's size for a cell WIDTH pixels wide: 10 pixels at 64, 20 at 256, 34 at 512, at most 48."""
    return max(10, min(MAX_FONT, round(6 + width * 0.055)))


def header_px(width: int) -> int:
    """The header and title font's size for cells WIDTH pixels wide: a little larger than the labels'."""
    return max(12, min(MAX_FONT, round(font_px(width) * 1.2)))


def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def frame_label(frame: Frame) -> str:
    """'step 10 · t=601' (the timestep where the run recorded one)."""
    label = f"step {frame.step}"
    return label if frame.timestep is None else f"{label}{SEP}t={_num(frame.timestep)}"


def _width(fnt, text: str) -> float:
    return fnt.getlength(text)


def _line_height(fnt) -> int:
    return fnt.getbbox("Ayg|")[3] + max(2, round(getattr(fnt, "size", 10) * 0.25))


def wrap(text: str, fnt, width: float, force: bool = False) -> list[str] | None:
    """TEXT in lines no wider than WIDTH, broken at ' · ' first and then at spaces; None where a single word is
    wider (with FORCE, that word gets a line of its own). Nothing is ever dropped."""
    units: list[tuple[str, str]] = []  # (what joins it to the unit before, the unit)
    for i, part in enumerate(text.split(SEP)):
        words = [part] if _width(fnt, part) <= width else part.split(" ")
        units += [(SEP if i and not j else " " if j else "", w) for j, w in enumerate(words)]
    lines: list[str] = []
    for joiner, word in units:
        if _width(fnt, word) > width and not force:
            return None
        if lines and _width(fnt, lines[-1] + joiner + word) <= width:
            lines[-1] += joiner + word
        else:
            lines.append(word)
    return lines


@dataclass
class Layout:
    """Texts laid out for boxes WIDTH wide: each text's lines, in one font; every box HEIGHT high."""

    px: int
    lines: list[list[str]]
    width: int  # at least the width asked for; more only where a word is wider than that at the smallest font
    height: int

    @property
    def font(self):
        return font(self.px)

    def part(self, start: int, count: int) -> Layout:
        """The same layout for COUNT of its texts from START (one row of cells laid out with all the others)."""
        return Layout(self.px, self.lines[start:start + count], self.width, self.height)


def layout(texts: list[str], width: int, *, px: int | None = None, max_lines: int = 2, uniform: bool = True,
           pad: int = 2) -> Layout:
    """TEXTS in boxes WIDTH wide, in the largest font up to PX (default: one that follows WIDTH) where each
    takes at most MAX_LINES lines. UNIFORM: all on one line, or else every text broken at each ' · ' (cell
    labels look alike); otherwise each wraps as it fits. At the smallest font a text takes as many lines as it
    needs, and a word wider than the box widens it: nothing is dropped."""
    inner = max(1, width - 2 * pad)
    for size in range(px or font_px(width), MIN_FONT - 1, -1):
        fnt = font(size)
        if uniform and all(_width(fnt, t) <= inner for t in texts):
            found = [[t] for t in texts]
        elif uniform:
            found = [t.split(SEP) for t in texts]
            if any(len(ls) > max_lines or any(_width(fnt, ln) > inner for ln in ls) for ls in found):
                found = None
        else:
            found = [wrap(t, fnt, inner) for t in texts]
            if any(ls is None or len(ls) > max_lines for ls in found):
                found = None
        if found is not None:
            return _layout(size, found, width, pad)
    fnt = font(MIN_FONT)
    return _layout(MIN_FONT, [wrap(t, fnt, inner, force=True) for t in texts], width, pad)


def _layout(px: int, lines: list[list[str]], width: int, pad: int) -> Layout:
    fnt = font(px)
    widest = max((_width(fnt, ln) for ls in lines for ln in ls), default=0)
    rows = max((len(ls) for ls in lines), default=1)
    return Layout(px, lines, max(width, math.ceil(widest) + 2 * pad), rows * _line_height(fnt) + 2 * pad)


def draw_lines(image, lines: list[str], box: tuple[int, int, int, int], fnt, *, fill=INK, align: str = "center",
               valign: str = "top", pad: int = 2) -> None:
    """LINES of text in BOX (x0, y0, x1, y1) of IMAGE: centred or left-aligned, from the top or centred."""
    from PIL import ImageDraw

    draw, x0, y0, x1, y1 = ImageDraw.Draw(image), *box
    line_h = _line_height(fnt)
    if valign == "top":
        top = y0 + pad
    else:  # the ink of the lines (cap height to descender), centred
        _, ink_top, _, ink_bottom = fnt.getbbox("Ag")
        top = y0 + round((y1 - y0 - (line_h * (len(lines) - 1) + ink_bottom - ink_top)) / 2) - ink_top
    for i, line in enumerate(lines):
        w = _width(fnt, line)
        x = x0 + pad if align == "left" else x0 + max(pad, (x1 - x0 - w) / 2)
        draw.text((round(x), top + i * line_h), line, fill=fill, font=fnt)


def text_block(text: str, width: int, *, px: int | None = None, fill=INK, align: str = "left", max_lines: int = 3,
               pad: int = GAP):
    """TEXT wrapped into a strip WIDTH wide (a title, a legend line)."""
    from PIL import Image

    lay = layout([text], width, px=px, max_lines=max_lines, uniform=False, pad=pad)
    strip = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw_lines(strip, lay.lines[0], (0, 0, lay.width, lay.height), lay.font, fill=fill, align=align, pad=pad)
    return strip

# --------------------------------------------------------------------------- cells


def with_badge(picture, text: str = BADGE_TEXT):
    """A copy of PICTURE with a BADGE-coloured tag in its top-left corner: TEXT where it fits in 60% of the
    width, else a plain corner triangle (small pictures)."""
    from PIL import ImageDraw

    im = picture.copy()
    draw = ImageDraw.Draw(im)
    px = max(MIN_FONT, min(MAX_FONT, round(im.width * 0.09)))
    fnt, pad = font(px), max(2, px // 4)
    left, top, right, bottom = fnt.getbbox(text)
    w, h = math.ceil(right - left) + 2 * pad, (bottom - top) + 2 * pad
    if im.width >= 64 and w <= 0.6 * im.width and h <= 0.4 * im.height:
        draw.rectangle((0, 0, w - 1, h - 1), fill=BADGE)
        draw.text((pad - left, pad - top), text, fill=BADGE_INK, font=fnt)
    else:
        s = max(4, min(im.size) // 3)
        draw.polygon([(0, 0), (s - 1, 0), (0, s - 1)], fill=BADGE)
    return im


def cells(pictures: list, labels: list[str] | None = None, badges: list[str | None] | None = None,
          label_layout: Layout | None = None, width: int = 0) -> list:
    """PICTURES as cells of one size: each centred in its cell, the injected ones badged (BADGES: the badge's
    text or None), with its label below (LABELS: wrapped or made smaller to fit, all cells alike; a badged
    cell's label in the badge's colour). Cells are at least WIDTH wide."""
    from PIL import Image

    badges = badges or [None] * len(pictures)
    pictures = [p if b is None else with_badge(p, b) for p, b in zip(pictures, badges)]
    pw, ph = max(p.width for p in pictures), max(p.height for p in pictures)
    lay = label_layout or (layout(labels, pw) if labels is not None else None)
    width, strip = (max(pw, lay.width, width), lay.height) if lay else (max(pw, width), 0)
    out = []
    for i, picture in enumerate(pictures):
        cell = Image.new("RGB", (width, ph + strip), BACKGROUND)
        cell.paste(picture, ((width - picture.width) // 2, (ph - picture.height) // 2))
        if lay:
            draw_lines(cell, lay.lines[i], (0, ph, width, ph + strip), lay.font,
                       fill=INK if badges[i] is None else BADGE)
        out.append(cell)
    return out


def grid(cells: list, columns: int, gap: int = GAP, margin: int | None = None):
    """CELLS (all the same size) in rows of COLUMNS, GAP pixels apart and MARGIN (default GAP) around the edge."""
    from PIL import Image

    margin = gap if margin is None else margin
    cw, ch = cells[0].size
    columns = min(columns, len(cells))
    rows = math.ceil(len(cells) / columns)
    sheet = Image.new("RGB", (columns * cw + (columns - 1) * gap + 2 * margin,
                              rows * ch + (rows - 1) * gap + 2 * margin), BACKGROUND)
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        sheet.paste(cell, (margin + c * (cw + gap), margin + r * (ch + gap)))
    return sheet


def stack(*parts, gap: int = 0):
    """PARTS one under the other, left-aligned, on the background (None parts left out)."""
    from PIL import Image

    parts = [p for p in parts if p is not None]
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts) + gap * (len(parts) - 1)),
                    BACKGROUND)
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height + gap
    return out


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


def colour_bar(width: int, scale_max: float, px: int | None = None):
    """The heat maps' colour scale as a strip WIDTH wide: a gradient from 0 to SCALE_MAX with its ticks, and
    what the numbers are."""
    import numpy as np
    from PIL import Image, ImageDraw

    px = px or font_px(width // 3)
    fnt = font(px)
    title = text_block("difference per pixel: |A - B| averaged over R, G, B, in levels of 255 (0 = equal); "
                       f"brightest = {_num(round(scale_max, 2))}, the largest in this comparison", width, px=px)
    bar_w, bar_h = max(16, min(width - 2 * GAP, 40 * px)), max(6, px)
    ramp = heatmap(np.tile(np.linspace(0, max(scale_max, 1e-6), bar_w, dtype=np.float32), (bar_h, 1)),
                   max(scale_max, 1e-6))
    ticks = sorted({0.0, *([scale_max / 2, scale_max] if scale_max > 0 else [])})
    strip = Image.new("RGB", (width, bar_h + _line_height(fnt) + 3 * GAP), BACKGROUND)
    strip.paste(ramp, (GAP, GAP))
    draw = ImageDraw.Draw(strip)
    for value in ticks:
        x = GAP + round((bar_w - 1) * (value / scale_max if scale_max > 0 else 0))
        draw.line((x, GAP + bar_h, x, GAP + bar_h + 3), fill=INK)
        text = _num(round(value, 1))
        w = _width(fnt, text)
        draw.text((round(min(max(GAP, x - w / 2), GAP + bar_w - w)), GAP + bar_h + 4), text, fill=INK, font=fnt)
    return stack(title, strip)

# --------------------------------------------------------------------------- writing


def check_out(path: Path, formats: dict[str, str], overwrite: bool) -> str:
    """The format --out PATH asks for by its suffix (one of FORMATS), after checking that it may be written."""
    suffix = path.suffix.lower().lstrip(".")
    names = " or ".join(f".{s}" for s in dict.fromkeys(formats))
    if suffix not in formats:
        what = f"ends in .{suffix}, which is not a format this writes" if suffix else "has no suffix"
        raise BadInput(f"--out {str(path)!r} {what}; give a name ending in {names}")
    _check_target(path, overwrite)
    return formats[suffix]


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise BadInput(f"--out {str(path)!r} is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise BadInput(f"{str(path)!r} exists; pass --overwrite or choose another --out")
    long = next((part for part in path.parts if len(part.encode()) > 255), None)
    if long is not None:
        raise BadInput(f"--out {str(path)!r}: the name {long[:40]!r}… is {len(long.encode())} bytes long; a file "
                       "name can have at most 255")


def new_file(root: Path, name: str, suffix: str) -> Path:
    """ROOT/<time>-NAME.SUFFIX, or with -2, -3… appended: a file name nothing has taken (like record's new_dir)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{stamp}-{name}{suffix}", 1
    while os.path.lexists(path):
        n += 1
        path = root / f"{stamp}-{name}-{n}{suffix}"
    return path


def _check_size(size: int | None, flag: str = "--size") -> None:
    if size is not None and not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise BadInput(f"{flag} {size}: must be between {SIZE_RANGE[0]} and {SIZE_RANGE[1]} pixels")


def _check_columns(columns: int | None) -> None:
    if columns is not None and columns < 1:
        raise BadInput(f"--columns {columns}: must be 1 or more")


def _check_animation(fmt: str, fps: float, hold: float) -> None:
    if fmt not in ANIMATION_FORMATS:
        raise BadInput(f"--format {fmt!r}: choose {' or '.join(ANIMATION_FORMATS)}")
    if not MIN_FPS <= fps <= MAX_FPS:
        raise BadInput(f"--fps {fps:g} is not allowed: give a number from {MIN_FPS:g} to {MAX_FPS}")
    if not 0 <= hold <= MAX_HOLD:
        raise BadInput(f"--hold {hold:g} is not allowed: give a number of seconds from 0 to {MAX_HOLD:g}")


def _resolve_format(fmt: str | None, out: Path | None) -> str:
    """FMT, or the --out file's suffix, or gif; a suffix that is not an animation format, or contradicts FMT, is
    an error."""
    if out is not None:
        suffix = out.suffix.lower().lstrip(".")
        if suffix not in ANIMATION_FORMATS:
            what = f"ends in .{suffix}, which is not an animation format" if suffix else "has no suffix"
            raise BadInput(f"--out {str(out)!r} {what}; give a name ending in .gif or .webp")
        if fmt is not None and fmt.lower() != suffix:
            raise BadInput(f"--out {str(out)!r} ends in .{suffix} but --format is {fmt.lower()}")
        return suffix
    return (fmt or "gif").lower()


def durations_ms(n: int, fps: float, hold: float = HOLD_SECONDS, pauses: set[int] | frozenset[int] = frozenset()
                 ) -> list[int]:
    """Per-frame display times: 1/fps each, the last HOLD seconds longer, the frames at PAUSES (those that show
    an injection) INJECT_HOLD seconds longer."""
    each = max(10, round(1000 / fps))
    times = [each + (round(1000 * INJECT_HOLD) if i in pauses else 0) for i in range(n)]
    times[-1] += round(1000 * hold)
    return times


def _writing(path: Path, write) -> None:
    """WRITE() into PATH's folder (made if need be); an OSError is one line naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write()
    except OSError as e:
        raise SdstreamError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def save_picture(image, path: Path, fmt: str = "png") -> None:
    """IMAGE into PATH atomically (a sheet, a grid); listed in the run's run.json when PATH is in a run folder."""
    _writing(path, lambda: _files.save_image(image, path, fmt))
    register_if_in_run(path)


def save_animation(pictures: list, path: Path, fmt: str, durations: list[int], loop: bool = True) -> None:
    """Write PICTURES as an animated GIF or WebP, atomically. Loop forever, or play once."""
    first, rest = pictures[0], pictures[1:]
    if fmt == "gif":
        kwargs = {"format": "GIF", "optimize": False, "disposal": 1}
        if loop:
            kwargs["loop"] = 0  # no loop key: no NETSCAPE block, viewers play it once
    else:
        kwargs = {"format": "WEBP", "lossless": True, "loop": 0 if loop else 1}  # lossy merges near-equal steps
    _writing(path, lambda: _files.atomic_write(
        path, lambda f: first.save(f, save_all=True, append_images=rest, duration=durations, **kwargs)))


def register_if_in_run(path: Path) -> None:
    """A file a view wrote straight into a run folder is listed as the run's own (so --overwrite replaces it)."""
    if (path.parent / "run.json").is_file():
        register_files(path.parent, [path.name])


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
