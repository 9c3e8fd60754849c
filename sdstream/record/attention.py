"""--attention: every step's cross-attention per word of the prompt, into the run folder (a sink).

    RUN/attention/step-NNNN.safetensors   "maps": [words, h, w] fp16 on the latent grid, one row per entry of the
                                          step's tokens (metadata: step, timestep, tokens as JSON, prompt)
    RUN/attention/<word>/step-NNNN.png    the word's map over the step's frame (--attention-words)
    run.json "attention"                  the tokens, the words drawn and their folders, the grid, how maps are made

core/attention.py records the maps on the device; this sink merges token positions into words (on the device too)
and hands each step's maps and heat maps to the run folder's writer, whose copy to the host does not block the loop.
It also puts the step's heat maps on the Step (`heat`) for the sinks after it: the server's stream sends them with
the step's event. A run without a folder (the server's) needs a sink that reads them (`heat_maps = True`).
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

from ..errors import BadInput, SdstreamError
from .rundir import ATTENTION, RunFolder, frame_size
from .sinks import RunInfo, Sink, Step

# Left out of the default heat maps (every word of the prompt that is not one of these is drawn)
STOP_WORDS = frozenset(
    "a an the and or but of on in at to by for from with without into onto over under above below near next "
    "is are was were be been it its this that these those as than then there their his her some very".split())
HOW = ("softmax(QK^T/sqrt(d)) of each cross-attention layer for the conditional half of the batch, the mean over "
       "its heads; each layer's map upsampled (bilinear) to the latent grid; the mean over the layers; a word's map "
       "is the sum over its tokens; <start> is the start token, <end> the end token and the padding after it; at "
       "each place of the grid the maps sum to 1")


def check_request(req, sinks) -> None:
    """The checks of --attention that need no model: BadInput before anything loads."""
    if not req.attention:
        return
    if req.compile:
        raise BadInput("--attention records through the UNet's attention processors, which a compiled UNet does not "
                       "call; drop --compile or --attention")
    if not any(isinstance(sink, RunFolder) or getattr(sink, "heat_maps", False) for sink in sinks):
        raise BadInput("--attention writes its maps into a run folder: use sdstream.run() or `sdstream generate` "
                       "(sdstream.generate() writes no files)")


@dataclass
class Prompt:
    """One conditional prompt of the run, from step FROM_STEP on, as the rows of the maps."""

    from_step: int
    text: str
    keys: list[str]  # the rows' names: <start>, the words (a repeated word as word#2), <end>
    positions: list[list[int]]  # the token positions of each row
    drawn: list[tuple[int, str]]  # (row, folder) of the words whose heat maps are drawn
    merge: object = None  # [rows, tokens] on the device, made at start


def attention_maps(req, ready, sinks, continuation=None) -> list:
    """[the sink that records REQ's maps] (with --attention), else []. BadInput, before anything is written, for a
    denoiser that is not a UNet with cross-attention, or an --attention-words word the prompts lack."""
    if not req.attention:
        return []
    from diffusers import UNet2DConditionModel

    from ..core.hooks import ChangeAt

    pipe = ready.pipe
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if not isinstance(denoiser, UNet2DConditionModel):
        raise BadInput(f"--attention records a UNet's cross-attention; a {type(pipe).__name__}'s denoiser is a "
                       f"{type(denoiser).__name__} (joint attention), which sdstream cannot record yet")
    base = continuation.parent if continuation else req
    changes = [(h.step, h.prompt) for h in ready.hooks if isinstance(h, ChangeAt) and h.prompt is not None]
    schedule = sorted([(1, base.prompt), *changes], key=lambda c: c[0])
    first = continuation.at if continuation else req.first_step  # (a branch records its own steps only)
    schedule = [c for c, after in zip(schedule, [*schedule[1:], (math.inf, "")]) if after[0] > first]
    folder = next((sink for sink in sinks if isinstance(sink, RunFolder)), None)  # None: the heat maps alone
    grid = (ready.height // pipe.vae_scale_factor, ready.width // pipe.vae_scale_factor)
    return [AttentionMaps(denoiser, folder, prompts_of(pipe.tokenizer, schedule, req.attention_words),
                          pipe.tokenizer.model_max_length, pipe._execution_device, grid, note=_note(base))]


def _note(req) -> str | None:
    if req.prompt_image is None:
        return None
    return ("the conditional half is a photo's CLIP features (--prompt-image) repeated over the token positions, "
            f"blended with the text at weight {req.image_weight:g}: the rows name the text's tokens")


def prompts_of(tokenizer, schedule: list[tuple[int, str]], wanted: str | None) -> list[Prompt]:
    """The prompts of SCHEDULE ((from step, text)) as rows, with the words to draw: WANTED (comma-separated, any
    case; 'red' draws every 'red', 'red#2' the second), else every word that is not a stop word."""
    from ..core.attention import END, START, unique_keys, words_of

    prompts, folders = [], {}
    for step, text in schedule:
        labels, positions = words_of(tokenizer, text)
        prompts.append(Prompt(step, text, unique_keys(labels), positions, []))
    asked = [w.strip() for w in (wanted or "").split(",") if w.strip()]
    for w in asked:
        if not any(_matches(key, w) for p in prompts for key in p.keys[1:-1]):
            known = ", ".join(dict.fromkeys(k for p in prompts for k in p.keys[1:-1])) or "none"
            raise BadInput(f"--attention-words {w!r} is not a word of the prompt (its words: {known})")
    for p in prompts:
        for row, key in enumerate(p.keys):
            if key in (START, END):
                continue
            word = key.split("#")[0]
            chosen = any(_matches(key, w) for w in asked) if asked else (
                re.search(r"\w", word) is not None and word.lower() not in STOP_WORDS)
            if chosen:
                if key not in folders:
                    folders[key] = _folder(key, set(folders.values()))
                p.drawn.append((row, folders[key]))
    return prompts


def _matches(key: str, asked: str) -> bool:
    return asked.lower() in (key.lower(), key.split("#")[0].lower())


def _folder(key: str, taken: set[str]) -> str:
    """attention/<name>/ for word KEY: lowercase, anything but letters and digits as '-', unique."""
    name = re.sub(r"[^\w]+", "-", key.lower()).strip("-_") or "token"
    folder, n = f"{ATTENTION}/{name}/", 1
    while folder in taken:
        n += 1
        folder = f"{ATTENTION}/{name}-{n}/"
    return folder


class AttentionMaps(Sink):
    """Each step's maps into FOLDER (a RunFolder, started before this sink; anything with its annotate() and
    write()): the tensors every step, the heat maps on the steps that have a frame (every step without previews).
    The heat maps also go on the Step as `heat` (word -> uint8 [H, W, 3] on the device) for the sinks after this
    one; with FOLDER None that is all it does. UNET is the denoiser, DEVICE where it runs, GRID the latent grid
    (h, w), TOKENS the text encoder's length."""

    def __init__(self, unet, folder, prompts: list[Prompt], tokens: int, device, grid: tuple[int, int],
                 note: str | None = None):
        from ..core.attention import CrossAttentionRecorder, cross_attention_layers

        self.unet, self.folder, self.prompts, self.tokens, self.device = unet, folder, prompts, tokens, device
        self.grid, self.layers, self.note = grid, len(cross_attention_layers(unet)), note
        self.recorder = CrossAttentionRecorder()

    def recording(self):
        """The recorder installed on the UNet (core/attention.recording) for as long as the block runs."""
        from ..core.attention import recording

        return recording(self.unet, self.recorder)

    def start(self, info: RunInfo) -> None:
        from ..core.attention import merge_matrix, palette
        from .files import picture_encoder

        for p in self.prompts:  # uploaded once, here: nothing goes to the device per step
            p.merge = merge_matrix(p.positions, self.tokens, self.device)
        self.colours = palette(self.device)
        self.size = frame_size(info.request.frame_size, info.width, info.height)  # (frames without a picture)
        self.every_step = info.preview == "none"
        self.encode = picture_encoder("png", self.size)
        if self.folder is None:
            return
        self.folder.annotate(ATTENTION, {
            "tokens": self.prompts[0].keys,
            "prompts": [{"from_step": p.from_step, "prompt": p.text, "tokens": p.keys} for p in self.prompts],
            "words": {p.keys[row]: folder for p in self.prompts for row, folder in p.drawn},
            "maps": f"{ATTENTION}/step-NNNN.safetensors", "grid": list(self.grid), "layers": self.layers,
            "dtype": "float16", "how": HOW, **({"note": self.note} if self.note else {}),
        })

    def step(self, step: Step) -> None:
        import torch

        from ..core.attention import heat_frames

        ev = step.event
        maps = self.recorder.take()
        if maps is None:
            return
        prompt, words = self.prompt(ev.step), self.words(ev.step, maps)
        if self.folder is not None:
            meta = {"step": str(ev.step), "timestep": str(ev.timestep), "tokens": json.dumps(prompt.keys),
                    "prompt": prompt.text}
            self.folder.write(f"{ATTENTION}/step-{ev.step:04d}.safetensors", {"maps": words.to(torch.float16)},
                              partial(_safetensors, meta=meta), ev.step)
        if prompt.drawn and (step.picture is not None or self.every_step):
            frames = heat_frames(torch.stack([words[row] for row, _ in prompt.drawn]), step.picture, self.size,
                                 self.colours)
            step.heat = {prompt.keys[row]: frame for (row, _), frame in zip(prompt.drawn, frames)}
            if self.folder is not None:
                for (_, folder), frame in zip(prompt.drawn, frames):
                    self.folder.write(f"{folder}step-{ev.step:04d}.png", frame, self.encode, ev.step)

    def prompt(self, step: int) -> Prompt:
        """The prompt in force at STEP."""
        return [p for p in self.prompts if p.from_step <= step][-1]

    def words(self, step: int, maps):
        """MAPS [tokens, h, w] (the recorder's) as STEP's rows [words, h, w], on the device."""
        merge = self.prompt(step).merge
        if maps.shape[0] != merge.shape[1]:
            raise SdstreamError(f"the cross-attention has {maps.shape[0]} token positions; the tokenizer gives "
                                f"{merge.shape[1]}")
        return (merge @ maps.flatten(1)).view(merge.shape[0], *maps.shape[1:])


def _safetensors(tensors: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


@contextmanager
def recording(maps: list):
    """The recorders of MAPS (attention_maps' list) installed while the block runs."""
    with maps[0].recording() if maps else nullcontext():
        yield
