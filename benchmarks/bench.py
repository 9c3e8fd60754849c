"""Frame-recording overhead: sdstream against diffusers' own pipeline, in one process and one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench.py                 # CPU: tiny at 64x64, 20 steps
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --full-size     # GPU: SD 1.5 architecture, random weights,
                                                                #      512², 50 steps
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --sdxl          # GPU: SDXL architecture, random weights,
                                                                #      1024², 30 steps: (a) against approx

It times, on the same model, size, steps and seed:
  (a)  diffusers StableDiffusionPipeline, no per-step work                       (the baseline)
  (b)  diffusers + a callback_on_step_end that VAE-decodes and saves a PNG every step
  (b2) diffusers + the callback from diffusers' "Pipeline callbacks" guide (linear latents_to_rgb, PNG per step)
  (c)  sdstream.run with --preview none | approx | vae (| taesd with --taesd or --taesd-random), a frame every step
  (d)  with --trajectory: approx frames plus --save-tensors latents,x0, --save-state, both, or --attention,
       and a branch at the middle step K from a run kept with --save-state (target: (N-K+1)/N of approx's time)
and prints each one's median wall time, its ratio to (a) and, on CUDA, its peak GPU memory. Runs are interleaved
(a, b, b2, c…, a, b, …) so that load on the machine hits every variant alike; the table is printed after each
round, so a run cut short by a timeout still reports. --profile FILE writes a torch.profiler table of 3 steps of
(a) and of sdstream approx (and their chrome traces, gzipped, beside FILE).
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


def taesd_random_folder(root: Path) -> Path:
    """AutoencoderTiny at its default config (TAESD's architecture) with random weights, as a --taesd folder."""
    import torch
    from diffusers import AutoencoderTiny

    path = root / "taesd-random"
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(path)
    return path


def sdxl_random_folder(root: Path, small: bool = False) -> Path:
    """The published SDXL base architecture (stabilityai/stable-diffusion-xl-base-1.0's configs: a 2.6 B UNet, CLIP
    ViT-L and OpenCLIP bigG text encoders) with random weights, saved in fp16. SMALL: the same parts at tiny widths,
    only to try the SDXL path on a CPU."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bpe import tokenizer_files

    if small:
        unet = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                    transformer_layers_per_block=(1, 2), cross_attention_dim=64, addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + 32, sample_size=8)
        texts = [dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                      projection_dim=32, hidden_act=act) for act in ("quick_gelu", "gelu")]
        vae_channels = (32, 64)
    else:
        unet = dict(block_out_channels=(320, 640, 1280),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + 1280, sample_size=128)
        texts = [dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      projection_dim=768, hidden_act="quick_gelu"),
                 dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                      projection_dim=1280, hidden_act="gelu")]
        vae_channels = (128, 256, 512, 512)
    path = root / ("sdxl-small-random" if small else "sdxl-random")
    if (path / "model_index.json").exists():
        return path
    vocab, merges = tokenizer_files("a red circle on blue background".split())
    ids = dict(eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
               pad_token_id=vocab["<|endoftext|>"], vocab_size=49408, max_position_embeddings=77)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 3.5 B weights: on the GPU
        models = dict(
            unet=UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2, use_linear_projection=True,
                                      addition_embed_type="text_time", **unet),
            vae=AutoencoderKL(block_out_channels=vae_channels, latent_channels=4,
                              down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                              up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
                              layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
            text_encoder=CLIPTextModel(CLIPTextConfig(**texts[0], **ids)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**texts[1], **ids)),
        )
        models = {name: m.half().cpu() for name, m in models.items()}
    pipe = StableDiffusionXLPipeline(
        **models, tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )
    pipe.save_pretrained(path)
    del pipe, models
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def profile(path: Path, runs: dict, cuda: bool) -> None:
    """A torch.profiler table of each of RUNS (name -> a function running 3 steps) into PATH, where the time goes
    and what syncs the host (cudaStreamSynchronize, aten::item, copies to the CPU); each one's chrome trace, gzipped,
    beside it as PATH-stem-NAME.json.gz."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    syncs = ("synchronize", "item", "local_scalar_dense", "memcpy", "nonzero", "to_copy")
    with open(path, "w") as f:
        for name, fn in runs.items():
            with torch.profiler.profile(activities=activities) as prof:
                fn()
                if cuda:
                    torch.cuda.synchronize()
            events = prof.key_averages()
            f.write(f"==== {name}: sorted by self {'CUDA' if cuda else 'CPU'} time\n")
            f.write(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40))
            f.write(f"\n==== {name}: host syncs and copies\n")
            for e in events:
                if any(word in e.key.lower() for word in syncs):
                    f.write(f"{e.key:60s} count {e.count:6d}  CPU total {e.cpu_time_total / 1e3:9.2f} ms\n")
            f.write("\n")
            trace = path.parent / f"{path.stem}-{name.split()[0]}.json"
            prof.export_chrome_trace(str(trace))
            with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
                shutil.copyfileobj(raw, packed)
            trace.unlink()
    print(f"profile written to {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-size", action="store_true", help="SD 1.5 architecture at 512², 50 steps (for a GPU)")
    ap.add_argument("--sdxl", action="store_true", help="SDXL architecture at 1024², 30 steps, (a) against approx "
                                                         "(for a GPU)")
    ap.add_argument("--sdxl-small", action="store_true", help="--sdxl with tiny widths: to try it on a CPU")
    ap.add_argument("--size", type=int, help="image side (default 64 for tiny, 512 full size, 1024 SDXL)")
    ap.add_argument("--steps", type=int, help="default 20 for tiny, 50 full size, 30 SDXL")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--taesd", help="TAESD folder or hub id: adds sdstream --preview taesd")
    ap.add_argument("--taesd-random", action="store_true",
                    help="adds sdstream --preview taesd with a random-weight AutoencoderTiny (TAESD's cost)")
    ap.add_argument("--compile", action="store_true", help="adds sdstream --compile --preview approx")
    ap.add_argument("--trajectory", action="store_true",
                    help="adds approx with --save-tensors latents,x0, --save-state, both, --attention, and a branch "
                         "at the middle step")
    ap.add_argument("--profile", type=Path, metavar="FILE", help="write a torch.profiler table of 3 steps of (a) and "
                                                                  "of sdstream approx to FILE")
    args = ap.parse_args()

    import torch
    from PIL import Image

    import sdstream
    from sdstream import GenerationRequest
    from sdstream.models.loader import dtype_name

    work = Path(tempfile.mkdtemp(prefix="sdstream-bench-"))
    sdxl = args.sdxl or args.sdxl_small
    if sdxl:
        model = str(sdxl_random_folder(work, small=args.sdxl_small))
        title = f"SDXL architecture{' at tiny widths' * args.sdxl_small} (random weights)"
    elif args.full_size:
        model, title = str(sd15_random_folder(work)), "SD 1.5 architecture (random weights)"
    else:
        model, title = "tiny", "tiny"
    size = args.size or (1024 if args.sdxl else 512 if args.full_size else 64)
    steps = args.steps or (30 if sdxl else 50 if args.full_size else 20)
    guidance = 5.0 if sdxl else 7.5
    taesd = args.taesd or (str(taesd_random_folder(work)) if args.taesd_random else None)
    pipe = sdstream.load(model, device=args.device)  # the same pipeline object serves every variant
    device = pipe.device
    cuda = device.type == "cuda"
    prompt = "a red circle on a blue background"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def diffusers_run(callback=None, steps=steps):
        def go():
            image = pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=guidance,
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

    def request(preview, compile=False, steps=steps, **extra):
        return GenerationRequest(prompt=prompt, model=model, steps=steps, width=size, height=size, seed=1,
                                 guidance=guidance, device=str(device), preview=preview, compile=compile,
                                 taesd=taesd if preview == "taesd" else None, **extra)

    def sdstream_run(preview, compile=False, steps=steps, **extra):
        req = request(preview, compile, steps, **extra)
        out = work / f"c-{preview}-{compile}-{steps}-{'-'.join(extra)}"
        return lambda: sdstream.run(req, out, overwrite=True)

    variants = {"(a)  diffusers, no per-step work": diffusers_run()}
    if not sdxl:
        variants["(b)  diffusers + VAE decode & save callback"] = diffusers_run(vae_callback)
        variants["(b2) diffusers + guide's latents_to_rgb callback"] = diffusers_run(guide_callback)
        variants["(c)  sdstream --preview none"] = sdstream_run("none")
    variants["(c)  sdstream --preview approx"] = sdstream_run("approx")
    if not sdxl:
        variants["(c)  sdstream --preview vae"] = sdstream_run("vae")
    if taesd:
        variants["(c)  sdstream --preview taesd"] = sdstream_run("taesd")
    if args.compile:  # its warm-up below includes the compilation
        variants["(c)  sdstream --compile --preview approx"] = sdstream_run("approx", compile=True)
    at = max(2, steps // 2)
    if args.trajectory:  # what recording the trajectory costs on top of approx frames
        variants["(d)  approx + --save-tensors latents,x0"] = sdstream_run("approx", save_tensors=("latents", "x0"))
        variants["(d)  approx + --save-state"] = sdstream_run("approx", save_state=True)
        variants["(d)  approx + latents,x0 + --save-state"] = sdstream_run("approx", save_tensors=("latents", "x0"),
                                                                          save_state=True)
        variants["(d)  approx + --attention"] = sdstream_run("approx", attention=True)
        # `sdstream branch RUN --at-step K`: the same request naming its parent and K, continued from the parent's
        # state after step K-1; the parent is kept aside, made once
        parent = work / "branch-parent"
        try:
            sdstream.run(request("approx", save_state=True), parent, overwrite=True)
            variants[f"(d)  branch at step {at} (approx)"] = sdstream_run("approx", parent=str(parent), at_step=at)
        except Exception as e:
            print(f"FAIL the branch's parent run: {type(e).__name__}: {e}", flush=True)

    for name, fn in list(variants.items()):  # warm-up: first calls allocate, autotune, compile and fill caches
        started = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one broken variant must not cost the others' numbers
            print(f"FAIL warm-up {name}: {type(e).__name__}: {e}", flush=True)
            del variants[name]
            continue
        print(f"warm-up {name}: {time.perf_counter() - started:.1f} s", flush=True)
    if args.profile:
        profile(args.profile, {"diffusers (a), 3 steps": diffusers_run(steps=3),
                               "sdstream approx, 3 steps": sdstream_run("approx", steps=3)}, cuda)

    gpu = torch.cuda.get_device_name(device) if cuda else f"CPU, {os.cpu_count()} cores"
    print(f"model {title}, {size}x{size}, {steps} steps, guidance {guidance}, {device} ({gpu}), "
          f"{dtype_name(pipe.unet.dtype)}, torch {torch.__version__}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, tuple[float, float]] = {}  # name -> (peak GiB, peak GiB above what was allocated before)
    for done in range(1, args.repeats + 1):
        for name, fn in variants.items():
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)
            if cuda:
                peak = torch.cuda.max_memory_allocated()
                peaks[name] = max(peaks.get(name, (0, 0)), (peak / 2**30, (peak - before) / 2**30))

        base = statistics.median(times["(a)  diffusers, no per-step work"])
        memory = f" {'peak GiB':>8s} {'+GiB':>6s}" if cuda else ""
        print(f"\nmedian of {done} run{'s' * (done > 1)} (of {args.repeats})")
        print(f"{'variant':52s} {'seconds':>8s} {'it/s':>7s} {'ratio':>6s}{memory}")
        for name, ts in times.items():
            t = statistics.median(ts)
            memory = f" {peaks[name][0]:8.2f} {peaks[name][1]:6.2f}" if cuda else ""
            print(f"{name:52s} {t:8.3f} {steps / t:7.1f} {t / base:6.3f}{memory}")
        branch, approx = f"(d)  branch at step {at} (approx)", "(c)  sdstream --preview approx"
        if branch in times and approx in times:
            ratio = statistics.median(times[branch]) / statistics.median(times[approx])
            target = (steps - at + 1) / steps
            print(f"branch / approx {ratio:.3f}, target (N-K+1)/N = {target:.3f} "
                  f"({'within' if abs(ratio / target - 1) <= 0.1 else 'NOT within'} 10%)")
        if cuda:
            print("peak GiB: torch.cuda.max_memory_allocated in the run (every loaded pipeline's weights included); "
                  "+GiB: that peak above what was allocated before the run")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
