#!/usr/bin/env bash
# One prompt, several seeds: a JSON Lines file made on the fly and run by `sdstream batch`.
# Every line sets only its seed; the prompt and the rest are command-line defaults.
#
#   examples/seed_sweep.sh "a yellow circle on a blue background"   # on tiny, unless MODEL says otherwise
#   MODEL=sd15 STEPS=30 SEEDS="1 2 3 4 5 6 7 8" examples/seed_sweep.sh "a fox in snow"
#
# Rerunning the same command skips the runs that are already complete in $OUT.
set -euo pipefail

MODEL=${MODEL:-tiny}
STEPS=${STEPS:-20}
SEEDS=${SEEDS:-"1 2 3 4"}
PROMPT=${1:-"a red circle on a blue background"}
OUT=${OUT:-outputs/seed-sweep}

for seed in $SEEDS; do
  printf '{"seed": %d}\n' "$seed"
done | sdstream batch - --model "$MODEL" --steps "$STEPS" --prompt "$PROMPT" --out "$OUT"

# A contact sheet per run: the same steps of every seed, side by side with `compare`.
sdstream compare "$OUT"/0*/ --out "$OUT/compare" --overwrite
