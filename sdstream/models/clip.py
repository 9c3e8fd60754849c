"""A photo as the prompt: CLIP image features in place of the text encoder's output.

As in the original system, CLIP turns the photo into one feature vector [1, D]
(`get_image_features`: the pooled vision output through the visual projection), which is
repeated over the tokenizer's token positions ([1, L, D]) and used as the conditional half of
the prompt embeddings. The unconditional half stays the (negative) text prompt's embedding.
With --image-weight W below 1 the conditional half is a blend with the text prompt's embedding:

    cond = W * image_embeds + (1 - W) * text_embeds

That only works when D equals the UNet's cross-attention width, so the CLIP must fit the model
family: ViT-L/14 (768) for SD 1.x, ViT-H/14 (1024) for SD 2.x, the embedded tiny CLIP (64) for
`tiny`. The embedder is loaded only when an image prompt is used, once per process, on the
pipeline's device and dtype, and cached by (source, device, dtype) like pipelines.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, SdstreamError

# alias -> (hub repo id, projection width, the family it fits)
ALIASES: dict[str, tuple[str, int, str]] = {
    "vit-l-14": ("openai/clip-vit-large-patch14", 768, "SD 1.x"),
    "vit-h-14": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 1024, "SD 2.x"),
    "tiny": ("(embedded)", 64, "tiny"),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE: dict[tuple[str, str, str], ClipEmbedder] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ClipSource:
    """Where a CLIP comes from. kind: 'tiny', 'local' (a folder) or 'hub'; subfolders for pipeline folders."""

    name: str  # what the user typed, or the default's alias
    kind: str
    location: str
    encoder: str = ""  # subfolder of the model weights ("" = the folder itself)
    processor: str = ""  # subfolder of preprocessor_config.json

    @property
    def label(self) -> str:
        """How messages name it: what the user typed, and where that led if it says more."""
        return repr(self.name) + ("" if self.location in (self.name, "tiny") else f" ({self.location})")


@dataclass
class ClipEmbedder:
    source: ClipSource
    model: object  # CLIPModel or CLIPVisionModelWithProjection
    processor: object  # CLIPImageProcessorPil
    width: int  # projection_dim: the length of one feature vector
    full: bool  # a whole CLIPModel (text tower too), whose get_image_features we call

    def features(self, image):
        """get_image_features of a PIL image: [1, width], on the model's device and dtype."""
        import torch

        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=self.model.device, dtype=self.model.dtype)
        if self.full:  # CLIPModel (transformers 5 returns the vector as pooler_output)
            out = self.model.get_image_features(pixel_values=pixels)
            return out if torch.is_tensor(out) else out.pooler_output
        return self.model(pixel_values=pixels).image_embeds  # CLIPVisionModelWithProjection: the same vector


def cross_attention_width(pipe) -> int:
    return int(pipe.unet.config.cross_attention_dim)


def default_clip(width: int) -> str:
    """The alias of the CLIP that fits a UNet of this cross-attention width (its model family)."""
    for alias, (_, w, _) in ALIASES.items():
        if w == width:
            return alias
    raise BadInput(
        f"no default CLIP fits this model (its UNet cross-attention is {width} wide): "
        f"pass --clip-model with a CLIP whose projection_dim is {width}"
    )


