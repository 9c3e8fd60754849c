"""Train the `tiny` that draws: a toy Stable Diffusion on the synthetic world of tools/shapes.py.

CPU only, seeded. Writes an ordinary diffusers StableDiffusionPipeline folder (safetensors) that
sdstream (or diffusers) loads like any other, plus a model card README.md and training.json.

    python tools/train_tiny.py --out DIR                  # the full run (~1.5 h on 2 idle cores)
    python tools/train_tiny.py --out DIR --resume         # go on from DIR/checkpoint/ after a stop
    python tools/train_tiny.py --out DIR --image-encoder  # phase 3: the CLIP vision tower for image prompts
    python tools/train_tiny.py --out /tmp/smoke --vae-steps 20 --unet-steps 20 --batch 8 --threads 1
    python tools/eval_tiny.py --model DIR                 # accuracies, written into DIR/README.md
    python tools/train_tiny.py --from DIR --out DIR16 --fp16   # an fp16 copy (half the size), to evaluate too

Three phases:
 1. VAE (AutoencoderKL, 32/64 channels, 4 latent channels, 32x32 -> 16x16): MSE + 1e-6 KL, then
    scaling_factor = 1 / std of its latents.
 2. UNet (UNet2DConditionModel, 64/128 channels, cross-attention in both blocks, ~4.2 M parameters)
    and text encoder (CLIPTextModel, width 64, 2 layers, 16 positions) together, VAE frozen:
    epsilon prediction on SD's scaled-linear schedule, 10 % empty captions for classifier-free guidance.
 3. CLIP vision tower (--image-encoder, on the finished model), everything else frozen: its feature
    vector, repeated over the token positions as an image prompt uses it, must make the UNet draw the
    picture (the UNet's own noise-prediction loss).
The tokenizer is word-level in CLIP's BPE format: every word of the world is one token, anything
else falls back to single characters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import shapes
import torch
from bpe import tokenizer_files

from sdstream.models.notes import NOTES_FILE, model_notes

MAX_LENGTH = 16  # token positions
WIDTH = 64  # text encoder width = UNet cross-attention width
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
CHECKPOINT = "checkpoint/state.pt"
IMAGE_ENCODER_MARK, IMAGE_ENCODER_END = "<!-- image-encoder:start -->", "<!-- image-encoder:end -->"
WORLD_WORDS = ["a", "on", "background", *shapes.COLOURS, *shapes.SHAPES]


# ---- the parts ----------------------------------------------------------------------------------

def make_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(WORLD_WORDS)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    for word in WORLD_WORDS:
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))
    return tok


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=shapes.SIZE,
    )


def make_text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tok.get_vocab()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=WIDTH,
            intermediate_size=4 * WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shapes.SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_image_encoder():
    """The tiny CLIP vision tower: 32x32 in, 8x8 patches of 4 px, one WIDTH-wide feature vector out."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
        image_size=shapes.SIZE, patch_size=4, projection_dim=WIDTH,
    ))


def make_feature_extractor():
    try:
        from transformers import CLIPImageProcessorPil as Processor  # the PIL backend: no torchvision
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": shapes.SIZE}, crop_size={"height": shapes.SIZE, "width": shapes.SIZE})


