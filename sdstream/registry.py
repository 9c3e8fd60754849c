"""Model aliases and how a --model string resolves to a place to load from. Pure Python."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "compressibility"  # as the original service

# alias -> (hub repo id, family, what it is)
ALIASES: dict[str, tuple[str, str, str]] = {
    "aesthetic": ("kvablack/ddpo-aesthetic", "SD 1.x", "DDPO fine-tune of SD 1.4 for aesthetic score"),
    "alignment": ("kvablack/ddpo-alignment", "SD 1.x", "DDPO fine-tune of SD 1.4 for prompt alignment"),
    "compressibility": ("kvablack/ddpo-compressibility", "SD 1.x", "DDPO fine-tune of SD 1.4 for JPEG compressibility"),
    "incompressibility": (
        "kvablack/ddpo-incompressibility",
        "SD 1.x",
        "DDPO fine-tune of SD 1.4 for JPEG incompressibility",
    ),
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "SD 1.x", "Stable Diffusion 1.5"),
    "tiny": ("(embedded)", "toy", "toy SD trained by sdstream on coloured shapes, 32x32, offline: demos and tests"),
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is 'tiny', 'local' (a folder) or 'hub' (a repo id)."""

    name: str  # what the user typed (or the default)
    kind: str
    location: str  # folder path or repo id
    alias: str | None = None


def default_model() -> str:
    return os.environ.get("SDSTREAM_MODEL") or DEFAULT_MODEL


def resolve(model: str | None) -> ModelSource:
    """Turn a --model value into a ModelSource, or raise BadInput naming what is allowed."""
    from .errors import BadInput

    name = (model or default_model()).strip()
    if name == "tiny":
        return ModelSource(name, "tiny", "tiny", alias="tiny")
    if name in ALIASES:
        return ModelSource(name, "hub", ALIASES[name][0], alias=name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInput(
                f"--model {name!r} is a file; a local model must be a diffusers folder with model_index.json"
            )
        return ModelSource(name, "local", str(path.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BadInput(f"--model {name!r}: no such folder")
    if _REPO_ID.match(name):
        return ModelSource(name, "hub", name)
    allowed = ", ".join(ALIASES)
    raise BadInput(f"--model {name!r} is not an alias ({allowed}), a Hugging Face repo id (owner/name) or a folder")
