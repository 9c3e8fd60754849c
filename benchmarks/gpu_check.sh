#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine from the repo root (results under $OUT):
# the CUDA path on tiny (fp16/bf16, every preview, frames written, no NaN), the benchmark at SD 1.5 size with a
# profile, and the SDXL row: about 8 minutes on an H100 (BUDGET seconds in all, BENCH_SECONDS of them for SD 1.5).
# Needs diffusers (and importlib_metadata) as wheels in .whl/ where the machine lacks them.
set -u
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

check() {  # a run folder: complete, on CUDA in the expected dtype, every frame there, a final image that is not black
  python3 - "$@" <<'PY'
import json, sys
from pathlib import Path
from PIL import Image
run, dtype, frames = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
m = json.loads((run / "run.json").read_text())
files = [run / f["file"] for f in m["frames"]]
lo, hi = Image.open(run / "final.png").convert("L").getextrema()
ok = (m["status"] == "complete" and m["device"].startswith("cuda") and m["dtype"] == dtype
      and len(files) == frames and all(f.is_file() for f in files) and hi > lo)
print("OK  " if ok else "FAIL", run.name, m["status"], m["device"], m["dtype"], len(files), "frames",
      "final range", (lo, hi), "recoveries", m["recoveries"], "steps/s", round(len(m["timings"]["steps"]) / sum(m["timings"]["steps"]), 1))
PY
}
i=0
for args in "--preview approx --mask circle --inject-at-step 6" "--preview vae --scheduler euler-a"; do
  i=$((i+1))
  python3 -m sdstream generate -m tiny -p "a red circle" --seed 1 --steps 20 --quiet $args -o /tmp/run$i || echo "FAIL generate $args"
  check /tmp/run$i fp16 20 | tee -a "$OUT/cuda_path.txt"
done
python3 -m sdstream generate -m tiny --seed 1 --steps 12 --dtype bf16 --gif --quiet -o /tmp/runbf16 && check /tmp/runbf16 bf16 12 | tee -a "$OUT/cuda_path.txt"
# --compile (CUDA graphs) unguided with PNDM, which keeps the UNet's outputs: same picture as eager; PNDM runs 12 steps as 13
for c in "" "--compile"; do
  python3 -m sdstream generate -m tiny -p "a red circle" --seed 2 --steps 12 --guidance 1 --scheduler pndm --quiet $c -o /tmp/runpndm$c || echo "FAIL generate $c"
done
check /tmp/runpndm--compile fp16 13 | tee -a "$OUT/cuda_path.txt"
python3 -c "
import numpy as np; from PIL import Image
a, b = (np.asarray(Image.open(f'/tmp/runpndm{c}/final.png'), dtype=float) for c in ('', '--compile'))
d = np.abs(a - b).mean(); print('OK  ' if d < 2 else 'FAIL', 'compiled vs eager final.png mean abs diff', round(d, 3))" | tee -a "$OUT/cuda_path.txt"
python3 -m sdstream diagnostics --check --json > "$OUT/diagnostics.json" || echo "FAIL diagnostics --check"
echo "tiny checks done at $SECONDS s"
# The benchmark at SD 1.5 size, every variant, and a profile of 3 steps of diffusers and of sdstream (bench.txt,
# profile.txt and two chrome traces); then the SDXL row (sdxl.txt) in what is left of BUDGET seconds. Each prints
# its table after every round, so a timeout still leaves numbers. 8 files in $OUT, the most that come back.
quiet() { grep -v -e '^\[transformers\]' -e 'Writing model shards' -e 'SyncActivityProfilerHandler'; }
timeout "${BENCH_SECONDS:-270}" python3 benchmarks/bench.py --full-size --repeats "${REPEATS:-3}" --compile \
  --trajectory --taesd-random --profile "$OUT/profile.txt" 2>&1 | quiet | tee "$OUT/bench.txt"
echo "SD 1.5 benchmark done at $SECONDS s"
left=$(( ${BUDGET:-470} - SECONDS ))
if [ "$left" -ge 60 ]; then
  timeout "$left" python3 benchmarks/bench.py --sdxl --repeats "${SDXL_REPEATS:-2}" 2>&1 | quiet | tee "$OUT/sdxl.txt"
else
  echo "SKIP SDXL: $left s left of the ${BUDGET:-470} s budget" | tee "$OUT/sdxl.txt"
fi
echo "all done at $SECONDS s"
