"""`sdstream generate` and `sdstream image-prompt`: one run into one folder."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from .common import ProgressSink, handle_errors, json_sink, stderr

G_PROMPT, G_IMAGE_PROMPT, G_MODEL, G_IMAGE, G_MASK, G_OUT, G_DEVICE = (
    "Prompt",
    "Image as prompt",
    "Model",
    "Start from a picture",
    "Noise injection",
    "Output",
    "Device",
)


def register(app: typer.Typer) -> None:
    app.command("generate", no_args_is_help=False)(generate)
    app.command("image-prompt", no_args_is_help=True)(image_prompt)


def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw.", rich_help_panel=G_PROMPT)] = "",
    negative_prompt: Annotated[
        str,
        typer.Option(help="What to steer away from (the unconditional half of guidance).", rich_help_panel=G_PROMPT),
    ] = "",
    guidance: Annotated[
        float,
        typer.Option(help="Classifier-free guidance scale; guidance is off at 1 or below.", rich_help_panel=G_PROMPT),
    ] = 7.5,
    prompt_image: Annotated[
        Path | None,
        typer.Option(
            help="Use this photo as the prompt: its CLIP image features, repeated over the token positions, "
            "replace the text prompt's embedding (the unconditional half stays --negative-prompt's).",
            rich_help_panel=G_IMAGE_PROMPT,
        ),
    ] = None,
    image_weight: Annotated[
        float,
        typer.Option(
            help="0-1: blend the photo with --prompt, cond = W * image + (1 - W) * text. 1 = the photo alone.",
            rich_help_panel=G_IMAGE_PROMPT,
        ),
    ] = 1.0,
    clip_model: Annotated[
        str | None,
        typer.Option(
            help="CLIP for the photo: vit-l-14, vit-h-14, tiny, a Hugging Face repo id or a local folder. "
            "Default: the one that fits the model (ViT-L/14 for SD 1.x, the tiny CLIP for tiny).",
            rich_help_panel=G_IMAGE_PROMPT,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Alias (aesthetic, alignment, compressibility, incompressibility, sd15, tiny), Hugging Face repo id, "
            "or local diffusers folder. Default: $SDSTREAM_MODEL or compressibility.",
            rich_help_panel=G_MODEL,
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.", rich_help_panel=G_MODEL)] = 20,
    scheduler: Annotated[
        str,
        typer.Option(
            help="ddim, euler, euler-a, dpm++-2m, dpm++-2m-karras, pndm, lms or unipc.", rich_help_panel=G_MODEL
        ),
    ] = "ddim",
    width: Annotated[
        int | None, typer.Option(help="Width in pixels (default: the model's).", rich_help_panel=G_MODEL)
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Height in pixels (default: the model's).", rich_help_panel=G_MODEL)
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed (default: random, recorded in run.json).", rich_help_panel=G_MODEL)
    ] = None,
    init_image: Annotated[
        Path | None, typer.Option(help="img2img: start from this picture.", rich_help_panel=G_IMAGE)
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            help="img2img strength, 0-1: how much of the schedule is re-run (default 0.75).", rich_help_panel=G_IMAGE
        ),
    ] = None,
    start_image: Annotated[
        Path | None, typer.Option(help="Encode this picture and denoise it from --start-step.", rich_help_panel=G_IMAGE)
    ] = None,
    start_step: Annotated[
        int | None, typer.Option(help="The step (1..steps) at which --start-image enters.", rich_help_panel=G_IMAGE)
    ] = None,
    mask: Annotated[
        str | None,
        typer.Option(
            help="circle, square, edges, corners, left-half, right-half, top-half, bottom-half, checkerboard, "
            "or a grey-level image (white = full noise).",
            rich_help_panel=G_MASK,
        ),
    ] = None,
    inject_at_step: Annotated[
        list[int] | None,
        typer.Option(
            help="Step at which to inject noise; repeatable. Default with --mask: 30% into the run.",
            rich_help_panel=G_MASK,
        ),
    ] = None,
    noise_strength: Annotated[
        float,
        typer.Option(
            help="Injected noise, 0-2, in units of the latent's noise level at that step.", rich_help_panel=G_MASK
        ),
    ] = 1.0,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run folder (default: a new folder under ./outputs).", rich_help_panel=G_OUT),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run in --out.", rich_help_panel=G_OUT)] = False,
    preview: Annotated[
        str,
        typer.Option(
            help="Frame decoder: approx (about free), vae (full quality), taesd, none.", rich_help_panel=G_OUT
        ),
    ] = "approx",
    frame_source: Annotated[
        str,
        typer.Option(
            help="x0 (the model's clean estimate, legible) or latent (the noisy state).", rich_help_panel=G_OUT
        ),
    ] = "x0",
    taesd: Annotated[
        str | None,
        typer.Option(
            help="TAESD hub id or folder for --preview taesd (default madebyollin/taesd).", rich_help_panel=G_OUT
        ),
    ] = None,
    frames: Annotated[
        bool, typer.Option("--frames/--no-frames", help="--no-frames is --preview none.", rich_help_panel=G_OUT)
    ] = True,
    frames_every: Annotated[
        int, typer.Option(help="Write every Nth step's frame (the last always).", rich_help_panel=G_OUT)
    ] = 1,
    frame_format: Annotated[str, typer.Option(help="png, jpg or webp.", rich_help_panel=G_OUT)] = "png",
    gif: Annotated[
        bool, typer.Option("--gif", help="Also write animation.gif of the frames.", rich_help_panel=G_OUT)
    ] = False,
    webp: Annotated[
        bool, typer.Option("--webp", help="Also write animation.webp of the frames.", rich_help_panel=G_OUT)
    ] = False,
    json: Annotated[
        bool, typer.Option("--json", help="One JSON event per line on stdout.", rich_help_panel=G_OUT)
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.", rich_help_panel=G_OUT)
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=G_DEVICE)] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (fp16 on CUDA, else fp32), fp32, fp16 or bf16.", rich_help_panel=G_DEVICE)
    ] = "auto",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile", help="torch.compile the UNet: faster steps after a slow first one.", rich_help_panel=G_DEVICE
        ),
    ] = False,
    cpu_offload: Annotated[
        bool,
        typer.Option(
            "--cpu-offload",
            help="Keep each model on the GPU only while it runs (less memory).",
            rich_help_panel=G_DEVICE,
        ),
    ] = False,
    vae_tiling: Annotated[
        bool,
        typer.Option("--vae-tiling", help="Decode large images tile by tile (less memory).", rich_help_panel=G_DEVICE),
    ] = False,
    attention_slicing: Annotated[
        bool,
        typer.Option(
            "--attention-slicing", help="Compute attention in slices (less memory, slower).", rich_help_panel=G_DEVICE
        ),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel=G_DEVICE)] = False,
) -> None:
    """Generate one image and record every denoising step."""
    req, run_options = request_from(locals())
    execute(req, **run_options)


def image_prompt(photo: Path, **options) -> None:
    """Generate one image with a photo as the prompt (generate --prompt-image PHOTO), recording every step.

    With --prompt too the two are blended: cond = W * image + (1 - W) * text, W = --image-weight (default 1).
    """
    from ..images import open_image

    with handle_errors(options.get("debug", False)):
        open_image(photo, "PHOTO")  # a missing or broken photo is named as the user gave it
    req, run_options = request_from({**options, "prompt_image": photo})
    execute(req, **run_options)


def _image_prompt_signature() -> inspect.Signature:
    """generate's options, with PHOTO as the first argument in place of --prompt-image: one option list for both."""
    photo = inspect.Parameter(
        "photo",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[
            Path,
            typer.Argument(
                metavar="PHOTO",
                help="The photo to use as the prompt (PNG, JPEG, WebP, BMP, GIF or "
                "TIFF): its CLIP image features replace the text prompt's.",
                show_default=False,
            ),
        ],
    )
    options = [p for name, p in inspect.signature(generate, eval_str=True).parameters.items() if name != "prompt_image"]
    return inspect.Signature([photo, *options])


