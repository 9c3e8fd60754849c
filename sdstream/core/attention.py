"""Cross-attention maps: where each token of the prompt goes, at every step (DAAM's aggregation, per step).

A CrossAttentionRecorder is installed through diffusers' attention-processor interface for the length of a run
(`recording(unet, recorder)`) and removed afterwards: the UNet gets back the very processor objects it had. Only
the cross-attention layers get a recording processor; self-attention keeps its own. Where a layer's processor is
diffusers' AttnProcessor2_0 (the default), the recording processor computes the layer's output exactly as it does
(its code, the same calls in the same order: the pixels are those of a run without it) and shares its Q and K;
any other processor (sliced attention, xformers) still computes the output, and Q and K are projected again.

What is kept, per cross-attention layer, for the conditional half of the batch (the second half under
classifier-free guidance, the whole batch of one without):

    P = softmax(Q K^T / sqrt(d))     Q = to_q(the layer's pixels), K = to_k(the prompt's embeddings), d the head width

per head, then the mean over the heads: [tokens, h_l, w_l] on the layer's own grid (its pixels in the row-major
order the UNet's transformer flattens them in). Each layer's map is upsampled to the latent grid [h, w] (bilinear:
every value stays a weighted mean of its neighbours, so at each pixel the tokens still sum to 1) and the maps of
all cross-attention layers are averaged, each layer counting once. `take()` gives the last UNet call's result,
[tokens, h, w] in fp32 on the device: at each latent pixel, a distribution over the token positions (the start
token, the prompt's tokens, the end token and the padding).

Nothing here reads a value on the host or uploads one per step: shapes are Python ints, the maps stay on the device
until a sink hands them to the run folder's writer. torch is imported inside functions (the module is imported only
once a run asks for maps).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

START, END = "<start>", "<end>"  # the start token; the end token with all the padding after it


class CrossAttentionRecorder:
    """Collects the cross-attention maps of each UNet call. KEEP_LAYERS also keeps every layer's own map (on its own
    grid, before upsampling) in `layers`, by processor name: for tests and diagnostics."""

    def __init__(self, keep_layers: bool = False):
        import torch.nn.functional as F

        self._interpolate = F.interpolate
        self.keep_layers = keep_layers
        self.size: tuple[int, int] | None = None  # the latent grid of the current UNet call
        self.total = None  # the sum over the layers so far, [tokens, h, w]
        self.count = 0
        self.layers: dict = {}

    def begin(self, module, args, kwargs) -> None:
        """A forward pre-hook of the UNet: a new call (a step) begins; its sample gives the latent grid."""
        sample = args[0] if args else kwargs["sample"]
        self.size = (int(sample.shape[-2]), int(sample.shape[-1]))
        self.total, self.count, self.layers = None, 0, {}

    def add(self, name: str, query, key, mask, scale: float) -> None:
        """One layer's attention: QUERY [batch, heads, pixels, d] and KEY [batch, heads, tokens, d] (and the additive
        MASK [batch, heads, 1 or pixels, tokens], or None); the conditional half is the batch's second half."""
        half = query.shape[0] // 2
        q, k = query[half:].float(), key[half:].float()
        scores = q @ k.transpose(-1, -2) * scale
        if mask is not None:
            scores = scores + mask[half:].float()
        probs = scores.softmax(dim=-1).mean(dim=(0, 1))  # [pixels, tokens]: the mean over the heads
        h, w = self.grid(probs.shape[0])
        layer = probs.transpose(0, 1).reshape(-1, h, w)  # row-major: pixel index = y * w + x
        if self.keep_layers:
            self.layers[name] = layer
        if (h, w) != self.size:
            layer = self._interpolate(layer[None], size=self.size, mode="bilinear", align_corners=False)[0]
        self.total = layer if self.total is None else self.total + layer
        self.count += 1

    def grid(self, pixels: int) -> tuple[int, int]:
        """(h, w) of a layer with PIXELS positions: the latent grid halved (rounding up, as the UNet's stride-2
        convolutions do) until it fits."""
        from ..errors import SdstreamError

        if self.size is None:
            raise SdstreamError("a cross-attention layer ran outside a UNet call; cannot tell its grid")
        h, w = self.size
        while h * w > pixels and (h > 1 or w > 1):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != pixels:
            raise SdstreamError(f"a cross-attention layer of {pixels} positions does not fit the latent grid "
                                f"{self.size[0]}x{self.size[1]}")
        return h, w

    def take(self):
        """The last UNet call's maps: [tokens, h, w] on the device, the mean over its cross-attention layers
        (None when no layer ran)."""
        if self.total is None:
            return None
        maps, self.total = self.total / self.count, None
        return maps


