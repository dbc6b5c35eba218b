#!/usr/bin/env bash
# The project's one prepared GPU check, run on a lent CUDA machine from the repository root with the
# wheels of gymnasium, ale-py and tyro in .whl/. Every figure lands in $OUT/gpu_check.txt, stage
# by stage (the device tool returns few files), so a run stopped by its time limit still returns
# what it measured: the card; check_cuda_graphs (captured updates of DrQ, its interventions,
# batched DrQ and BBF = eager ones); bench_drq (env, eager vs graph update, 1..128 runs batched,
# the loop); bench_bbf (fp32 / bf16, eager / graph, projected 100k run); bench_interventions (each
# intervention's overhead, eager and captured); one process running 32 DrQ runs (8 games x 4 seeds)
# end to end, vmapped and concurrent (+ batched_runs.json); short CUDA runs of BBF and of DrQ with CBP, noise, lifecycle;
# bench_supervised (ResNet-18 img/s: fp32, bf16, channels-last, both; then both + torch.compile).
# The stages add up to more than one 10-minute device call: run it in two calls if need be.
#   OUT=/tmp/out bash scripts/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" /tmp/runs
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo "elapsed $(( $(date +%s) - start )) s"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
ln -sfn "$PWD/agents" /tmp/site/agents  # load_agent finds the agents next to the installed package
export PYTHONPATH=/tmp/site
{ nvidia-smi -L; nproc; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; elapsed; } \
  2>&1 | tee -a "$OUT/gpu_check.txt"

timeout 90 python3 scripts/check_cuda_graphs.py 2>&1 | tee -a "$OUT/gpu_check.txt"
elapsed | tee -a "$OUT/gpu_check.txt"

timeout 240 python3 scripts/bench_drq.py --device cuda --env-steps 2000 --updates 300 --full-steps 3000 \
  --learning-starts 200 --batched 8 32 128 --batched-updates 20 2>&1 | grep -v '^step' | tee -a "$OUT/gpu_check.txt"
elapsed | tee -a "$OUT/gpu_check.txt"

timeout 90 python3 scripts/bench_bbf.py --device cuda --updates 60 --env-steps 1000 2>&1 | tee -a "$OUT/gpu_check.txt"
elapsed | tee -a "$OUT/gpu_check.txt"

timeout 100 python3 scripts/bench_interventions.py --device cuda --updates 200 --repeats 2 2>&1 \
  | tee -a "$OUT/gpu_check.txt"
elapsed | tee -a "$OUT/gpu_check.txt"

rm -rf /tmp/runs/batched  # finished run folders are refused: a rerun starts afresh
timeout 100 python3 agents/drq.py --env-id Pong Breakout Boxing Kangaroo MsPacman Seaquest Freeway Krull \
  --seed 1 2 3 4 --device cuda --total-steps 2600 --env-workers "$(nproc)" --eval-episodes 0 --checkpoint-every 0 \
  --log-every 500 --diag-every 0 --output-dir '/tmp/runs/batched/{game}/seed{seed}' > /tmp/runs/batched.log 2>&1
{ grep -E 'update |Pong seed 1|^step' /tmp/runs/batched.log | grep -E 'update |Pong|^step (2000|2500|2600)/' | head -n 12;
  tail -n 3 /tmp/runs/batched.log; } | tee -a "$OUT/gpu_check.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu_check.txt"
import glob, json
runs = [json.load(open(f)) for f in sorted(glob.glob("/tmp/runs/batched/*/seed*/results.json"))]
times = [r["train_time_s"] for r in runs]
print(f"{len(runs)} runs finished; train_time_s {min(times, default=0):.1f}..{max(times, default=0):.1f};",
      f"update_mode {sorted({r.get('update_mode') for r in runs})}")
json.dump([{k: r.get(k) for k in ("game", "seed", "train_time_s", "update_mode", "total_steps")} for r in runs],
          open("/tmp/runs/batched_runs.json", "w"), indent=1)
EOF
cp /tmp/runs/batched_runs.json "$OUT/" 2>/dev/null
rm -rf /tmp/runs/concurrent
timeout 100 python3 agents/drq.py --env-id Pong Breakout Boxing Kangaroo MsPacman Seaquest Freeway Krull \
  --seed 1 2 3 4 --device cuda --total-steps 2600 --env-workers "$(nproc)" --eval-episodes 0 --checkpoint-every 0 \
  --log-every 500 --diag-every 0 --batched-update concurrent --output-dir '/tmp/runs/concurrent/{game}/seed{seed}' \
  2>&1 | grep -E 'update |^step (2000|2500|2600)/' | sort | uniq -c | head -n 6 | tee -a "$OUT/gpu_check.txt"
rm -rf /tmp/runs/bbf_smoke /tmp/runs/drq_cbp /tmp/runs/drq_noise /tmp/runs/drq_lifecycle  # a rerun starts them afresh
elapsed | tee -a "$OUT/gpu_check.txt"

{
  timeout 60 python3 agents/bbf.py --env-id Pong --device cuda --total-steps 2600 --eval-episodes 2 --eval-envs 2 \
    --max-episode-steps 2000 --log-every 300 --output-dir /tmp/runs/bbf_smoke 2>&1 | grep -E 'update|^step (2400|2600)|eval mean'
  for method in cbp noise lifecycle; do
    timeout 40 python3 agents/drq.py --env-id Pong --device cuda --total-steps 2400 --continual $method \
      --eval-episodes 2 --eval-envs 2 --max-episode-steps 2000 --log-every 400 --output-dir "/tmp/runs/drq_$method" 2>&1 \
      | grep -E 'update|^step (2000|2400)|eval mean'
  done
} | tee -a "$OUT/gpu_check.txt"
elapsed | tee -a "$OUT/gpu_check.txt"

timeout 90 python3 scripts/bench_supervised.py --device cuda --batches 60 --variants fp32 bf16 channels-last \
  bf16+channels-last 2>&1 | tee -a "$OUT/gpu_check.txt"
elapsed | tee -a "$OUT/gpu_check.txt"

# torch.compile of ResNet-18 (the compile itself takes a minute or more): last, so a time limit
# cuts only this stage.
timeout 200 python3 scripts/bench_supervised.py --device cuda --batches 100 --variants bf16+channels-last \
  bf16+channels-last+compile 2>&1 | tee -a "$OUT/gpu_check.txt"
elapsed | tee -a "$OUT/gpu_check.txt"
