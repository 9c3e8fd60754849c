#!/usr/bin/env bash
# img2img at several strengths from one start picture. The picture is $INIT if you give one,
# else a small test card drawn here with Pillow (a red circle on blue, which tiny can draw).
#
#   examples/strength_sweep.sh "a white triangle on a black background"
#   INIT=photo.jpg MODEL=sd15 STRENGTHS="0.3 0.5 0.7 0.9" examples/strength_sweep.sh "an oil painting"
#
# diffusers' arithmetic: int(STEPS x strength) steps are re-run, so keep STEPS x the smallest
# strength at 1 or more. img2img keeps the picture's size.
set -euo pipefail

MODEL=${MODEL:-tiny}
STEPS=${STEPS:-20}
STRENGTHS=${STRENGTHS:-"0.25 0.5 0.75 1.0"}
SEED=${SEED:-1}
PROMPT=${1:-"a white triangle on a black background"}
OUT=${OUT:-outputs/strength-sweep}
INIT=${INIT:-}

if [ -z "$INIT" ]; then
  mkdir -p "$OUT"
  INIT="$OUT/init.png"
  python - "$INIT" <<'PY'
import sys
from PIL import Image, ImageDraw

card = Image.new("RGB", (64, 64), (40, 60, 200))
ImageDraw.Draw(card).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
card.save(sys.argv[1])
PY
fi

for strength in $STRENGTHS; do
  printf '{"strength": %s}\n' "$strength"
done | sdstream batch - --model "$MODEL" --steps "$STEPS" --seed "$SEED" --prompt "$PROMPT" \
  --init-image "$INIT" --out "$OUT/runs"

# The final images side by side, one column per strength.
sdstream grid "$OUT/runs" --out "$OUT/grid.png" --overwrite