class RecordingProcessor:
    """The processor of one cross-attention layer while maps are recorded: PREVIOUS is the layer's own."""

    def __init__(self, recorder: CrossAttentionRecorder, previous, name: str):
        import torch.nn.functional as F
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.recorder, self.previous, self.name = recorder, previous, name
        self.fused = type(previous) is AttnProcessor2_0  # (the exact class: a subclass may compute otherwise)
        self._sdpa = F.scaled_dot_product_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None or not self.fused:  # called as Attention.forward calls a processor
            out = self.previous(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, **({} if temb is None else {"temb": temb}))
            if encoder_hidden_states is None:  # (called as self-attention: nothing to record)
                return out
            query, key, mask = _query_key(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            self.recorder.add(self.name, query, key, mask, attn.scale)
            return out
        return self._fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    # Copied from diffusers.models.attention_processor.AttnProcessor2_0.__call__ (diffusers 0.42), with the one
    # line marked "recorded" added, and its deprecation message for a `scale` argument left out.
    def _fused(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        self.recorder.add(self.name, query, key, attention_mask, head_dim**-0.5)  # recorded (SDPA's own scale)

        hidden_states = self._sdpa(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states


def _query_key(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """Q and K [batch, heads, n, d] and the additive mask, projected again as AttnProcessor2_0 projects them: for a
    layer whose own processor computes its output (sliced attention, xformers)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch_size, sequence_length, _ = encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query, key = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, attention_mask


def cross_attention_layers(unet) -> list[str]:
    """The processor names (as unet.attn_processors has them) of UNET's cross-attention layers."""
    return [name for name in unet.attn_processors
            if getattr(unet.get_submodule(name.removesuffix(".processor")), "is_cross_attention", False)]


@contextmanager
def recording(unet, recorder: CrossAttentionRecorder):
    """RECORDER's processors on UNET's cross-attention layers (and a pre-hook that starts each call) while the
    block runs; afterwards the very processor objects UNET had before, however the block ends."""
    previous = dict(unet.attn_processors)
    cross = set(cross_attention_layers(unet))
    unet.set_attn_processor({name: RecordingProcessor(recorder, proc, name) if name in cross else proc
                             for name, proc in previous.items()})
    handle = unet.register_forward_pre_hook(recorder.begin, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()
        unet.set_attn_processor(dict(previous))  # (a copy: set_attn_processor empties the dict it is given)


# ------------------------------------------------------------------------------------------ tokens as words


def words_of(tokenizer, prompt: str) -> tuple[list[str], list[list[int]]]:
    """(labels, positions): the prompt's words as the user wrote them and the token positions of each, over the
    padded sequence the text encoder sees (diffusers' encode_prompt: padding to model_max_length, truncated).

    The labels are START, the words, END; END holds the end token and every position after it (the padding). A
    word's sub-word pieces are one word: a BPE piece that ends in "</w>" (CLIP's mark) ends its word, and so does a
    gap in the text. A label is the word's own text where the tokenizer gives offsets (the case as typed), else its
    pieces joined."""
    length = tokenizer.model_max_length
    kwargs = dict(padding="max_length", max_length=length, truncation=True)
    try:
        encoded = tokenizer(prompt, return_offsets_mapping=True, **kwargs)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a tokenizer without offsets
        encoded, offsets = tokenizer(prompt, **kwargs), None
    ids = list(encoded["input_ids"])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    first = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    end = next((i for i in range(first, len(ids)) if ids[i] == tokenizer.eos_token_id), len(ids))
    labels, positions = [START], [list(range(first))]
    words: list[list[int]] = []
    for i in range(first, end):
        gap = offsets is not None and words and offsets[i][0] > offsets[words[-1][-1]][1]
        if not words or pieces[words[-1][-1]].endswith("</w>") or gap:
            words.append([])
        words[-1].append(i)
    for word in words:
        if offsets is not None:
            labels.append(prompt[offsets[word[0]][0]:offsets[word[-1]][1]])
        else:
            labels.append("".join(pieces[i] for i in word).replace("</w>", ""))
        positions.append(word)
    labels.append(END)
    positions.append(list(range(end, len(ids))))
    return labels, positions


def unique_keys(labels: list[str]) -> list[str]:
    """LABELS made unique by their place: a word that comes again is 'word#2', 'word#3'."""
    seen: dict[str, int] = {}
    keys = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        keys.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return keys


def merge_matrix(positions: list[list[int]], length: int, device):
    """[words, LENGTH] of 0/1: a word's map is the sum of its positions' (its share of the attention)."""
    import torch

    merge = torch.zeros(len(positions), length)
    for row, where in enumerate(positions):
        merge[row, where] = 1.0
    return merge.to(device)


# ------------------------------------------------------------------------------------------ heat maps

# A coarse 'inferno' colour map (dark = little, bright = the step's most), as views/draw.py's heat maps
INFERNO = ((0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39),
           (252, 255, 164))
OPACITY = 0.7  # of the colour over the step's picture (in grey: the colours are the map's alone)
GREY = (0.299, 0.587, 0.114)  # luminance (ITU-R 601)


def palette(device):
    """(the colour map's anchors [8, 3], the luminance weights [3]) on DEVICE: made once, before the steps."""
    import torch

    return torch.tensor(INFERNO, dtype=torch.float32, device=device), torch.tensor(GREY, device=device)


def heat_frames(maps, picture, size: tuple[int, int], colours):
    """Heat maps of MAPS [k, h, w] as uint8 [k, H, W, 3] pictures on the device: each map upsampled (bilinear) to
    the picture's size (or SIZE, (width, height), without a PICTURE), scaled by its own largest value, coloured
    with COLOURS (palette()) and laid at OPACITY over PICTURE (uint8 [H, W, 3], the step's preview) in grey."""
    import torch
    import torch.nn.functional as F

    colours, grey_weights = colours
    height, width = picture.shape[:2] if picture is not None else (size[1], size[0])
    up = F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    peak = up.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    x = (up / peak).clamp(0, 1) * (len(colours) - 1)
    lo = x.floor().clamp(max=len(colours) - 2)
    frac = (x - lo)[..., None]
    lo = lo.long()
    colour = colours[lo] * (1 - frac) + colours[lo + 1] * frac
    if picture is not None:
        grey = picture.float() @ grey_weights
        colour = OPACITY * colour + (1 - OPACITY) * grey[..., None]
    return colour.round().clamp(0, 255).to(torch.uint8)
