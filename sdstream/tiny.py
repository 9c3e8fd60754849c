"""The embedded `tiny` model: a toy Stable Diffusion that sdstream trained itself and ships in the package.

sdstream/weights/tiny is an ordinary diffusers StableDiffusionPipeline folder (AutoencoderKL, CLIP
text encoder with a word-level tokenizer, UNet2DConditionModel, DDIM, and a tiny CLIP vision tower
for image prompts; fp16 safetensors) trained from scratch on a CPU by tools/train_tiny.py on a
synthetic world (tools/shapes.py): one flat shape on a flat background, 32x32 pixels, captioned
like "a yellow circle on a blue background". Its model card (README.md in that folder) has the
data, the settings, the training time and the evaluation. Nothing is downloaded or built at run time.

A model folder may carry an sdstream.json with what sdstream needs to know that diffusers' configs
don't say (model_notes()):
  "vocabulary": the only words the model knows; check_prompts() refuses any other word, listing the
                ones it knows, instead of letting the tokenizer split it into characters it never saw;
  "latent_rgb": {"weights": [[r, g, b] per latent channel], "bias": [r, g, b]}, the linear map from
                its latents to RGB for `--preview approx` (SD 1.x's factors would give wrong colours).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import BadInput

NOTES_FILE = "sdstream.json"
_WORD = re.compile(r"[^\W_]+")  # words; punctuation is let through


def tiny_path() -> Path:
    """The folder of the embedded model."""
    return Path(__file__).parent / "weights" / "tiny"


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


def check_prompts(req, words) -> None:
    """Raise BadInput naming every word of REQ's prompts that is not in WORDS (None: any word goes)."""
    if not words:
        return
    for option, text in (("--prompt", req.prompt), ("--negative-prompt", req.negative_prompt or "")):
        unknown = [w for w in dict.fromkeys(_WORD.findall(text.lower())) if w not in words]
        if unknown:
            raise BadInput(f"{option}: the model {req.model!r} does not know {', '.join(map(repr, unknown))}; "
                           f"it knows only these words: {' '.join(words)}")


def folder_notes(model: str | None) -> dict:
    """The sdstream.json of MODEL's folder without loading it ({} for hub models): for checks before a load."""
    from .loader import local_folder
    from .registry import resolve

    source = resolve(model)
    return {} if source.kind == "hub" else model_notes(local_folder(source))