def make_inference_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- training -----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        torch.manual_seed(args.seed)
        self.tok = make_tokenizer()
        self.vae, self.text_encoder, self.unet = make_vae(), make_text_encoder(self.tok), make_unet()
        self.scaling_factor = None
        self.data = np.random.default_rng([args.seed, 1])  # pictures and caption dropout
        self.gen = torch.Generator().manual_seed(args.seed + 2)  # noise, timesteps, posterior samples
        self.log: dict = {"vae": [], "unet": []}
        self.seconds = {"vae": 0.0, "unet": 0.0}
        self.unet_step = 0
        self.opt = self.lr = None
        self._ids: dict[str, torch.Tensor] = {}

    # -- checkpoints: everything needed to go on exactly where the run stopped
    def save_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "args": vars(self.args), "scaling_factor": self.scaling_factor, "unet_step": self.unet_step,
            "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "opt": self.opt.state_dict() if self.opt else None, "lr": self.lr.state_dict() if self.lr else None,
            "data": self.data.bit_generator.state, "gen": self.gen.get_state(),
            "log": self.log, "seconds": self.seconds,
        }
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    def load_checkpoint(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        changed = {k: (v, vars(self.args).get(k)) for k, v in state["args"].items()
                   if k not in ("out", "resume", "threads", "overwrite", "checkpoint_every", "log_every", "fp16", "src",
                                "unet_steps")  # a new length re-times the cosine decay from this step on
                   and vars(self.args).get(k) != v}
        if changed:
            sys.exit(f"--resume: settings differ from the checkpoint's (was, now): {changed}")
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.scaling_factor, self.unet_step = state["scaling_factor"], state["unet_step"]
        self.data.bit_generator.state = state["data"]
        self.gen.set_state(state["gen"])
        self.log, self.seconds = state["log"], state["seconds"]
        self._opt_state = (state["opt"], state["lr"])
        if state["args"]["unet_steps"] != self.args.unet_steps:
            self.log.setdefault("length_changes", []).append(
                {"at_step": self.unet_step, "was": state["args"]["unet_steps"], "now": self.args.unet_steps})
        print(f"resumed: VAE {'done' if self.scaling_factor else 'not done'}, UNet step {self.unet_step}", flush=True)
        return True

    # -- phase 1
    def train_vae(self) -> None:
        a = self.args
        vae = self.vae.train()
        opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr)
        started, window = time.perf_counter(), []
        for step in range(1, a.vae_steps + 1):
            x, _ = shapes.sample_batch(a.vae_batch, self.data)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=self.gen)).sample
            mse = torch.nn.functional.mse_loss(recon, x)
            kl = posterior.kl().mean()
            loss = mse + a.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append((mse.item(), kl.item()))
            if step % a.log_every == 0 or step == a.vae_steps:
                m, k = np.mean(window, axis=0)
                self.log["vae"].append({"step": step, "mse": round(float(m), 6), "kl": round(float(k), 2)})
                print(f"vae  {step:5d}/{a.vae_steps}  mse {m:.5f}  kl {k:8.1f}  {time.perf_counter() - started:7.1f} s",
                      flush=True)
                window = []
        vae.eval().requires_grad_(False)
        with torch.no_grad():  # scaling factor: unit variance latents, as SD's 0.18215 was chosen
            x, _ = shapes.sample_batch(max(256, a.vae_batch), self.data)
            latents = vae.encode(x).latent_dist.sample(generator=self.gen)
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        self.scaling_factor = float(1.0 / latents.std())
        self.vae_eval = {"latent_mean": round(float(latents.mean()), 4), "latent_std": round(float(latents.std()), 4),
                         "recon_mse": round(float(torch.nn.functional.mse_loss(recon, x)), 6)}
        self.log["vae_eval"] = self.vae_eval
        self.seconds["vae"] += time.perf_counter() - started
        print(f"vae  done: latents mean {self.vae_eval['latent_mean']} std {self.vae_eval['latent_std']}"
              f" -> scaling_factor {self.scaling_factor:.4f}; held-out recon mse {self.vae_eval['recon_mse']}",
              flush=True)

    # -- phase 2
    def ids(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self._ids:  # the same call encode_prompt makes
                self._ids[c] = self.tok(c, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                        return_tensors="pt").input_ids[0]
        return torch.stack([self._ids[c] for c in captions])

    def setup_unet_phase(self) -> None:
        from diffusers.optimization import get_cosine_schedule_with_warmup

        a = self.args
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=a.unet_lr, weight_decay=a.weight_decay)
        self.lr = get_cosine_schedule_with_warmup(self.opt, min(a.warmup, a.unet_steps // 10), a.unet_steps)
        if getattr(self, "_opt_state", (None, None))[0] is not None:
            self.opt.load_state_dict(self._opt_state[0])
            self.lr.load_state_dict(self._opt_state[1])

    def train_unet(self) -> None:
        from diffusers import DDPMScheduler

        a = self.args
        self.vae.eval().requires_grad_(False)
        noise_schedule = DDPMScheduler(**BETAS)
        self.setup_unet_phase()
        self.unet.train()
        self.text_encoder.train()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        started, window = time.perf_counter(), []
        while self.unet_step < a.unet_steps:
            self.unet_step += 1
            x, captions = shapes.sample_batch(a.unet_batch, self.data)
            drop = self.data.random(len(captions)) < a.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop)]
            with torch.no_grad():
                latents = self.vae.encode(x).latent_dist.sample(generator=self.gen) * self.scaling_factor
            noise = torch.randn(latents.shape, generator=self.gen)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(x),), generator=self.gen)
            noisy = noise_schedule.add_noise(latents, noise, t)
            context = self.text_encoder(self.ids(captions))[0]  # last_hidden_state, as encode_prompt uses
            pred = self.unet(noisy, t, encoder_hidden_states=context).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, a.clip)
            self.opt.step()
            self.lr.step()
            window.append(loss.item())
            s = self.unet_step
            if s % a.log_every == 0 or s == a.unet_steps:
                elapsed = self.seconds["unet"] + time.perf_counter() - started
                self.log["unet"].append({"step": s, "loss": round(float(np.mean(window)), 6),
                                         "lr": float(self.lr.get_last_lr()[0]), "seconds": round(elapsed, 1)})
                eta = elapsed / s * (a.unet_steps - s)
                print(f"unet {s:5d}/{a.unet_steps}  loss {np.mean(window):.5f}  lr {self.lr.get_last_lr()[0]:.2e}"
                      f"  {elapsed:7.1f} s  (eta {eta / 60:.1f} min)", flush=True)
                window = []
            if a.checkpoint_every and s % a.checkpoint_every == 0 and s < a.unet_steps:
                self.seconds["unet"] += time.perf_counter() - started
                started = time.perf_counter()
                self.save_checkpoint()
        self.seconds["unet"] += time.perf_counter() - started

    # -- output
    def save(self) -> None:
        from diffusers import StableDiffusionPipeline

        a = self.args
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        for m in (self.vae, self.unet, self.text_encoder):
            m.eval().requires_grad_(False)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tok, unet=self.unet,
            scheduler=make_inference_scheduler(), safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False,
        )
        self.log["weights_bytes"] = save_pipeline(pipe, self.out, a.fp16)

    def write_card(self, total_seconds: float) -> None:
        a = self.args
        import diffusers
        import transformers

        info = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "settings": {k: v for k, v in vars(a).items() if k not in ("out", "resume", "overwrite", "src")},
            "parameters": {"unet": n_params(self.unet), "vae": n_params(self.vae),
                           "text_encoder": n_params(self.text_encoder)},
            "scaling_factor": self.scaling_factor,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()} | {"total": round(total_seconds, 1)},
            "machine": {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "processor": platform.processor() or platform.machine()},
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "log": self.log,
        }
        (self.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
        p = info["parameters"]
        last = self.log["unet"][-1]["loss"] if self.log["unet"] else None
        vae_last = self.log["vae"][-1]["mse"] if self.log["vae"] else None
        held = ", ".join(f"{c} {s} on {b}" for c, s, b in shapes.HOLDOUT)
        card = f"""# tiny that draws: a toy Stable Diffusion trained on shapes

A real diffusers `StableDiffusionPipeline` folder, about {sum(p.values()) / 1e6:.1f} M parameters, trained from scratch
on a CPU by `tools/train_tiny.py` of sdstream on a synthetic world (`tools/shapes.py`). It draws 32x32 pictures of
one flat shape on a flat background from captions like **"a red circle on a blue background"**. A toy for tests
and demos: it knows nothing outside that world.

    sdstream generate --model {self.out.name} -p "a red circle on a blue background" --steps 25 --guidance 5

## Data

Rendered on the fly, seeded (`tools/shapes.py`): one shape (circle, square, triangle) in one of six colours
(red, green, blue, yellow, white, black) on a background of another colour, side {shapes.MIN_SIDE}-{shapes.MAX_SIDE} px at a
random position ({shapes.MARGIN} px from the border), drawn {shapes.SUPERSAMPLE}x supersampled. Caption: `a <colour> <shape> on a <colour> background`.
90 combinations; {len(shapes.HOLDOUT)} are held out of training for the evaluation ({held}).
{a.caption_dropout:.0%} of training captions are replaced by the empty caption (classifier-free guidance).

## Model

| part | what | parameters |
|---|---|---|
| VAE | AutoencoderKL, channels 32/64, 4 latent channels, 32x32 -> 16x16, scaling_factor {self.scaling_factor:.4f} (1 / std of its latents) | {p['vae']:,} |
| text encoder | CLIPTextModel, width {WIDTH}, 2 layers, 4 heads, {MAX_LENGTH} positions; word-level CLIP BPE tokenizer (each word of the world is one token, other text falls back to characters) | {p['text_encoder']:,} |
| UNet | UNet2DConditionModel, channels 64/128, CrossAttnDownBlock2D x2 / CrossAttnUpBlock2D x2, 1 layer per block, cross-attention width {WIDTH} | {p['unet']:,} |
| scheduler | DDIM, SD's scaled-linear betas 0.00085-0.012 over 1000 steps, epsilon prediction | |

Weights: safetensors, {'fp16' if a.fp16 else 'fp32'}, {self.log['weights_bytes'] / 2**20:.1f} MiB.

## Training

Seed {a.seed}; CPU, {torch.get_num_threads()} thread(s); {info['seconds']['total'] / 60:.1f} min in all
(VAE {self.seconds['vae'] / 60:.1f} min, UNet + text encoder {self.seconds['unet'] / 60:.1f} min).
torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}.

1. VAE: {a.vae_steps} steps, batch {a.vae_batch}, AdamW {a.vae_lr:g}, loss MSE + {a.kl_weight:g} KL; final MSE {vae_last}.
2. UNet and text encoder together, VAE frozen: {a.unet_steps} steps, batch {a.unet_batch}, AdamW {a.unet_lr:g}
   (weight decay {a.weight_decay:g}), {min(a.warmup, a.unet_steps // 10)} warm-up steps then cosine decay, gradient
   clipping {a.clip:g}; noise-prediction MSE on DDPM's schedule (same betas); final loss {last}.

3. {IMAGE_ENCODER_MARK}
Image encoder not trained yet: `python tools/train_tiny.py --out DIR --image-encoder`.
{IMAGE_ENCODER_END}

Reproduce: `python tools/{info['command']}` (same seed and thread count: same weights).
The full loss log is in `training.json`.

## Evaluation

<!-- eval:start -->
Not evaluated yet: run `python tools/eval_tiny.py --model DIR`.
<!-- eval:end -->
"""  # noqa: E501 (markdown table rows are one line each)
        (self.out / "README.md").write_text(card)


def train_image_encoder(a) -> None:
    """Phase 3, on the finished model in OUT: a tiny CLIP vision tower whose image features, repeated over
    the 16 token positions as sdstream's image prompt uses them, make the frozen UNet draw the picture.
    Loss: the UNet's noise-prediction MSE with that repeated vector as its encoder states; only the vision
    tower learns. Writes image_encoder/ and feature_extractor/ into OUT and a paragraph into its card,
    and the `--preview approx` colours of its VAE into OUT/sdstream.json."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup

    out = Path(a.out)
    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    for m in (pipe.vae, pipe.unet, pipe.text_encoder):
        m.eval().requires_grad_(False)
    torch.manual_seed(a.seed + 3)
    encoder, processor = pipe.image_encoder or make_image_encoder(), make_feature_extractor()  # go on from one
    joint = a.vision_unet_lr > 0  # the UNet learns too: half of each batch keeps its text captions
    if joint:
        pipe.unet.train().requires_grad_(True)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    data = np.random.default_rng([a.seed, 3])
    gen = torch.Generator().manual_seed(a.seed + 4)
    noise_schedule = DDPMScheduler(**BETAS)
    groups = [{"params": list(encoder.parameters()), "lr": a.vision_lr}]
    if joint:
        groups.append({"params": list(pipe.unet.parameters()), "lr": a.vision_unet_lr})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=a.weight_decay)
    lr = get_cosine_schedule_with_warmup(opt, min(a.warmup, a.vision_steps // 10), a.vision_steps)
    scaling = pipe.vae.config.scaling_factor
    log, window, started = [], [], time.perf_counter()
    encoder.train()
    for step in range(1, a.vision_steps + 1):
        x, captions = shapes.sample_batch(a.vision_batch, data)
        with torch.no_grad():
            latents = pipe.vae.encode(x).latent_dist.sample(generator=gen) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(x),), generator=gen)
        pixels = ((x + 1) / 2 - mean) / std  # what the feature extractor makes of the same picture
        features = encoder(pixel_values=pixels).image_embeds  # [B, WIDTH]
        context = features[:, None, :].expand(-1, MAX_LENGTH, -1)
        if joint:  # the first half by caption (10 % empty, as in phase 2), the second half by picture
            half = len(x) // 2
            drop = data.random(half) < a.caption_dropout
            ids = pipe.tokenizer(["" if d else c for c, d in zip(captions[:half], drop)], padding="max_length",
                                 max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                text = pipe.text_encoder(ids)[0]
            context = torch.cat([text, context[half:]])
        pred = pipe.unet(noise_schedule.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
        lr.step()
        window.append(loss.item())
        if step % a.log_every == 0 or step == a.vision_steps:
            elapsed = time.perf_counter() - started
            log.append({"step": step, "loss": round(float(np.mean(window)), 6), "seconds": round(elapsed, 1)})
            print(f"image encoder {step:5d}/{a.vision_steps}  loss {np.mean(window):.5f}  {elapsed:7.1f} s", flush=True)
            window = []
    seconds = time.perf_counter() - started
    encoder.eval().requires_grad_(False)
    pipe.unet.eval().requires_grad_(False)
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    size = save_pipeline(pipe, out, fp16=False)
    _standard_processor_name(out / "model_index.json")
    # its linear colours are rough and a VAE decode of 32x32 costs next to nothing: frames default to the VAE
    write_notes(out, latent_rgb=fit_latent_rgb(pipe.vae, scaling, data), preview="vae")
    record = out / "training.json"
    info = json.loads(record.read_text()) if record.is_file() else {}
    info["image_encoder"] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                             "parameters": n_params(encoder), "seconds": round(seconds, 1), "log": log}
    record.write_text(json.dumps(info, indent=1) + "\n")
    how = (f"with the UNet fine-tuned at AdamW {a.vision_unet_lr:g}, half of each batch still by caption" if joint
           else "everything else frozen")
    section = (f"Image prompts: a CLIPVisionModelWithProjection (width {WIDTH}, 2 layers, 4x4-px patches, "
               f"{n_params(encoder):,} parameters) trained afterwards ({how}), so that its image "
               f"features repeated over the {MAX_LENGTH} token positions (sdstream's image prompt) make the UNet "
               f"draw the picture: {a.vision_steps} steps, batch {a.vision_batch}, AdamW {a.vision_lr:g}, "
               f"noise-prediction MSE through the UNet; final loss {log[-1]['loss']}, "
               f"{seconds / 60:.1f} min. Weights now {size / 2**20:.1f} MiB.")
    card = out / "README.md"
    if card.is_file():
        text = card.read_text()
        weights = rf"Weights: safetensors, \1, {size / 2**20:.1f} MiB."
        text = re.sub(r"Weights: safetensors, (\S+), [0-9.]+ MiB\.", weights, text)
        head, mark, rest = text.partition(IMAGE_ENCODER_MARK)
        if mark and IMAGE_ENCODER_END in rest:
            text = f"{head}{mark}\n{section}\n{IMAGE_ENCODER_END}{rest.split(IMAGE_ENCODER_END, 1)[1]}"
        else:
            text = f"{text.rstrip()}\n\n{section}\n"
        card.write_text(text)


def _standard_processor_name(index: Path) -> None:
    """The PIL variant of CLIPImageProcessor is saved under its own class name; record the standard name,
    as every Stable Diffusion folder does, so any version of transformers loads the folder."""
    parts = json.loads(index.read_text())
    if parts.get("feature_extractor", [None, None])[1] == "CLIPImageProcessorPil":
        parts["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        index.write_text(json.dumps(parts, indent=2, sort_keys=True) + "\n")


def save_pipeline(pipe, out: Path, fp16: bool) -> int:
    """Write PIPE as a diffusers folder (safetensors, fp16 if asked); returns the bytes of weights."""
    if fp16:
        from diffusers.utils import logging

        level = logging.get_verbosity()
        logging.set_verbosity_error()  # "modules that should be kept in float32: []" -- there are none
        try:
            pipe.to(torch.float16)
        finally:
            logging.set_verbosity(level)
    pipe.save_pretrained(out, safe_serialization=True)
    _slow_tokenizer_files(out / "tokenizer")
    _normal_permissions(out)
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    print(f"saved {out} ({size / 2**20:.1f} MiB of weights, {'fp16' if fp16 else 'fp32'})", flush=True)
    return size


def convert(src: Path, out: Path, fp16: bool) -> None:
    """Copy a trained folder with its weights cast to fp16 (or fp32): tensors and configs, nothing else changes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "model_index.json").exists():
        sys.exit(f"{out} already holds a model; remove it first")
    dtype = torch.float16 if fp16 else torch.float32
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint"))
    for f in out.rglob("*.safetensors"):
        with safe_open(f, "pt") as weights:
            metadata = weights.metadata()
            tensors = {k: weights.get_tensor(k) for k in weights.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, f, metadata=metadata)
    config = out / "text_encoder" / "config.json"  # transformers records the dtype; diffusers' configs do not
    if config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _normal_permissions(out)
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    card = out / "README.md"
    if card.is_file():  # the weights line; the evaluation stays the source's until eval_tiny runs on OUT
        card.write_text(re.sub(r"Weights: safetensors, \S+, [0-9.]+ MiB\.",
                               f"Weights: safetensors, {'fp16' if fp16 else 'fp32'}, {size / 2**20:.1f} MiB.",
                               card.read_text()))
    print(f"saved {out} ({size / 2**20:.1f} MiB of weights, {'fp16' if fp16 else 'fp32'})", flush=True)