image_prompt.__signature__ = _image_prompt_signature()
image_prompt.__annotations__ = {p.name: p.annotation for p in image_prompt.__signature__.parameters.values()}


def request_from(params: dict):
    """(GenerationRequest, execute() options) from the parsed options of `generate`.

    `batch` parses its defaults with generate's own option list and builds requests here too.
    """
    from dataclasses import fields

    from ..request import GenerationRequest

    names = {f.name for f in fields(GenerationRequest)} - {"extra"}
    values = {k: v for k, v in params.items() if k in names}
    values.update(
        {k: str(v) for k, v in values.items() if isinstance(v, Path)},
        inject_at_step=tuple(params.get("inject_at_step") or ()),
    )
    if not params.get("frames", True):
        values["preview"] = "none"
    run_options = {
        "out": params.get("out"),
        "overwrite": params.get("overwrite", False),
        "json": params.get("json", False),
        "quiet": params.get("quiet", False),
        "debug": params.get("debug", False),
        "animations": [fmt for fmt in ("gif", "webp") if params.get(fmt)],
    }
    return GenerationRequest(**values), run_options


def execute(
    req,
    out: Path | None = None,
    *,
    overwrite: bool = False,
    json: bool = False,
    quiet: bool = False,
    debug: bool = False,
    animations: list[str] = (),
) -> None:
    """Run REQ with the sinks the flags ask for; shared by every command that generates."""
    from ..runner import run

    with handle_errors(debug):
        if animations and req.preview == "none":
            from ..errors import BadInput

            raise BadInput(f"--{animations[0]} animates the frames, but --no-frames / --preview none writes none")
        sinks = [json_sink] if json else []
        if quiet:
            result = run(req, out, overwrite=overwrite, sinks=tuple(sinks))
        else:
            with ProgressSink() as progress:
                result = run(req, out, overwrite=overwrite, sinks=(progress, *sinks))
            stderr.print(f"Wrote {result.run_dir}/ (final.png, frames/, run.json) · seed {result.seed}")
        for fmt in animations:
            from ..look import make_animation

            path = make_animation(result.run_dir, fmt, overwrite=True).path
            if json:
                json_sink({"event": "animation", "path": str(path)})
            elif not quiet:
                stderr.print(f"Wrote {path}")
