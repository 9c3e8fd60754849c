"""The synthetic world of the trained `tiny`: one flat shape on a flat background, 32x32 RGB.

Everything is seeded: the same numpy Generator state gives the same pictures on every machine.

    colour, shape, background:  6 colours x 3 shapes x 5 other colours = 90 combinations
    caption:                    "a red circle on a blue background"
    geometry:                   side 10..22 px, at least 2 px from the border, drawn 4x supersampled
                                (smooth edges); circles fill pi/4 of their box, squares all of it,
                                upright isosceles triangles half of it

The held-out split (HOLDOUT, EVAL_CASES) is used only for evaluation: the HOLDOUT combinations
never appear in training, and every combination gets fixed evaluation seeds (the generation
seed, and the seed of its rendered ground truth). classify() reads a picture back into
(background, shape colour, shape) from pixel statistics alone; the eval script applies it to
generated pictures, tests/test_shapes_classifier.py to rendered ones.

Only numpy and Pillow at import; torch is imported by sample_batch() alone.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # picture side, px
SUPERSAMPLE = 4
MIN_SIDE, MAX_SIDE = 10, 22  # shape bounding box side, px
MARGIN = 2  # px of background kept around the shape

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}  # share of the bounding box the shape covers

COMBOS: tuple[tuple[str, str, str], ...] = tuple(
    (c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c
)  # (shape colour, shape, background): 90

# Never trained on: one per shape colour, every shape and every background colour at least once.
HOLDOUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "yellow"),
    ("green", "square", "blue"),
    ("blue", "triangle", "white"),
    ("yellow", "square", "black"),
    ("white", "circle", "green"),
    ("black", "triangle", "red"),
)
TRAIN_COMBOS = tuple(c for c in COMBOS if c not in HOLDOUT)

EVAL_SEED_BASE = 900_000  # evaluation seeds live here; training draws from its own generators
EVAL_SEEDS_PER_COMBO = 2


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def _eval_cases() -> tuple[tuple[str, str, str, int], ...]:
    """(colour, shape, background, seed) for every combination and seed, in a fixed mixed order
    (i -> 37 i mod n is a permutation), so that any prefix (eval --limit) covers many combinations."""
    flat = [combo + (EVAL_SEED_BASE + k * len(COMBOS) + i,) for k in range(EVAL_SEEDS_PER_COMBO)
            for i, combo in enumerate(COMBOS)]
    n = len(flat)
    assert np.gcd(37, n) == 1
    return tuple(flat[(37 * i) % n] for i in range(n))


EVAL_CASES = _eval_cases()  # 180


def render(colour: str, shape: str, background: str, rng: np.random.Generator,
           side: int | None = None, x: int | None = None, y: int | None = None) -> Image.Image:
    """One 32x32 RGB picture: SHAPE in COLOUR on BACKGROUND, size and position drawn from RNG
    (or given). Side in px; (x, y) = top-left corner of its bounding box."""
    if colour == background:
        raise ValueError(f"the shape colour and the background are both {colour}")
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    if side is None:
        side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    hi = SIZE - MARGIN - side
    if x is None:
        x = int(rng.integers(MARGIN, hi + 1))
    if y is None:
        y = int(rng.integers(MARGIN, hi + 1))
    k = SUPERSAMPLE
    big = Image.new("RGB", (SIZE * k, SIZE * k), COLOURS[background])
    draw = ImageDraw.Draw(big)
    x0, y0, x1, y1 = x * k, y * k, (x + side) * k - 1, (y + side) * k - 1
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    else:  # upright isosceles triangle: apex at the top centre, base along the bottom of the box
        draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


def sample(rng: np.random.Generator, combos=TRAIN_COMBOS) -> tuple[Image.Image, str]:
    """One random training picture and its caption."""
    colour, shape, background = combos[int(rng.integers(len(combos)))]
    return render(colour, shape, background, rng), caption(colour, shape, background)


def sample_arrays(n: int, rng: np.random.Generator, combos=TRAIN_COMBOS) -> tuple[np.ndarray, list[str]]:
    """N pictures as a uint8 (N, 32, 32, 3) array, and their captions."""
    pics, caps = zip(*(sample(rng, combos) for _ in range(n)))
    return np.stack([np.asarray(p) for p in pics]), list(caps)


def sample_batch(n: int, rng: np.random.Generator, combos=TRAIN_COMBOS):
    """N pictures as a float32 torch tensor (N, 3, 32, 32) in [-1, 1], and their captions."""
    import torch

    pixels, caps = sample_arrays(n, rng, combos)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(), caps


def eval_truth(case: tuple[str, str, str, int]) -> Image.Image:
    """The rendered ground truth of an evaluation case (colour, shape, background, seed)."""
    colour, shape, background, seed = case
    return render(colour, shape, background, np.random.default_rng(seed))


def default_threads() -> int:
    """Torch threads for the tools: $OMP_NUM_THREADS when set, else every core this process may use."""
    import os

    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- reading a picture back ---------------------------------------------------------------------

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64)
_BOUNDS = ((FILL["square"] + FILL["circle"]) / 2, (FILL["circle"] + FILL["triangle"]) / 2)  # 0.89, 0.64


def nearest_colour(rgb, exclude: str | None = None) -> str:
    d = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float64), axis=1)
    if exclude is not None:
        d[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(d))]


def classify(picture) -> dict:
    """Read (background, colour, shape) back from a picture (PIL image or HxWx3 uint8 array).

    background: the palette colour nearest to the median of the border pixels.
    colour:     the palette colour (other than the background) nearest to the median of the pixels
                that clearly differ from the background.
    shape:      from the share of its bounding box the shape fills (largest connected region of
                pixels nearer the shape's colour than the background's): square ~1, circle ~0.785,
                triangle ~0.5, split at the midpoints.
    Also returns fill (that share), area (px) and box (x0, y0, x1, y1); shape/colour are None when
    nothing differs from the background.
    """
    a = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture, dtype=np.float64)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb)
    result = {"background": background, "colour": None, "shape": None, "fill": None, "area": 0, "box": None}

    dist_bg = np.linalg.norm(a - bg_rgb, axis=2)
    clear = dist_bg > 100  # well away from the background: shape interiors, not soft edges or noise
    if clear.sum() < 4:
        return result
    fg_rgb = np.median(a[clear], axis=0)
    result["colour"] = nearest_colour(fg_rgb, exclude=background)

    # Half-coverage mask: nearer the shape's own colour than the background's (so soft edges count by half).
    mask = np.linalg.norm(a - fg_rgb, axis=2) < dist_bg
    region = _largest_component(mask)
    ys, xs = np.nonzero(region)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    area = int(region.sum())
    fill = area / float((x1 - x0 + 1) * (y1 - y0 + 1))
    shape = "square" if fill >= _BOUNDS[0] else "circle" if fill >= _BOUNDS[1] else "triangle"
    result.update(shape=shape, fill=round(fill, 4), area=area, box=(int(x0), int(y0), int(x1), int(y1)))
    return result


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a plain flood fill: 32x32 is tiny)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        current += 1
        labels[sy, sx] = current
        stack, size = [(sy, sx)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best