def _slow_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt, as every Stable Diffusion folder has them: transformers 5 saves only
    tokenizer.json, which transformers 4's (slow) CLIPTokenizer cannot read."""
    vocab, merges = tokenizer_files(WORLD_WORDS)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_notes(folder.parent, vocabulary=WORLD_WORDS)  # sdstream refuses other words


def write_notes(out: Path, **notes) -> None:
    """Merge NOTES into OUT/sdstream.json: what sdstream needs to know that diffusers' configs don't say."""
    (out / NOTES_FILE).write_text(json.dumps({**model_notes(out), **notes}, indent=1) + "\n")


def fit_latent_rgb(vae, scaling: float, data: np.random.Generator, n: int = 512) -> dict:
    """Least-squares linear map (with bias) from latents as the UNet sees them to the picture's RGB in
    [-1, 1] at latent resolution: the `--preview approx` factors for this VAE."""
    with torch.no_grad():
        x, _ = shapes.sample_batch(n, data)
        latents = vae.encode(x).latent_dist.mode() * scaling  # [N, 4, 16, 16]
        target = torch.nn.functional.avg_pool2d(x, 2)  # [N, 3, 16, 16]
    a = torch.cat([latents, torch.ones_like(latents[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, 5).double()
    b = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(a, b).solution  # [5, 3]
    error = float((a @ solution - b).abs().mean())
    print(f"latent -> RGB preview factors: mean abs error {error:.3f} (of a -1..1 range)", flush=True)
    return {"weights": [[round(float(v), 4) for v in row] for row in solution[:4]],
            "bias": [round(float(v), 4) for v in solution[4]], "mean_abs_error": round(error, 4)}


def _normal_permissions(out: Path) -> None:
    """safetensors writes 0600; a model folder to ship wants the permissions of any other file."""
    mask = os.umask(0)
    os.umask(mask)
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~mask)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="output folder (a diffusers StableDiffusionPipeline folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=shapes.default_threads(),
                    help="torch threads (default: $OMP_NUM_THREADS if set, else every core)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, help="batch size of both phases (default: --vae-batch / --unet-batch)")
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--image-encoder", action="store_true",
                    help="phase 3 only: train the CLIP vision tower of the model already in OUT (for image prompts)")
    ap.add_argument("--vision-steps", type=int, default=400)
    ap.add_argument("--vision-batch", type=int, default=32)
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--vision-unet-lr", type=float, default=0.0,
                    help="phase 3: also fine-tune the UNet at this lr, half of each batch by caption (0: UNet frozen)")
    ap.add_argument("--fp16", action="store_true", help="save the weights in fp16 (half the size)")
    ap.add_argument("--from", dest="src", type=Path,
                    help="no training: re-save this trained folder into OUT (with --fp16: an fp16 copy)")
    ap.add_argument("--checkpoint-every", type=int, default=250, help="UNet steps between checkpoints (0: none)")
    ap.add_argument("--resume", action="store_true", help="go on from OUT/checkpoint/ if it is there")
    ap.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    ap.add_argument("--log-every", type=int, help="steps between loss lines (default: 50, fewer for short runs)")
    a = ap.parse_args(argv)
    if a.batch:
        a.vae_batch = a.unet_batch = a.batch
    if a.log_every is None:
        a.log_every = max(1, min(50, min(a.vae_steps, a.unet_steps, a.vision_steps) // 10 or 1))
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.src:
        convert(a.src, out, a.fp16)
        return
    if a.image_encoder:
        train_image_encoder(a)
        return
    if (out / "model_index.json").exists() and not a.overwrite:
        sys.exit(f"{out} already holds a model; give --overwrite to replace it")
    if (out / CHECKPOINT).exists() and not a.resume:
        sys.exit(f"{out / CHECKPOINT} exists: give --resume to go on from it, or remove it")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = Trainer(a)
    if a.resume:
        trainer.load_checkpoint()
    before = sum(trainer.seconds.values())
    print(f"threads {torch.get_num_threads()}; parameters: unet {n_params(trainer.unet):,}, "
          f"vae {n_params(trainer.vae):,}, text encoder {n_params(trainer.text_encoder):,}", flush=True)
    if trainer.scaling_factor is None:
        trainer.train_vae()
        if a.checkpoint_every:
            trainer.save_checkpoint()
    trainer.train_unet()
    trainer.save()
    trainer.write_card(before + time.perf_counter() - t0)
    if a.checkpoint_every:  # kept, so that a longer --unet-steps can go on from here with --resume
        trainer.save_checkpoint()
    minutes = (time.perf_counter() - t0) / 60
    print(f"done in {minutes:.1f} min; now: python tools/eval_tiny.py --model {out}", flush=True)


if __name__ == "__main__":
    main()
