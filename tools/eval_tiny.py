"""Evaluate a trained tiny (tools/train_tiny.py) on the held-out split of tools/shapes.py.

Each evaluation case (caption, seed) is generated through sdstream's orchestrator (sdstream.generate:
exactly what `sdstream generate` runs, without the files), by default 25 DDIM
steps at guidance 5, and read back by shapes.classify() from pixel statistics alone: background,
shape colour, shape type. Accuracies are printed, for all cases and for the combinations held out of
training, and written into the model card (DIR/README.md, between its eval markers).

    python tools/eval_tiny.py --model DIR                  # all 180 cases
    python tools/eval_tiny.py --model DIR --limit 30 --sheet /tmp/sheet.png
    python tools/eval_tiny.py --model DIR --check          # exit 1 when a target is missed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes

TARGETS = {"background": 0.95, "colour": 0.90, "shape": 0.75}  # at 25 steps, guidance 5
LABELS = {"background": "backgrounds", "colour": "shape colours", "shape": "shape types", "all": "all three"}
MARKS = {False: "eval", True: "eval-image-prompts"}  # the card's section for captions, for image prompts


def generate(model: str, caption: str, seed: int, steps: int, guidance: float, scheduler: str, dtype: str,
             prompt_image: str | None = None):
    """One picture through sdstream's orchestrator, as `sdstream generate` (or `image-prompt`) makes it."""
    import sdstream
    from sdstream import GenerationRequest

    return sdstream.generate(GenerationRequest(
        model=model, prompt="" if prompt_image else caption, prompt_image=prompt_image, steps=steps, guidance=guidance,
        seed=seed, scheduler=scheduler, preview="none", device="cpu", dtype=dtype))


def score(rows: list[dict]) -> dict:
    n = len(rows)
    acc = {k: sum(r[k + "_ok"] for r in rows) / n for k in TARGETS} if n else {k: None for k in TARGETS}
    acc["all"] = sum(all(r[k + "_ok"] for k in TARGETS) for r in rows) / n if n else None
    return {"n": n, **acc}


def card_section(result: dict) -> str:
    a = result["settings"]
    prompted = ("**Image prompts**: each case prompted with its rendered ground-truth picture (`sdstream image-prompt`,"
                " empty text) instead of its caption. " if a["image_prompts"] else "")
    lines = [
        prompted + f"Held-out split of `tools/shapes.py`: {result['all']['n']} (caption, seed) cases"
        + (f" (the first {a['limit']})" if a["limit"] else "")
        + f", generated with sdstream: {a['steps']} {a['scheduler'].upper()} steps, guidance {a['guidance']:g},"
        f" {a['dtype']}, CPU. Each picture is read back from pixel statistics (`shapes.classify`: border"
        " median -> background, pixels off the background -> shape colour, share of its bounding box -> shape type;"
        " it reads rendered ground truth back 100 %).",
        "",
        "| accuracy | all cases | combinations held out of training | target |",
        "|---|---|---|---|",
    ]
    for k in (*TARGETS, "all"):
        held = result["held_out"][k]
        lines.append(f"| {LABELS[k]} | {result['all'][k]:.1%} | "
                     f"{'-' if held is None else f'{held:.1%}'} | {f'>= {TARGETS[k]:.0%}' if k in TARGETS else ''} |")
    flags = (f" --limit {a['limit']}" if a["limit"] else "") + (" --image-prompts" if a["image_prompts"] else "")
    command = f"python tools/eval_tiny.py --model DIR{flags}"
    done = f"Evaluated {result['created']} in {result['seconds']:.0f} s by `{command}`."
    lines += ["", done]
    return "\n".join(lines)


def write_card(model: Path, section: str, image_prompts: bool) -> None:
    start, end = f"<!-- {MARKS[image_prompts]}:start -->", f"<!-- {MARKS[image_prompts]}:end -->"
    card = model / "README.md"
    text = card.read_text() if card.is_file() else "# tiny that draws\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + start + "\n" + section + "\n" + end + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{start}\n{section}\n{end}\n"
    card.write_text(text)


