"""Tiny random-weight SD3 and FLUX pipelines, built offline from configs the way diffusers' own tests build theirs
(tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py and tests/pipelines/flux/test_pipeline_flux.py,
get_dummy_components), each component under torch.manual_seed(0), and saved as model folders.

Unlike diffusers' dummies, the latent has the real 16 channels (so the families' published preview colours apply),
SD3's transformer patches 2x2 as the real one does, and the schedulers are configured as the real folders' are:
SD3's shift 3; FLUX.1 [dev]'s dynamic shifting with embedded guidance, [schnell]'s fixed shift 1 with none.
The tokenizers are made here, no download: CLIP BPE tokenizers of tools/bpe.py's format, and a T5 (Unigram)
tokenizer whose pieces are the words below.
"""

from __future__ import annotations

import string
from pathlib import Path

from dummy_sdxl import WORDS
from dummy_sdxl import tokenizer as clip_tokenizer  # the same toy CLIP tokenizer (tools/bpe.py over WORDS)

LATENT_CHANNELS, T5_WIDTH, CLIP_WIDTH = 16, 64, 32


def t5_tokenizer():
    """A T5 tokenizer (Unigram, SentencePiece-style pieces): each word one piece, anything else letter by letter."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in string.ascii_lowercase + string.digits]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip(cls, vocab):
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(0)
    return cls(CLIPTextConfig(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                              pad_token_id=vocab["<|endoftext|>"], hidden_size=CLIP_WIDTH, intermediate_size=37,
                              layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=len(vocab), hidden_act="gelu", projection_dim=CLIP_WIDTH))


def _t5(tokenizer):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_ff=37, d_kv=8, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _vae(shift: float, scale: float):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=4, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale)  # a 2x VAE


def sd3_components() -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tok, tok_3 = clip_tokenizer(), t5_tokenizer()
    vocab = tok.get_vocab()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=T5_WIDTH, pooled_projection_dim=2 * CLIP_WIDTH,
                                        out_channels=LATENT_CHANNELS, pos_embed_max_size=32)
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's own
            "vae": _vae(0.0609, 1.5305), "text_encoder": _clip(CLIPTextModelWithProjection, vocab),
            "text_encoder_2": _clip(CLIPTextModelWithProjection, vocab), "text_encoder_3": _t5(tok_3),
            "tokenizer": tok, "tokenizer_2": clip_tokenizer("!"), "tokenizer_3": tok_3,
            "image_encoder": None, "feature_extractor": None}


def flux_components(guidance: bool = True) -> dict:
    """FLUX.1 [dev]-like with GUIDANCE (embedded guidance, dynamic shifting), else [schnell]-like."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tok, tok_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
                                         guidance_embeds=guidance, axes_dims_rope=[4, 4, 8])
    if guidance:  # FLUX.1 [dev]'s scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # FLUX.1 [schnell]'s
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer, "scheduler": scheduler, "vae": _vae(0.1159, 0.3611),
            "text_encoder": _clip(CLIPTextModel, tok.get_vocab()), "text_encoder_2": _t5(tok_2),
            "tokenizer": tok, "tokenizer_2": tok_2, "image_encoder": None, "feature_extractor": None}


def save(folder: Path, kind: str) -> Path:
    """A model folder, as on the Hub, of KIND: sd3, flux-dev or flux-schnell."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if kind == "sd3":
        pipe = StableDiffusion3Pipeline(**sd3_components())
    else:
        pipe = FluxPipeline(**flux_components(guidance=kind == "flux-dev"))
    pipe.save_pretrained(folder)
    return folder
