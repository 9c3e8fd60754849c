"""Model aliases, how a --model string resolves to a place to load from, and whether that place is on disk.

Pure Python (and huggingface_hub's cache lookups): everything here runs before torch is imported, so a
model that can't be had is refused in a fraction of a second instead of after the imports.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, SdstreamError
from .notes import check_vocabulary, model_notes

DEFAULT_MODEL = "compressibility"  # as the original service
DEFAULT_TAESD = "madebyollin/taesd"  # --preview taesd without --taesd

# alias -> (hub repo id, family (its Traits' name), what it is)
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
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "SDXL", "Stable Diffusion XL base 1.0, 1024x1024"),
    "sd3-medium": ("stabilityai/stable-diffusion-3-medium-diffusers", "SD3",
                   "Stable Diffusion 3 Medium, 1024x1024 (gated: accept its licence on the Hub first)"),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "FLUX", "FLUX.1 [schnell], 1-4 steps, guidance-free"),
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "FLUX",
                 "FLUX.1 [dev], guidance-distilled (gated: accept its licence on the Hub first)"),
    "tiny": ("(embedded)", "toy", "toy SD trained by sdstream on coloured shapes, 32x32, offline: demos and tests"),
}

# what --steps and --guidance are for an alias whose own differ from its family's
ALIAS_DEFAULTS = {"flux-schnell": {"steps": 4, "guidance": 0.0}}  # timestep-distilled, guidance-free

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
    if model is not None and not model.strip():
        raise BadInput("--model '' is empty: give an alias, a Hugging Face repo id or a folder, or leave it out")
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


REQUIRED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")  # and a denoiser: unet or transformer


def tiny_path() -> Path:
    """The folder of the embedded model (a diffusers folder; its model card says how it was made)."""
    return Path(__file__).parents[1] / "weights" / "tiny"


def local_folder(source: ModelSource) -> Path:
    """The folder of a tiny or local SOURCE, checked to hold a complete pipeline."""
    if source.kind == "tiny":
        return tiny_path()
    path = Path(source.location)
    index = path / "model_index.json"
    if not index.is_file():
        raise BadInput(f"--model {source.name!r} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        parts = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"--model {source.name!r}: model_index.json is unreadable ({e})") from None
    missing = [p for p in REQUIRED_PARTS if p not in parts or not (path / p).is_dir()]
    if not any(p in parts and (path / p).is_dir() for p in ("unet", "transformer")):
        missing.insert(0, "unet")
    if missing:
        raise BadInput(
            f"--model {source.name!r} is not a complete Stable Diffusion folder: missing {', '.join(missing)}"
        )
    return path


def hub_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of hub repo REPO that holds a pipeline, or None when it isn't downloaded."""
    found = hub_file(repo, "model_index.json")
    return found.parent if found else None


def hub_file(repo: str, name: str) -> Path | None:
    """The cached file NAME of hub repo REPO, or None when it is not on disk."""
    from huggingface_hub import try_to_load_from_cache

    if not _REPO_ID.match(repo):
        return None
    found = try_to_load_from_cache(repo, name)
    return Path(found) if isinstance(found, str) else None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """Why the Hub can't be reached from here (no name, no route, no answer in 3 s), or None when it answers or a
    proxy is set (which a direct probe can't speak for). Asked only for what is not on disk: without a network,
    huggingface_hub retries each request five times, half a minute, before the same failure."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=3).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached ({e.strerror or e})"
    return None


def _not_on_disk(what: str, hint: str) -> None:
    """Refuse WHAT, which is not on disk, when the Hub may not or cannot be asked for it; else return."""
    if offline():
        raise BadInput(f"{what} is not on disk and HF_HUB_OFFLINE is set: {hint}")
    if why := hub_unreachable():
        raise SdstreamError(f"{what} is not on disk and {why}", hint=hint)


def label(source: ModelSource) -> str:
    """How messages name a model: what the user typed, and where that leads if it says more."""
    return f"model {source.name!r}" + (f" ({source.location})" if source.location != source.name else "")


def check_available(req) -> ModelSource:
    """The ModelSource of REQ's model after the checks that need no model loaded: the folder is a pipeline, a
    hub model is on disk when the Hub may not be asked, and the prompts use only the words of a model that
    declares its vocabulary. BadInput otherwise. Reads nothing but small JSON files."""
    source = resolve(req.model)
    folder = hub_snapshot(source.location) if source.kind == "hub" else local_folder(source)
    if folder is None:
        _not_on_disk(label(source), "use --model tiny, a local folder, or download it once with network access")
    family = family_in(folder) if folder is not None and (folder / "model_index.json").is_file() else None
    if family is not None:
        check_family(req, family)
    if req.preview == "taesd":
        taesd = req.taesd or (family.default_taesd if family else DEFAULT_TAESD)
        if not Path(taesd).expanduser().is_dir() and hub_file(taesd, "config.json") is None:
            _not_on_disk(f"--taesd {taesd!r}", "pass a local folder, download it once with network access, or use "
                         "--preview approx or vae")
    if folder is not None:
        check_vocabulary(req, model_notes(folder).get("vocabulary"))
        factor = vae_factor(folder)
        factor = factor * family.size_factor if factor and family else factor
        for option, value in (("--width", req.width), ("--height", req.height)):
            if factor and value is not None and value % factor:
                raise BadInput(f"{option} {value} is not a multiple of {factor} (this model's VAE factor)")
    return source


def family_in(folder: Path):
    """The model family of a pipeline folder, from model_index.json's _class_name (None when unreadable)."""
    from ..core.families import traits_of

    try:
        name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return traits_of(name) if name else None


