"""A tiny random-weight SDXL pipeline, built offline from configs the way diffusers' own SDXL tests build theirs
(tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py, get_dummy_components): two CLIP text encoders
(the second with a projection, whose pooled output and penultimate hidden states SDXL uses), a UNet with
"text_time" added conditioning, a 2x VAE. Each component under torch.manual_seed(0). The tokenizers are CLIP BPE
tokenizers of tools/bpe.py's format (no download), the second padding with "!" as SDXL's does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "red", "circle", "on", "blue", "background", "green", "square", "painting"]


def _bpe():
    spec = importlib.util.spec_from_file_location("sdstream_tools_bpe", ROOT / "tools" / "bpe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tokenizer(pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    vocab, merges = _bpe().tokenizer_files(WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)


def components(aesthetics: bool = False, force_upcast: bool = True) -> dict:
    """The pipeline's parts. AESTHETICS: a UNet whose added time ids are SDXL refiner's five (original size, crop,
    aesthetic score), not the base's six (original size, crop, target size)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok, tok_2 = tokenizer(), tokenizer("!")
    vocab = tok.get_vocab()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=(5 if aesthetics else 6) * 8 + 32,  # time ids x 8 + pooled width
        cross_attention_dim=64,  # the two encoders' hidden states side by side: 32 + 32
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")  # SDXL's own
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128,
                        scaling_factor=0.13025, force_upcast=force_upcast)
    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"], hidden_size=32, intermediate_size=37,
                            layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, vocab_size=len(vocab),
                            hidden_act="gelu", projection_dim=32)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return {"unet": unet, "scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tok,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tok_2, "image_encoder": None, "feature_extractor": None}


def save(folder: Path, aesthetics: bool = False) -> Path:
    """A model folder, as on the Hub: StableDiffusionXLPipeline's (or, with AESTHETICS, a refiner-like
    StableDiffusionXLImg2ImgPipeline's that requires aesthetic scores)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if aesthetics:
        pipe = StableDiffusionXLImg2ImgPipeline(**components(aesthetics=True), requires_aesthetics_score=True)
    else:
        pipe = StableDiffusionXLPipeline(**components())
    pipe.save_pretrained(folder)
    return folder
