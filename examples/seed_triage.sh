#!/usr/bin/env bash
# Seed triage: many seeds, each run only to an early step; look at what x0 already shows there; finish the best.
#
#   examples/seed_triage.sh "a yellow circle on a blue background"            # tiny: 8 seeds, stopped at 6 of 20
#   KEEP="3 5" examples/seed_triage.sh "a yellow circle on a blue background"  # then finish the 3rd and 5th seeds
#   MODEL=sd15 STEPS=30 STOP=8 SEEDS="$(seq 1 16)" examples/seed_triage.sh "a fox in snow"
#
# Every run stops at step $STOP with its state kept (run.json says "stopped"), and a grid of their step-$STOP
# frames (x0: what each seed is becoming) is written to $OUT/triage.png. Running the same command again redoes
# nothing; KEEP lists the seeds to finish, by their place in $SEEDS, and `sdstream resume` finishes each from the
# state it kept: the same pixels as a run that never stopped.
set -euo pipefail

MODEL=${MODEL:-tiny}
STEPS=${STEPS:-20}
STOP=${STOP:-6}
SEEDS=${SEEDS:-"1 2 3 4 5 6 7 8"}
KEEP=${KEEP:-}
PROMPT=${1:-"a red circle on a blue background"}
OUT=${OUT:-outputs/seed-triage}

for seed in $SEEDS; do
  printf '{"seed": %d}\n' "$seed"
done | sdstream batch - --model "$MODEL" --steps "$STEPS" --prompt "$PROMPT" --stop-at-step "$STOP" --out "$OUT"

sdstream grid "$OUT" --x seed --step "$STOP" --out "$OUT/triage.png" --overwrite

for place in $KEEP; do
  runs=("$OUT"/"$(printf '%04d' "$place")"-*/)
  sdstream resume "${runs[0]}"
done
