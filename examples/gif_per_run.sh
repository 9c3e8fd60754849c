#!/usr/bin/env bash
# A prompt file in, an animation of the denoising per prompt out: plain-text batch with --gif.
# Each run folder gets frames/, final.png, run.json and animation.gif.
#
#   examples/gif_per_run.sh prompts.txt            # one prompt per line, # comments allowed
#   MODEL=sd15 STEPS=30 examples/gif_per_run.sh prompts.txt
set -euo pipefail

MODEL=${MODEL:-tiny}
STEPS=${STEPS:-20}
OUT=${OUT:-outputs/gif-per-run}
PROMPTS=${1:-}

if [ -z "$PROMPTS" ]; then   # no file given: three prompts on stdin
  printf '%s\n' "# three prompts" "a red circle on a blue background" "a white triangle on a black background" "a green square on a red background" |
    sdstream batch - --model "$MODEL" --steps "$STEPS" --gif --out "$OUT"
else
  sdstream batch "$PROMPTS" --model "$MODEL" --steps "$STEPS" --gif --out "$OUT"
fi
ls "$OUT"/*/animation.gif
