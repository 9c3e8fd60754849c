"""The embedded `tiny` model: a real diffusers Stable Diffusion folder that sdstream builds itself.

Nothing is downloaded. Fixed configs and a fixed seed give the same weights on every machine;
the folder is written once to the cache (atomically) and then loaded like any other model.
Random weights, small enough that a 20-step run takes a fraction of a second on a CPU:
32x32 pictures by default, 16x16 latents (the VAE downsamples by 2). It also carries a tiny
CLIP image encoder (image_encoder + feature_extractor, as diffusers names them) whose
projection width equals the UNet's cross-attention width, so image prompts work offline too.
"""

from __future__ import annotations

import itertools
import os
import shutil
import string
import tempfile
from pathlib import Path

TINY_VERSION = "3"  # bump when the configs change, so caches rebuild
SEED = 0
MAX_LENGTH = 16  # token positions
WIDTH = 32  # text encoder hidden size = UNet cross-attention width = CLIP image projection
IMAGE_SIZE = 32  # the tiny CLIP's input size

# Whole words get their own token; anything else falls back to single characters.
WORDS = (
    "a an the of on in with and background picture photo image "
    "red green blue yellow white black orange purple pink grey brown "
    "circle square triangle shape small large big left right top bottom centre center "
    "fox snow cat dog tree house sky sea mountain"
).split()


def cache_root() -> Path:
    base = os.environ.get("SDSTREAM_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdstream"
    )
    return Path(base)


def tiny_path() -> Path:
    """The folder of the embedded model, built on first use."""
    path = cache_root() / f"tiny-v{TINY_VERSION}"
    if not (path / "model_index.json").is_file():
        _build(path)
    return path


def tokenizer_files(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format BPE vocabulary: single characters (with and without </w>), then each word as ONE token.

    Merges are added by simulating BPE on each word with the merges so far and appending a merge for
    its first two pieces until it is whole. A merge appended later has a higher rank than all before
    it, so it never changes a word that is already whole (that word always had a lower-ranked pair
    to merge). Merges that are simply each word's left-to-right prefixes can clash: "re" from "red"
    outranks "gr" and splits "green".
    """
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        while len(pieces := _bpe(word, merges)) > 1:
            pair = (pieces[0], pieces[1])
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = pieces[i], pieces[i + 1]
        merged, j = [], 0
        while j < len(pieces):  # merge every occurrence of that pair, left to right
            if j < len(pieces) - 1 and pieces[j] == first and pieces[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(pieces[j])
                j += 1
        pieces = merged
    return pieces


def _build(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    vocab, merges = tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=WIDTH,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=WIDTH,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
        # Built last, so the weights above are the same as before the image encoder existed.
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=IMAGE_SIZE,
                patch_size=4,
                projection_dim=WIDTH,
            )
        )
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # the PIL backend: no torchvision
    except ImportError:
        from transformers import CLIPImageProcessor
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _standard_processor_name(tmp / "model_index.json")
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first; theirs is identical
            if not (path / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _standard_processor_name(index: Path) -> None:
    """The PIL variant of CLIPImageProcessor is saved under its own class name; record the standard name,
    as every Stable Diffusion folder does, so any version of transformers loads the folder."""
    import json

    parts = json.loads(index.read_text())
    if parts.get("feature_extractor", [None, None])[1] == "CLIPImageProcessorPil":
        parts["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        index.write_text(json.dumps(parts, indent=2, sort_keys=True) + "\n")
