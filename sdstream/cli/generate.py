"""`sdstream generate` and `sdstream image-prompt`: one run into one folder.

Their options are made from the declarations (the request's OPTIONS and RUN_OPTIONS): nothing is declared here.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from ..request import OPTIONS, from_values
from .common import RUN_OPTIONS, Progress, given, handle_errors, parameter, print_json, stderr


def register(app: typer.Typer) -> None:
    app.command("generate", no_args_is_help=False)(generate)
    app.command("image-prompt", no_args_is_help=True)(image_prompt)


def generate(**params) -> None:
    """Generate one image and record every denoising step."""
    with handle_errors(params.get("debug", False)):
        execute(request_from(params), params)


def image_prompt(photo: Path, **params) -> None:
    """Generate one image with a photo as the prompt (generate --prompt-image PHOTO), recording every step.

    With --prompt too the two are blended: cond = W * image + (1 - W) * text, W = --image-weight (default 1).
    """
    with handle_errors(params.get("debug", False)):
        execute(request_from({**params, "prompt_image": str(photo)}), params)


def _signature(first: list[inspect.Parameter], skip: tuple[str, ...] = ()) -> inspect.Signature:
    options = [parameter(opt) for name, opt in {**OPTIONS, **RUN_OPTIONS}.items() if name not in skip]
    return inspect.Signature([*first, *options])


_PHOTO = inspect.Parameter("photo", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(
    metavar="PHOTO", show_default=False,
    help="The photo to use as the prompt (PNG, JPEG, WebP, BMP, GIF or TIFF): its CLIP image features replace the "
         "text prompt's.")])
generate.__signature__ = _signature([])
image_prompt.__signature__ = _signature([_PHOTO], skip=("prompt_image",))
for _command in (generate, image_prompt):
    _command.__annotations__ = {p.name: p.annotation for p in _command.__signature__.parameters.values()}


def request_from(params: dict):
    """The GenerationRequest the parsed command line asks for (unvalidated)."""
    return from_values(values_from(params))


def values_from(params: dict) -> dict:
    """The request's fields the parsed command line gives: with --from RUN, that run's request with the options
    given here changed (an option that only applied with another, and took its default, is left to apply again)."""
    values = given(OPTIONS, params)
    if not params.get("from_run"):
        return values
    from ..record.rundir import read_run

    kept = read_run(params["from_run"], need_frames=False).manifest.get("request") or {}
    filled = {k for k, v in kept.items() if k in OPTIONS and OPTIONS[k].needs and
              (tuple(v) if isinstance(v, list) else v) == OPTIONS[k].default}
    return {**{k: v for k, v in kept.items() if k in OPTIONS and v is not None and k not in filled}, **values}


def execute(req, params: dict) -> None:
    """Run REQ with the sinks the run options in PARAMS ask for. Everything up to the model load needs no torch."""
    from ..errors import BadInput
    from ..record.orchestrator import run
    from ..record.rundir import RunFolder

    opts = {name: params.get(name) for name in RUN_OPTIONS}
    req = req.validated()
    animations = [fmt for fmt in ("gif", "webp") if opts[fmt]]
    if animations and req.preview == "none":  # (auto decides for a decoder, never for none)
        raise BadInput(f"--{animations[0]} animates the frames, but --preview none writes none")
    sinks = [RunFolder(Path(opts["out"]) if opts["out"] else None, opts["overwrite"])]
    if not opts["quiet"]:
        sinks.append(Progress())
    if opts["json"]:
        sinks.append(print_json)
    result = run(req, sinks)
    for fmt in animations:
        from ..views.animate import make_animation

        path = make_animation(result.run_dir, fmt, overwrite=True).path
        if opts["json"]:
            print_json({"event": "animation", "path": str(path)})
        elif not opts["quiet"]:
            stderr.print(f"Wrote {path}", markup=False)
