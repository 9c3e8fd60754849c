#!/usr/bin/env bash
# img2img at several strengths from one start picture. The picture is $INIT if you give one,
# else a small test card drawn here with Pillow.
#
#   examples/strength_sweep.sh "a watercolour landscape"
#   INIT=photo.jpg MODEL=sd15 STRENGTHS="0.3 0.5 0.7 0.9" examples/strength_sweep.sh "an oil painting"
#
# diffusers' arithmetic: int(STEPS x strength) steps are re-run, so keep STEPS x the smallest
# strength at 1 or more.
set -euo pipefail

MODEL=${MODEL:-tiny}
STEPS=${STEPS:-20}
STRENGTHS=${STRENGTHS:-"0.2 0.4 0.6 0.8 1.0"}
SEED=${SEED:-1}
PROMPT=${1:-"a red circle on a blue background"}
OUT=${OUT:-outputs/strength-sweep}
INIT=${INIT:-}

if [ -z "$INIT" ]; then
  mkdir -p "$OUT"
  INIT="$OUT/init.png"
  python - "$INIT" <<'PY'
import sys
from PIL import Image, ImageDraw

card = Image.new("RGB", (512, 512), (40, 60, 160))
draw = ImageDraw.Draw(card)
draw.ellipse((128, 128, 384, 384), fill=(220, 40, 40))
draw.rectangle((0, 448, 512, 512), fill=(40, 160, 60))
card.save(sys.argv[1])
PY
fi

for strength in $STRENGTHS; do
  printf '{"strength": %s}\n' "$strength"
done | sdstream batch - --model "$MODEL" --steps "$STEPS" --seed "$SEED" --prompt "$PROMPT" \
  --init-image "$INIT" --out "$OUT"
