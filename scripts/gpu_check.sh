#!/usr/bin/env bash
# The project's one prepared GPU check, run on a lent CUDA machine from the repository root with the
# wheels of gymnasium, ale-py and tyro in .whl/: the DrQ bench (eager vs CUDA-graph update, loop
# rate, batched updates of 1/8/32/128 runs), a batched DrQ run of 8 seeds in one process, full-length
# DrQ(eps) runs of two games at once with the defaults, then a short BBF run. Every figure lands in
# $OUT: device.txt, bench_drq.txt, batched.txt, runs.log, drq_<Game>.json, bench_supervised.txt
# (ResNet-18 img/s: fp32, bf16, channels-last, both, compile), bbf_smoke.txt.
#   OUT=/tmp/out GAMES="Pong Kangaroo" RUN_LIMIT=420 bash scripts/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
GAMES=${GAMES:-"Pong Kangaroo"}
RUN_LIMIT=${RUN_LIMIT:-420}  # seconds a full run may take before it is stopped (runs.log then says so)
mkdir -p "$OUT" /tmp/runs
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo "elapsed $(( $(date +%s) - start )) s"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; elapsed; } \
  2>&1 | tee "$OUT/device.txt"

timeout 150 python3 scripts/bench_drq.py --device cuda --env-steps 2000 --updates 300 --full-steps 3000 \
  --learning-starts 200 2>&1 | grep -v '^step' | tee "$OUT/bench_drq.txt"
elapsed | tee -a "$OUT/bench_drq.txt"

timeout 120 python3 agents/drq.py --env-id Pong --seed 1 2 3 4 5 6 7 8 --device cuda --total-steps 3000 \
  --learning-starts 200 --eval-episodes 2 --checkpoint-every 0 --log-every 500 --output-dir /tmp/runs/batched 2>&1 \
  | grep -E 'update batched|^step 3000|eval mean' | tee "$OUT/batched.txt"
elapsed | tee -a "$OUT/batched.txt"

for game in $GAMES; do
  timeout "$RUN_LIMIT" python3 agents/drq.py --env-id "$game" --seed 1 --device cuda --eval-envs 20 --checkpoint-every 0 \
    --output-dir "/tmp/runs/$game" > "/tmp/runs/$game.log" 2>&1 &
done
wait
for game in $GAMES; do
  { echo "== $game"; grep -v '^step' "/tmp/runs/$game.log" | tail -n 8; grep '^step' "/tmp/runs/$game.log" | awk 'NR % 10 == 0'; } >> "$OUT/runs.log"
  cp "/tmp/runs/$game/results.json" "$OUT/drq_$game.json" 2>/dev/null || echo "$game: no results.json" >> "$OUT/runs.log"
done
elapsed | tee -a "$OUT/runs.log"

timeout 150 python3 scripts/bench_supervised.py --device cuda --batches 100 2>&1 | tee "$OUT/bench_supervised.txt"
elapsed | tee -a "$OUT/bench_supervised.txt"

timeout 50 python3 agents/bbf.py --env-id Pong --device cuda --total-steps 2300 --eval-episodes 4 --eval-envs 4 \
  --max-episode-steps 2000 --log-every 100 --output-dir /tmp/runs/bbf_smoke 2>&1 | tail -n 10 | tee "$OUT/bbf_smoke.txt"
elapsed | tee -a "$OUT/bbf_smoke.txt"
