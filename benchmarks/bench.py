"""Frame-recording overhead: sdstream against diffusers' own pipeline, in one process and one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench.py                 # CPU: tiny at 64x64, 20 steps
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --full-size     # GPU: SD 1.5 architecture, random weights,
                                                                #      512², 50 steps

It times, on the same model, size, steps and seed:
  (a)  diffusers StableDiffusionPipeline, no per-step work                       (the baseline)
  (b)  diffusers + a callback_on_step_end that VAE-decodes and saves a PNG every step
  (b2) diffusers + the callback from diffusers' "Pipeline callbacks" guide (linear latents_to_rgb, PNG per step)
  (c)  sdstream.run with --preview none | approx | vae (| taesd when --taesd is given), a frame every step
  (d)  with --trajectory: approx frames plus --save-tensors latents,x0, --save-state, or --attention
and prints each one's median wall time and its ratio to (a). Runs are interleaved (a, b, b2, c…, a, b, …)
so that load on the machine hits every variant alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sd15_random_folder(root: Path) -> Path:
    """The published SD 1.5 architecture with random weights: speed doesn't depend on weight values."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bpe import tokenizer_files

    path = root / "sd15-random"
    if (path / "model_index.json").exists():
        return path
    torch.manual_seed(0)
    vocab, merges = tokenizer_files("a red circle on blue background".split())
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"]))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        unet=unet, scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-size", action="store_true", help="SD 1.5 architecture at 512², 50 steps (for a GPU)")
    ap.add_argument("--size", type=int, help="image side (default 64 for tiny, 512 full size)")
    ap.add_argument("--steps", type=int, help="default 20 for tiny, 50 full size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--taesd", help="TAESD folder or hub id: adds sdstream --preview taesd")
    ap.add_argument("--compile", action="store_true", help="adds sdstream --compile --preview approx")
    ap.add_argument("--trajectory", action="store_true",
                    help="adds approx with --save-tensors latents,x0, with --save-state, with --attention")
    args = ap.parse_args()

    import torch
    from PIL import Image

    import sdstream
    from sdstream import GenerationRequest
    from sdstream.models.loader import dtype_name

    work = Path(tempfile.mkdtemp(prefix="sdstream-bench-"))
    model = str(sd15_random_folder(work)) if args.full_size else "tiny"
    size = args.size or (512 if args.full_size else 64)
    steps = args.steps or (50 if args.full_size else 20)
    pipe = sdstream.load(model, device=args.device)  # the same pipeline object serves every variant
    device = pipe.device
    prompt = "a red circle on a blue background"

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def diffusers_run(callback=None):
        def go():
            image = pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
                         generator=torch.Generator("cpu").manual_seed(1), callback_on_step_end=callback).images[0]
            image.save(work / "diffusers-final.png")
        return go

    def vae_callback(p, i, t, kwargs):  # decode-and-save on the loop's thread: the common recipe
        with torch.no_grad():
            image = p.vae.decode(kwargs["latents"] / p.vae.config.scaling_factor, return_dict=False)[0]
        p.image_processor.postprocess(image, output_type="pil")[0].save(work / f"b-{i}.png")
        return kwargs

    weights = torch.tensor(((60, -60, 25, -70), (60, -5, 15, -50), (60, 10, -5, -35)), dtype=torch.float32).t()
    biases = torch.tensor((150, 140, 130), dtype=torch.float32)

    def guide_callback(p, i, t, kwargs):  # diffusers' "Pipeline callbacks" guide, latents_to_rgb
        latents = kwargs["latents"][0].float()
        rgb = torch.einsum("...lxy,lr -> ...rxy", latents, weights.to(latents.device)) + biases.to(
            latents.device).unsqueeze(-1).unsqueeze(-1)
        Image.fromarray(rgb.clamp(0, 255).byte().cpu().numpy().transpose(1, 2, 0)).save(work / f"b2-{i}.png")
        return kwargs

    def sdstream_run(preview, compile=False, **extra):
        req = GenerationRequest(prompt=prompt, model=model, steps=steps, width=size, height=size, seed=1,
                                device=str(device), preview=preview, compile=compile,
                                taesd=args.taesd if preview == "taesd" else None, **extra)
        out = work / f"c-{preview}-{compile}-{'-'.join(extra)}"
        return lambda: sdstream.run(req, out, overwrite=True)

    variants = {
        "(a)  diffusers, no per-step work": diffusers_run(),
        "(b)  diffusers + VAE decode & save callback": diffusers_run(vae_callback),
        "(b2) diffusers + guide's latents_to_rgb callback": diffusers_run(guide_callback),
        "(c)  sdstream --preview none": sdstream_run("none"),
        "(c)  sdstream --preview approx": sdstream_run("approx"),
        "(c)  sdstream --preview vae": sdstream_run("vae"),
    }
    if args.taesd:
        variants["(c)  sdstream --preview taesd"] = sdstream_run("taesd")
    if args.compile:  # its warm-up below includes the compilation
        variants["(c)  sdstream --compile --preview approx"] = sdstream_run("approx", compile=True)
    if args.trajectory:  # what recording the trajectory costs on top of approx frames
        variants["(d)  approx + --save-tensors latents,x0"] = sdstream_run("approx", save_tensors=("latents", "x0"))
        variants["(d)  approx + --save-state"] = sdstream_run("approx", save_state=True)
        variants["(d)  approx + --attention"] = sdstream_run("approx", attention=True)

    for name, fn in variants.items():  # warm-up: first calls allocate, autotune, compile and fill caches
        started = time.perf_counter()
        fn()
        print(f"warm-up {name}: {time.perf_counter() - started:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)

    base = statistics.median(times["(a)  diffusers, no per-step work"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"model {'SD 1.5 architecture (random weights)' if args.full_size else 'tiny'}, {size}x{size}, "
          f"{steps} steps, guidance 7.5, {device} ({gpu}), {dtype_name(pipe.unet.dtype)}, "
          f"median of {args.repeats}, torch {torch.__version__}")
    print(f"{'variant':52s} {'seconds':>8s} {'it/s':>7s} {'ratio':>6s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:52s} {t:8.3f} {steps / t:7.1f} {t / base:6.3f}")


if __name__ == "__main__":
    sys.exit(main())
