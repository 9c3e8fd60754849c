#!/usr/bin/env bash
# All nine noise masks at the same step, same seed: one run without a mask (line 1, the
# baseline), then one per mask. `compare` puts each next to the baseline, step by step.
#
#   examples/mask_sweep.sh "a yellow circle on a blue background"
#   MODEL=sd15 STEPS=30 STEP=9 examples/mask_sweep.sh "a fox in snow"
set -euo pipefail

MODEL=${MODEL:-tiny}
STEPS=${STEPS:-20}
STEP=${STEP:-$(( STEPS * 3 / 10 + 1 ))}   # the step at which noise goes in (30% into the run)
SEED=${SEED:-1}
PROMPT=${1:-"a red circle on a blue background"}
OUT=${OUT:-outputs/mask-sweep}
MASKS="circle square edges corners left-half right-half top-half bottom-half checkerboard"

{
  echo '{"mask": null}'
  for mask in $MASKS; do
    printf '{"mask": "%s", "inject_at_step": %d}\n' "$mask" "$STEP"
  done
} | sdstream batch - --model "$MODEL" --steps "$STEPS" --seed "$SEED" --prompt "$PROMPT" --out "$OUT"

# Line N+1 used the N-th mask of $MASKS; run.json says which ("request": {"mask": ...}).
sdstream compare "$OUT"/0*/ --out "$OUT/compare" --overwrite
