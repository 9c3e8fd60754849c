"""Noise-injection masks: nine patterns of the original system, at any latent size.

Each pattern is one expression over pixel-centre coordinate grids. The expressions use
only arithmetic, comparisons and `&`/`|`, so the same definition runs on numpy arrays
(terminal and PNG previews, no torch import) and on torch tensors (the denoise loop).
"""

from __future__ import annotations

# name -> (description, aliases). Order is the order users see.
PATTERNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "circle": ("a centred disc, diameter half the shorter side", ("center_circle", "centre_circle")),
    "square": ("a centred square, half the width and height", ("center_square", "centre_square")),
    "edges": ("a border one eighth of the shorter side wide", ()),
    "corners": ("four corner squares, a quarter of the shorter side each", ()),
    "left-half": ("the left half", ()),
    "right-half": ("the right half", ()),
    "top-half": ("the top half", ()),
    "bottom-half": ("the bottom half", ()),
    "checkerboard": ("alternating cells, eight across the shorter side", ("checker", "checkers")),
}


def canonical(name: str) -> str | None:
    """The pattern name for NAME or one of its aliases (`center_circle`, `left_half`…), else None."""
    key = name.strip().lower().replace("_", "-")
    for pattern, (_, aliases) in PATTERNS.items():
        if key == pattern or key in {a.replace("_", "-") for a in aliases}:
            return pattern
    return None


def _inside(pattern: str, y, x, h: int, w: int):
    """Boolean grid: True where PATTERN is set. y, x are integer row/column grids."""
    side = min(h, w)
    cy, cx = (y + 0.5) - h / 2, (x + 0.5) - w / 2  # offsets of pixel centres from the centre
    if pattern == "circle":
        return cy * cy + cx * cx <= (side / 4) ** 2
    if pattern == "square":
        return (abs(cy) <= h / 4) & (abs(cx) <= w / 4)
    if pattern == "edges":
        b = max(1, side // 8)
        return (y < b) | (y >= h - b) | (x < b) | (x >= w - b)
    if pattern == "corners":
        c = max(1, side // 4)
        return ((y < c) | (y >= h - c)) & ((x < c) | (x >= w - c))
    if pattern == "left-half":
        return (x + 0.5 <= w / 2)
    if pattern == "right-half":
        return (x + 0.5 > w / 2)
    if pattern == "top-half":
        return (y + 0.5 <= h / 2)
    if pattern == "bottom-half":
        return (y + 0.5 > h / 2)
    if pattern == "checkerboard":
        c = max(1, side // 8)
        return (y // c + x // c) % 2 == 0
    raise KeyError(pattern)


def mask_array(pattern: str, h: int, w: int):
    """The pattern as a float32 numpy array of shape (h, w) with values 0 or 1."""
    import numpy as np

    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return _inside(pattern, y, x, h, w).astype(np.float32)


def mask_tensor(pattern: str, h: int, w: int, device="cpu", dtype=None):
    """The pattern as a (1, 1, h, w) torch tensor with values 0 or 1."""
    import torch

    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = _inside(pattern, y, x, h, w).to(dtype or torch.float32)
    return mask[None, None].to(device)


def mask_from_image(image, h: int, w: int, device="cpu", dtype=None):
    """A soft mask from a grey-level PIL image: white = full noise, black = none."""
    import numpy as np
    import torch
    from PIL import Image

    grey = image.convert("L").resize((w, h), Image.Resampling.BOX)
    values = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
    return values[None, None].to(device=device, dtype=dtype or torch.float32)
