"""GenerationRequest: everything one run needs, validated up front. Pure Python, no torch.

Checks that need the loaded model (size vs the VAE factor, inject steps vs the scheduler's
schedule) live in loop.check_against_model; both run before a run folder is created.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from . import masks
from .errors import BadInput
from .schedulers import SCHEDULERS

_SCHEDULER_ALIASES = {
    "euler-ancestral": "euler-a",
    "dpm++2m": "dpm++-2m",
    "dpm++2m-karras": "dpm++-2m-karras",
    "dpm-solver++": "dpm++-2m",
    "plms": "pndm",
}
FRAME_FORMATS = ("png", "jpg", "webp")
PREVIEWS = ("approx", "vae", "taesd", "none")  # how frames are decoded (see preview.py)
FRAME_SOURCES = ("x0", "latent")
DTYPES = ("auto", "fp32", "fp16", "bf16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_SEED = 2**64 - 1
MAX_STEPS = 500  # DDIM's schedule runs past SD's 1000 training timesteps at 1000 steps
DEFAULT_STRENGTH = 0.75
DEFAULT_INJECT_FRACTION = 0.3  # --mask alone injects 30% into the run: late enough to keep composition


def canonical_scheduler(name: str) -> str | None:
    key = re.sub(r"[\s_]+", "-", name.strip().lower()).replace("dpmpp", "dpm++")
    key = _SCHEDULER_ALIASES.get(key, key)
    return key if key in SCHEDULERS else None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Field names are the `generate` options with dashes as underscores."""

    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None  # alias, hub id or folder; None = $SDSTREAM_MODEL or the default
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None  # None = the model's default
    height: int | None = None
    seed: int | None = None  # None = random, fixed by validated()
    scheduler: str = "ddim"
    init_image: str | None = None  # img2img
    strength: float | None = None  # img2img strength, default 0.75
    start_image: str | None = None  # start from this image at --start-step
    start_step: int | None = None
    mask: str | None = None  # pattern name or path to a grey-level image
    inject_at_step: tuple[int, ...] = ()
    noise_strength: float = 1.0
    device: str = "auto"
    dtype: str = "auto"
    preview: str = "approx"  # frame decoder; "none" writes no frames
    frame_source: str = "x0"  # the model's clean estimate, or the noisy latent itself
    taesd: str | None = None  # hub id or folder for --preview taesd
    frames_every: int = 1
    frame_format: str = "png"
    prompt_image: str | None = None  # a photo as the prompt: CLIP image features as the conditional embeddings
    clip_model: str | None = None  # alias, hub id or folder; None = the CLIP that fits the model (see clip.py)
    image_weight: float = 1.0  # cond = w * image + (1 - w) * text; 1 = the image alone
    # speed and memory (CUDA mostly); see loader.Speed
    compile: bool = False
    cpu_offload: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inject_at_step"] = list(self.inject_at_step)
        return d

    @property
    def mask_is_pattern(self) -> bool:
        return self.mask is not None and self.mask in masks.PATTERNS

    def first_step(self, total: int) -> int:
        """1-based schedule index of the first step this run denoises (img2img and start-step skip some)."""
        if self.init_image is not None:
            # diffusers' img2img arithmetic: int(steps * strength) steps are run
            return total - min(int(self.steps * self.strength), self.steps) + 1
        if self.start_image is not None:
            return self.start_step
        return 1

    def validated(self) -> GenerationRequest:
        """A copy with names made canonical and the seed fixed, or BadInput naming the bad value."""
        fixes: dict = {}
        _check_types(self)
        _check_int("--steps", self.steps, 1, MAX_STEPS)
        _check_float("--guidance", self.guidance, 0.0, 100.0)
        for opt, v in (("--width", self.width), ("--height", self.height)):
            if v is not None:
                _check_int(opt, v, 8, 4096)
        if self.seed is None:
            fixes["seed"] = secrets.randbelow(2**32)
        else:
            _check_int("--seed", self.seed, 0, MAX_SEED)
        sched = canonical_scheduler(self.scheduler)
        if sched is None:
            raise BadInput(f"--scheduler {self.scheduler!r} is not one of: {', '.join(SCHEDULERS)}")
        fixes["scheduler"] = sched
        if not _DEVICE.match(self.device):
            raise BadInput(f"--device {self.device!r} is not one of: auto, cpu, cuda, cuda:N, mps")
        if self.dtype not in DTYPES:
            raise BadInput(f"--dtype {self.dtype!r} is not one of: {', '.join(DTYPES)}")
        _check_int("--frames-every", self.frames_every, 1, 10_000)
        if self.preview not in PREVIEWS:
            raise BadInput(f"--preview {self.preview!r} is not one of: {', '.join(PREVIEWS)}")
        if self.frame_source not in FRAME_SOURCES:
            raise BadInput(f"--frame-source {self.frame_source!r} is not one of: {', '.join(FRAME_SOURCES)}")
        if self.frame_format not in FRAME_FORMATS:
            raise BadInput(f"--frame-format {self.frame_format!r} is not one of: {', '.join(FRAME_FORMATS)}")

        # img2img and start-from-image: one of them, each with its own step arithmetic
        if self.init_image is not None and self.start_image is not None:
            raise BadInput("--init-image and --start-image are two ways to start from a picture; give one")
        if self.strength is not None and self.init_image is None:
            raise BadInput("--strength applies to --init-image; give an init image or drop --strength")
        if self.start_step is not None and self.start_image is None:
            raise BadInput("--start-step applies to --start-image; give a start image or drop --start-step")
        if self.init_image is not None:
            strength = DEFAULT_STRENGTH if self.strength is None else self.strength
            _check_float("--strength", strength, 0.0, 1.0)
            if int(self.steps * strength) < 1:
                raise BadInput(
                    f"--strength {strength:g} with --steps {self.steps} denoises no step; "
                    f"use a strength of at least {1 / self.steps:.3g} or more steps"
                )
            fixes["strength"] = strength
            _check_image(self.init_image, "--init-image")
        if self.start_image is not None:
            if self.start_step is None:
                raise BadInput("--start-image needs --start-step K (the step to start denoising from)")
            _check_int("--start-step", self.start_step, 1, self.steps)
            _check_image(self.start_image, "--start-image")

        # image as prompt: CLIP features of a photo in place of (or blended with) the text prompt's
        if self.prompt_image is not None:
            _check_image(self.prompt_image, "--prompt-image")
            _check_float("--image-weight", self.image_weight, 0.0, 1.0)
            if self.clip_model is not None:
                if not self.clip_model.strip():
                    raise BadInput("--clip-model '' is empty: give an alias, a Hugging Face repo id or a folder")
                fixes["clip_model"] = self.clip_model.strip()
        else:
            if self.clip_model is not None:
                raise BadInput("--clip-model applies to --prompt-image; give a prompt image or drop --clip-model")
            if self.image_weight != 1.0:
                raise BadInput("--image-weight applies to --prompt-image; give a prompt image or drop --image-weight")

        # noise injection
        _check_float("--noise-strength", self.noise_strength, 0.0, 2.0)
        if self.mask is not None:
            name = masks.canonical(self.mask)
            if name is not None:
                fixes["mask"] = name
            elif Path(self.mask).suffix or Path(self.mask).expanduser().exists():
                _check_image(self.mask, "--mask")
            else:
                raise BadInput(
                    f"--mask {self.mask!r} is not one of: {', '.join(masks.PATTERNS)} (or a path to a grey-level image)"
                )
        elif self.inject_at_step:
            raise BadInput("--inject-at-step needs --mask (the region where noise is injected)")
        for k in self.inject_at_step:
            _check_int("--inject-at-step", k, 1, 10_000)
        steps = tuple(sorted(set(self.inject_at_step)))
        fixes["inject_at_step"] = steps
        return replace(self, **fixes)

    def inject_steps(self, total: int) -> tuple[int, ...]:
        """The steps that inject noise: the ones asked for, or the documented default for a bare --mask."""
        if self.mask is None:
            return ()
        if self.inject_at_step:
            return self.inject_at_step
        first = self.first_step(total)
        return (first + round(DEFAULT_INJECT_FRACTION * (total - first + 1)),)


def _check_types(req: GenerationRequest) -> None:
    """Text and on/off fields from JSON (batch files, the server) may hold anything: say which is wrong."""
    for f in fields(req):
        value, option = getattr(req, f.name), "--" + f.name.replace("_", "-")
        if f.type in ("str", "str | None") and not (isinstance(value, str) or (value is None and "None" in f.type)):
            raise BadInput(f"{option} {value!r} is not allowed: give text")
        if f.type == "bool" and not isinstance(value, bool):
            raise BadInput(f"{option} {value!r} is not allowed: give true or false")
    if not isinstance(req.inject_at_step, (tuple, list)):
        raise BadInput(f"--inject-at-step {req.inject_at_step!r} is not allowed: give a list of step numbers")


def _check_int(option: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadInput(f"{option} {value!r} is not allowed: give a whole number from {lo} to {hi}")


def _check_float(option: str, value, lo: float, hi: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        raise BadInput(f"{option} {value!r} is not allowed: give a number from {lo:g} to {hi:g}")


def _check_image(path: str, option: str) -> None:
    from .images import open_image

    open_image(path, option)
