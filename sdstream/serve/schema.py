"""POST /generate's body, made from the request's declarations, and the server's bounds.

Every option the server offers (`served`) is a body field under its API name (the original service's
`guidance_scale` and `noise_mask_type`), optional: a field left out means the option's default, exactly as on
the command line. Values are checked by the same declarations as the CLI's; a message names the API field.
Pictures are base64 (optionally a `data:image/...;base64,` URL) and are decoded from bytes, never written.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from pydantic import ConfigDict, Field, create_model

from .. import masks
from ..errors import BadInput
from ..request import OPTIONS, from_values

_TYPES = {"text": str, "int": int, "float": float, "flag": bool, "steps": int | list[int], "picture": str,
          "choice": str, "names": list[str], "pairs": list[str]}  # pairs: "K:TEXT" strings
SERVED = {name: opt for name, opt in OPTIONS.items() if opt.served}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the one worker; stated in GET / and settable with `serve` options."""

    max_pixels: int = 1024 * 1024  # width x height of a run
    max_work: int = 50 * 1024 * 1024  # steps x width x height
    max_prompt: int = 1000  # characters of a prompt or negative prompt
    max_body_bytes: int = 20 * 1024 * 1024  # a JSON body, base64 pictures included (serve --max-upload-mb)
    max_image_pixels: int = 4096 * 4096  # per uploaded picture, enforced by Pillow while decoding

    def check_run(self, steps: int, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise BadInput(f"width x height {width}x{height} is over this server's limit of {self.max_pixels} pixels")
        if steps * width * height > self.max_work:
            raise BadInput(f"steps x width x height ({steps} x {width}x{height}) is over this server's limit of "
                           f"{self.max_work}")


def _field(opt):
    described = opt.help + (f" Default: {opt.default_text()}." if opt.default_text() else "")
    return _TYPES[opt.kind] | None, Field(None, description=described)


GenerateBody = create_model(
    "GenerateBody",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="POST /generate. Every field is optional; pictures are base64 (optionally a data: URL).",
    **{opt.api_name: _field(opt) for opt in SERVED.values()},
)


def decode_base64(value: str, name: str) -> bytes:
    """Strict base64 (no stray characters), optionally inside a data: URL; BadInput otherwise."""
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadInput(f"{name}: a data URL must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{name} is not valid base64 (standard alphabet, padded, no line breaks)") from None
    if not data:
        raise BadInput(f"{name} is empty")
    return data


def build_request(body, device: str, limits: Limits, model: str | None = None):
    """(the validated GenerationRequest, the pictures decoded) for BODY, or BadInput in API names. MODEL is the
    server's default model (the first it preloaded) for a body that names none."""
    from ..inputs import load_inputs

    try:
        values, uploads = {}, {}
        for name, opt in SERVED.items():
            value = getattr(body, opt.api_name)
            if value is None:
                continue
            if opt.kind == "picture":
                uploads[name], value = decode_base64(value, opt.api_name), "(uploaded)"
            elif name == "mask":  # a pattern name only: a server never reads a path a client names
                if value.strip().lower() == "none":
                    continue
                if masks.canonical(value) is None:
                    raise BadInput(f"{opt.flag} {value!r} is not one of: {', '.join(masks.PATTERNS)}, none")
            values[name] = value
        for name in ("prompt", "negative_prompt"):
            if len(values.get(name) or "") > limits.max_prompt:
                raise BadInput(f"--{name.replace('_', '-')} is {len(values[name])} characters long, over this "
                               f"server's limit of {limits.max_prompt}")
        if values.get("model") is None and model is not None:
            values["model"] = model
        req = from_values({**values, "device": device}).validated()
        if req.width and req.height:
            limits.check_run(req.total_steps - req.first_step + 1, req.width, req.height)
        return req, load_inputs(req, uploads)
    except BadInput as e:
        raise BadInput(api_message(str(e))) from None


_FLAGS = sorted(OPTIONS.values(), key=lambda o: -len(o.flag))  # --prompt-image before --prompt


def api_message(message: str) -> str:
    """A message that names CLI options (--guidance) as the API's fields (guidance_scale)."""
    for opt in _FLAGS:
        message = re.sub(re.escape(opt.flag) + r"(?![\w-])", opt.api_name, message)
    return message