def check_family(req, family) -> None:
    """What a model family can't do, refused with its name: a scheduler of another kind, a photo as the prompt, a
    negative prompt (and the picture of its half) where guidance is embedded."""
    if req.scheduler != "auto" and req.scheduler not in family.schedulers:
        raise BadInput(f"--scheduler {req.scheduler} does not work with {family.name} models: give one of "
                       f"{', '.join(family.schedulers)} (or auto)")
    if req.prompt_image is not None and not family.image_prompt:
        raise BadInput(f"--prompt-image: a photo as the prompt (CLIP features repeated over the token positions) "
                       f"does not fit {family.name} models, whose conditioning is more than one text encoder's")
    if not family.negative_prompt:  # no unconditional half to contrast with, or to draw
        if req.negative_prompt:
            raise BadInput(f"--negative-prompt: {family.name} models have no negative prompt (their guidance is "
                           "embedded in the model, not classifier-free); drop it")
        if req.frame_source == "x0-uncond":
            raise BadInput(f"--frame-source x0-uncond: {family.name} models have no unconditional half (their "
                           "guidance is embedded in the model); use x0, x0-cond or latent")


def for_family(req, family):
    """REQ with --scheduler auto decided for FAMILY (core.families.Traits; None: not known yet). An option that
    applies only with auto's other meanings (--eta, DDIM's) is refused when given, dropped when only filled in."""
    from dataclasses import replace

    from ..request import OPTIONS

    if family is None or req.scheduler != "auto":
        return req
    chosen = {"scheduler": family.scheduler(req.scheduler)}
    for name, opt in OPTIONS.items():
        if opt.needs and opt.need()[0] == "scheduler" and not opt.applies(chosen):
            if getattr(req, name) not in (None, opt.default):
                raise BadInput(f"{opt.flag} applies only with {opt.needs_text(OPTIONS)}, and {family.name} models "
                               f"run {chosen['scheduler']}")
            chosen[name] = None
    return replace(req, **chosen).validated()


def vae_factor(folder: Path) -> int | None:
    """The VAE's downsampling factor, from its config as diffusers computes it (None when it can't be read)."""
    try:
        config = json.loads((Path(folder) / "vae" / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_defaults(model: str | None) -> dict:
    """{"steps", "guidance"} when not given, for --model MODEL: its alias's, else its family's (from its folder or
    alias; SD 1.x/2.x's when neither says). Reads at most a small JSON file; a bad MODEL is reported elsewhere."""
    from ..core.families import FAMILIES, SD

    try:
        source = resolve(model)
    except BadInput:
        return {"steps": SD.steps, "guidance": SD.guidance}
    if source.alias in ALIAS_DEFAULTS:
        return dict(ALIAS_DEFAULTS[source.alias])
    if source.alias in ALIASES:
        by_name = {t.name.split("/")[0]: t for t in FAMILIES.values()}  # "SD 1.x/2.x" is listed as "SD 1.x"
        family = by_name.get(ALIASES[source.alias][1], SD)
    else:
        try:
            family = family_of_source(source) or SD
        except BadInput:
            family = SD
    return {"steps": family.steps, "guidance": family.guidance}


def family_of_source(source: ModelSource):
    """The model family of SOURCE when its folder is on disk (None: a hub model not downloaded yet)."""
    folder = hub_snapshot(source.location) if source.kind == "hub" else local_folder(source)
    return family_in(folder) if folder is not None else None
