"""A model folder's sdstream.json: what sdstream needs to know of a model that diffusers' configs don't say.

  "vocabulary": the only words the model knows; check_vocabulary() refuses any other word, listing the ones
                it knows, instead of letting the tokenizer split it into pieces the model never saw;
  "latent_rgb": {"weights": [[r, g, b] per latent channel], "bias": [r, g, b]}, the linear map from its
                latents to RGB for `--preview approx` (SD 1.x's factors would give wrong colours);
  "preview":    the frame decoder `--preview auto` picks for it (approx, vae or taesd).

The embedded `tiny` carries one (sdstream/weights/tiny/sdstream.json). Pure Python: read before torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import BadInput

NOTES_FILE = "sdstream.json"
_WORD = re.compile(r"[^\W_]+")  # words; punctuation is let through


def model_notes(folder: str | Path) -> dict:
    """A model folder's sdstream.json ({} without one); a broken one is an error naming the file."""
    path = Path(folder) / NOTES_FILE
    if not path.is_file():
        return {}
    try:
        notes = json.loads(path.read_text())
        if not isinstance(notes, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise BadInput(f"{path} is not readable: {e}") from None
    return notes


def check_vocabulary(req, words) -> None:
    """Raise BadInput naming every word of REQ's prompts that is not in WORDS (None: any word goes)."""
    if not words:
        return
    for option, text in (("--prompt", req.prompt), ("--negative-prompt", req.negative_prompt or "")):
        unknown = [w for w in dict.fromkeys(_WORD.findall(text.lower())) if w not in words]
        if unknown:
            raise BadInput(f"{option}: the model {req.model!r} does not know {', '.join(map(repr, unknown))}; "
                           f"it knows only these words: {' '.join(words)}")