def contact_sheet(pictures, rows: list[dict], path: Path, columns: int = 12, scale: int = 3) -> None:
    """Generated pictures in a grid; the frame is green when all three were read back right, red otherwise."""
    from PIL import Image

    cell = shapes.SIZE * scale + 4
    n = len(pictures)
    sheet = Image.new("RGB", (columns * cell, ((n + columns - 1) // columns) * cell), (128, 128, 128))
    for i, (pic, row) in enumerate(zip(pictures, rows)):
        ok = all(row[k + "_ok"] for k in TARGETS)
        frame = Image.new("RGB", (cell, cell), (0, 160, 0) if ok else (200, 0, 0))
        frame.paste(pic.resize((cell - 4, cell - 4), Image.Resampling.NEAREST), (2, 2))
        sheet.paste(frame, ((i % columns) * cell, (i // columns) * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the trained model folder")
    ap.add_argument("--limit", type=int, help="only the first N cases (they cover many combinations)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--threads", type=int, default=shapes.default_threads(),
                    help="torch threads (default: $OMP_NUM_THREADS if set, else every core)")
    ap.add_argument("--image-prompts", action="store_true",
                    help="prompt with the rendered picture of each case (image-prompt) instead of its caption")
    ap.add_argument("--sheet", type=Path, help="also save the generated pictures as one PNG")
    ap.add_argument("--json", type=Path, help="also save every case and the accuracies as JSON")
    ap.add_argument("--no-card", action="store_true", help="do not write the accuracies into DIR/README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when an accuracy misses its target")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    a = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(a.threads)
    import sdstream

    model = Path(a.model).resolve()
    sdstream.load(str(model), device="cpu", dtype=a.dtype)  # once, before the clock starts
    cases = shapes.EVAL_CASES[: a.limit] if a.limit else shapes.EVAL_CASES
    held = set(shapes.HOLDOUT)
    rows, pictures = [], []
    started = time.perf_counter()
    truths = Path(tempfile.mkdtemp(prefix="eval-tiny-"))  # image prompts: the rendered ground truth as a PNG
    for i, case in enumerate(cases, 1):
        colour, shape, background, seed = case
        text = shapes.caption(colour, shape, background)
        prompt_image = None
        if a.image_prompts:
            prompt_image = str(truths / f"{i}.png")
            shapes.eval_truth(case).save(prompt_image)
        picture = generate(str(model), text, seed, a.steps, a.guidance, a.scheduler, a.dtype, prompt_image)
        got = shapes.classify(picture)
        row = {"caption": text, "seed": seed, "held_out": (colour, shape, background) in held,
               "background": got["background"], "colour": got["colour"], "shape": got["shape"], "fill": got["fill"],
               "background_ok": got["background"] == background, "colour_ok": got["colour"] == colour,
               "shape_ok": got["shape"] == shape}
        rows.append(row)
        pictures.append(picture)
        if a.verbose:
            marks = "".join("." if row[k + "_ok"] else "x" for k in TARGETS)
            print(f"{i:4d} {marks} {text!r:45} seed {seed}: read {got['colour']} {got['shape']} (fill {got['fill']})"
                  f" on {got['background']}", flush=True)
        elif i % 20 == 0:
            print(f"  {i}/{len(cases)} ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(truths, ignore_errors=True)

    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model),
        "settings": {"steps": a.steps, "guidance": a.guidance, "scheduler": a.scheduler, "dtype": a.dtype,
                     "limit": a.limit, "image_prompts": a.image_prompts},
        "seconds": round(seconds, 1),
        "all": score(rows),
        "held_out": score([r for r in rows if r["held_out"]]),
        "seen": score([r for r in rows if not r["held_out"]]),
    }
    print(f"{len(rows)} cases, {a.steps} steps, guidance {a.guidance:g}, {seconds:.0f} s "
          f"({result['held_out']['n']} of them from combinations held out of training)")
    missed = []
    for k in (*TARGETS, "all"):
        h = result["held_out"][k]
        target = TARGETS.get(k)
        verdict = "" if target is None else ("  ok" if result["all"][k] >= target else f"  MISSES {target:.0%}")
        if target is not None and result["all"][k] < target:
            missed.append(k)
        print(f"  {LABELS[k]:14} {result['all'][k]:7.1%}   held out {'-' if h is None else f'{h:.1%}':>6}{verdict}")
    if not a.no_card:
        write_card(model, card_section(result), a.image_prompts)
        print(f"accuracies written into {model / 'README.md'}")
    if a.json:
        a.json.write_text(json.dumps({**result, "cases": rows}, indent=1) + "\n")
    if a.sheet:
        contact_sheet(pictures, rows, a.sheet)
        print(f"pictures: {a.sheet}")
    return 1 if a.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
