"""The user's pictures, decoded once: from a file (CLI, batch) or from bytes (the server), before torch is imported.

Opening is strict: an allow-list of formats, bomb and truncation checks, EXIF orientation, and pixel values read
by the picture's real range (a 16-bit or float picture is scaled, not clipped to white).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# the request fields that name pictures, and the mode each is used in (a mask is grey levels)
PICTURES = {"init_image": "RGB", "start_image": "RGB", "prompt_image": "RGB", "mask": "L"}


@dataclass(frozen=True)
class Inputs:
    """A request's pictures, decoded: field name -> PIL image (a mask only when it is a picture, not a pattern)."""

    pictures: dict = field(default_factory=dict)

    def get(self, name: str):
        return self.pictures.get(name)


def load_inputs(req, uploads: dict[str, bytes] | None = None) -> Inputs:
    """Decode every picture REQ names, from UPLOADS[field] where given, else from the file the field names."""
    from .request import OPTIONS

    pictures = {}
    for name, mode in PICTURES.items():
        value = getattr(req, name)
        if value is None or (name == "mask" and req.mask_is_pattern):
            continue
        data = (uploads or {}).get(name)
        pictures[name] = open_image(data if data is not None else value, OPTIONS[name].flag, mode)
    return Inputs(pictures)


def open_image(source: str | Path | bytes, option: str, mode: str = "RGB"):
    """SOURCE (a path, or the bytes of an upload) fully decoded, EXIF-rotated and converted to MODE by its real
    range, or BadInput naming OPTION."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, bytes):
        shown, opened = "(uploaded)", io.BytesIO(source)
    else:
        shown, opened = repr(str(source)), Path(source).expanduser()
        if not opened.is_file():
            raise BadInput(f"{option} {shown}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata (corrupt EXIF, TIFF tags)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened, formats=FORMATS) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _eight_bit(img).convert(mode)
    except UnidentifiedImageError:
        raise BadInput(f"{option} {shown} is not an image sdstream reads ({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(
            f"{option} {shown} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"{option} {shown} is corrupt or truncated ({e})") from None


def _eight_bit(img):
    """IMG with its values on 0-255: Pillow's own convert() clips 16-bit and float values instead of scaling them.

    16-bit integers (I;16*) span 0-65535; 32-bit integers (I) are taken as 16-bit when they go past 255;
    floats (F) span 0-1.
    """
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    import numpy as np
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scaled = values * 255
    elif img.mode.startswith("I;16") or values.max(initial=0) > 255:
        scaled = values / 257
    else:
        scaled = values
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def fit(image, width: int, height: int):
    """IMAGE centre-cropped to the aspect ratio of WIDTH x HEIGHT (the resize itself is diffusers' preprocess)."""
    w, h = image.size
    if w * height == h * width:
        return image
    if w * height > h * width:  # too wide: keep the middle columns
        keep = round(h * width / height)
        return image.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
    keep = round(w * height / width)
    return image.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))