def resolve(name: str) -> ClipSource:
    """Turn a --clip-model value into a ClipSource, or raise BadInput naming what is allowed."""
    name = name.strip()
    if name == "tiny":
        return ClipSource("tiny", "tiny", "tiny", "image_encoder", "feature_extractor")
    if name in ALIASES:
        return ClipSource(name, "hub", ALIASES[name][0])
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInput(f"--clip-model {name!r} is a file; a local CLIP must be a folder with config.json")
        if (path / "model_index.json").is_file() and (path / "image_encoder").is_dir():  # a diffusers pipeline folder
            return ClipSource(name, "local", str(path.resolve()), "image_encoder", "feature_extractor")
        if not (path / "config.json").is_file():
            raise BadInput(f"--clip-model {name!r} is not a CLIP folder: config.json is missing")
        return ClipSource(name, "local", str(path.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BadInput(f"--clip-model {name!r}: no such folder")
    if _REPO_ID.match(name):
        return ClipSource(name, "hub", name)
    raise BadInput(
        f"--clip-model {name!r} is not an alias ({', '.join(ALIASES)}), a Hugging Face repo id (owner/name) or a folder"
    )


def embedder_for(pipe, clip_model: str | None) -> ClipEmbedder:
    """The CLIP for CLIP_MODEL (None = the one that fits PIPE), loaded once, checked against PIPE's UNet."""
    from .loader import dtype_name

    width = cross_attention_width(pipe)
    source = resolve(clip_model if clip_model is not None else default_clip(width))
    device, dtype = pipe._execution_device, pipe.unet.dtype
    key = (f"{source.kind}:{source.location}", str(device), dtype_name(dtype))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(source, device, dtype, width)
        embedder = _CACHE[key]
    _check_width(source, embedder.width, width)
    return embedder


def image_prompt_embeds(pipe, embedder: ClipEmbedder, photo, weight: float, text_embeds):
    """The conditional prompt embeddings for PHOTO (a PIL image): [1, L, D], blended with TEXT_EMBEDS below weight 1."""
    features = embedder.features(photo)  # [1, D]
    positions = pipe.tokenizer.model_max_length
    image_embeds = features[:, None, :].repeat(1, positions, 1).to(device=text_embeds.device, dtype=text_embeds.dtype)
    if image_embeds.shape != text_embeds.shape:  # encode_prompt pads to model_max_length: only odd tokenizers
        shapes = f"{tuple(image_embeds.shape)} vs the text's {tuple(text_embeds.shape)}"
        raise BadInput(f"--prompt-image: CLIP's embeddings don't fit this model's prompt embeddings: {shapes}")
    if weight == 1.0:
        return image_embeds
    return weight * image_embeds + (1 - weight) * text_embeds


def _check_width(source: ClipSource, clip_width: int, width: int) -> None:
    """Image features are used as the UNet's encoder states: their width must be its cross-attention width."""
    if clip_width == width:
        return
    fits = [f"{alias} ({repo})" if alias != "tiny" else "tiny" for alias, (repo, w, _) in ALIASES.items() if w == width]
    fix = f"use --clip-model {fits[0]}, or another CLIP whose projection_dim is {width}" if fits else (
        f"use --clip-model with a CLIP whose projection_dim is {width}")
    raise BadInput(f"--clip-model {source.label} gives {clip_width}-wide image embeddings, but this model's UNet "
                   f"cross-attention is {width} wide: {fix}")


def _load(source: ClipSource, device, dtype, width: int) -> ClipEmbedder:
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    try:
        from transformers import CLIPImageProcessorPil as Processor  # the PIL backend, whether or not torchvision is
    except ImportError:  # older transformers: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Processor

    if source.kind == "tiny":
        from .registry import tiny_path

        where = str(tiny_path())
    else:
        where = source.location
    encoder = {"subfolder": source.encoder} if source.encoder else {}
    try:
        config = AutoConfig.from_pretrained(where, **encoder)
    except Exception as e:
        raise _load_error(source, e) from None
    classes = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}
    if config.model_type not in classes:
        raise BadInput(f"--clip-model {source.label} is a {config.model_type!r} model, not a CLIP (clip or "
                       f"clip_vision_model)")
    _check_width(source, int(config.projection_dim), width)  # before the weights: no big download for nothing
    try:
        model, info = classes[config.model_type].from_pretrained(where, dtype=dtype, output_loading_info=True,
                                                                 **encoder)
        processor = _processor(Processor, where, source, config)
    except SdstreamError:
        raise
    except Exception as e:
        raise _load_error(source, e) from None
    if any(k.startswith("visual_projection") for k in info.get("missing_keys", ())):
        raise BadInput(f"--clip-model {source.label} has no visual projection (a plain CLIPVisionModel): "
                       "use a CLIPModel or CLIPVisionModelWithProjection checkpoint")
    model = model.to(device).eval()
    model.requires_grad_(False)
    return ClipEmbedder(source, model, processor, int(config.projection_dim), config.model_type == "clip")


def _processor(Processor, where: str, source: ClipSource, config):
    """The folder's own preprocessing; a local folder without one gets CLIP's standard one at its input size."""
    if source.kind != "hub":
        folder = Path(where) / source.processor
        if not (folder / "preprocessor_config.json").is_file():
            size = (config.vision_config if config.model_type == "clip" else config).image_size
            return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return Processor.from_pretrained(where, **({"subfolder": source.processor} if source.processor else {}))


def _load_error(source: ClipSource, e: Exception) -> SdstreamError:
    from .loader import first_line, hub_error

    name = f"CLIP model {source.label}"
    hint = ("pass --clip-model with a local CLIP folder (or a CLIP already in the Hugging Face cache), "
            "or download it once with network access")
    error = hub_error(name, source.kind == "hub", e, hint)
    if error is not None:
        return error
    if isinstance(e, (json.JSONDecodeError, ValueError, OSError)) and source.kind != "hub":
        return BadInput(f"--clip-model {source.label} could not be read as a CLIP folder: {first_line(e)}")
    return SdstreamError(f"could not load {name}: {first_line(e)}")
