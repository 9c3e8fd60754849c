"""Opening user images safely: an allow-list of formats, bomb and truncation checks, EXIF orientation."""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import BadInput

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def open_image(path: str | Path, option: str, mode: str = "RGB"):
    """Open PATH fully decoded, EXIF-rotated and converted to MODE, or raise BadInput naming OPTION."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInput(f"{option} {str(path)!r}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p, formats=FORMATS) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return img.convert(mode)
    except UnidentifiedImageError:
        raise BadInput(f"{option} {str(path)!r} is not an image sdstream reads ({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(
            f"{option} {str(path)!r} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"{option} {str(path)!r} is corrupt or truncated ({e})") from None


def fit(image, width: int, height: int):
    """Resize to exactly width x height, keeping the aspect ratio by cropping the centre."""
    from PIL import Image, ImageOps

    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
