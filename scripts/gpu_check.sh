#!/usr/bin/env bash
# The project's one prepared GPU check, run on a lent CUDA machine from the repository root with the
# wheels of gymnasium, ale-py and tyro in .whl/. Every figure lands in $OUT/gpu_check.txt, stage
# by stage (the device tool returns few files), so a run stopped by its time limit still returns
# what it measured.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh                 # every stage (about 20 minutes)
#   OUT=/tmp/out bash scripts/gpu_check.sh interventions concurrent32 compile     # only these
#
# Stages (each capped by `timeout`; the caps add up to what a stage may take at most):
#   graphs         90 s  check_cuda_graphs: captured updates of DrQ, its interventions, batched DrQ
#                        and BBF compute what the eager ones compute
#   graphs-quick   90 s  the same for the interventions with captured per-step work (continual
#                        backprop, lifecycle, noise) and the concurrent update only
#   interventions 110 s  bench_interventions: each intervention's overhead, eager and captured
#   drq           240 s  bench_drq: env, eager vs captured update, 8 / 32 / 128 runs vmapped and
#                        concurrent, the loop
#   drq-short     120 s  bench_drq with 8 and 32 runs only
#   batch32       100 s  one process, 32 DrQ runs (8 games x 4 seeds) end to end, vmapped update
#   concurrent32  100 s  the same with --batched-update concurrent (+ batched_runs.json)
#   bbf            90 s  bench_bbf: fp32 / bf16, eager / captured, projected 100k run
#   smoke         180 s  short CUDA runs of BBF and of DrQ with CBP, noise, lifecycle
#   resnet         90 s  bench_supervised, ResNet-18: fp32, bf16 + channels-last, each eager and with
#                        the whole step captured in a CUDA graph (--cuda-graph)
#   supervised     80 s  the supervised runner on digits, ResNet-18, eager and --cuda-graph: the same
#                        losses (no augmentation: nothing random inside the step)
#   compile       200 s  bench_supervised, ResNet-18: bf16 + channels-last, then + torch.compile
# The machine's start and the install (about 20 s) count against a session's device time too.
# The device's copy of the tree may carry stale git history: give the commit it came from, so that
# results.json records it (rlplastic.runs.git_commit reads it):
#   RLPLASTIC_GIT_COMMIT=<git rev-parse HEAD here> OUT=$OUT bash scripts/gpu_check.sh ...
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" /tmp/runs
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
LOG="$OUT/gpu_check.txt"
start=$(date +%s)
say() { tee -a "$LOG"; }
elapsed() { echo "== $1: elapsed $(( $(date +%s) - start )) s" | say; }
GAMES="Pong Breakout Boxing Kangaroo MsPacman Seaquest Freeway Krull"

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
  ln -sfn "$PWD/agents" /tmp/site/agents  # load_agent finds the agents next to the installed package
  { nvidia-smi -L; nproc; echo "commit: ${RLPLASTIC_GIT_COMMIT:-not given; the git log of this copy: $(git log --oneline -1 2>/dev/null)}"
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | say
}

stage_graphs() { timeout 90 python3 scripts/check_cuda_graphs.py 2>&1 | say; }
stage_graphs_quick() {
  timeout 90 python3 scripts/check_cuda_graphs.py --only backprop lifecycle noise concurrent 2>&1 | say
}

stage_interventions() {
  timeout 110 python3 scripts/bench_interventions.py --device cuda --updates 200 --repeats 2 2>&1 | say
}

stage_drq() {
  timeout 240 python3 scripts/bench_drq.py --device cuda --env-steps 2000 --updates 300 --full-steps 3000 \
    --learning-starts 200 --batched 8 32 128 --batched-updates 20 2>&1 | grep -v '^step' | say
}

stage_drq_short() {
  timeout 120 python3 scripts/bench_drq.py --device cuda --env-steps 1000 --updates 200 --full-steps 1500 \
    --learning-starts 200 --batched 8 32 --batched-updates 20 2>&1 | grep -v '^step' | say
}

# 32 runs in one process for 2,600 steps (1,000 of them updating); $1 the update mode
batch_of_32() {
  rm -rf "/tmp/runs/$1"  # finished run folders are refused: a rerun starts afresh
  # shellcheck disable=SC2086
  timeout 100 python3 agents/drq.py --env-id $GAMES --seed 1 2 3 4 --device cuda --total-steps 2600 \
    --env-workers "$(nproc)" --eval-episodes 0 --checkpoint-every 0 --log-every 500 --diag-every 0 \
    --batched-update "$1" --output-dir "/tmp/runs/$1/{game}/seed{seed}" > "/tmp/runs/$1.log" 2>&1
  { grep -E 'update ' "/tmp/runs/$1.log" | sort | uniq -c
    grep -E '^step (2000|2500|2600)/' "/tmp/runs/$1.log" | sort | uniq -c | head -n 3
    tail -n 2 "/tmp/runs/$1.log"; } | say
  python3 - "$1" <<'EOF' | say
import glob, json, sys
runs = [json.load(open(f)) for f in sorted(glob.glob(f"/tmp/runs/{sys.argv[1]}/*/seed*/results.json"))]
times = [r["train_time_s"] for r in runs]
print(f"{sys.argv[1]}: {len(runs)} runs finished; train_time_s {min(times, default=0):.1f}..{max(times, default=0):.1f};",
      f"update_mode {sorted({r.get('update_mode') for r in runs})}")
json.dump([{k: r.get(k) for k in ("game", "seed", "train_time_s", "update_mode", "total_steps")} for r in runs],
          open(f"/tmp/runs/{sys.argv[1]}_runs.json", "w"), indent=1)
EOF
  cp "/tmp/runs/$1_runs.json" "$OUT/" 2>/dev/null
}

stage_batch32() { batch_of_32 vmap; }
stage_concurrent32() { batch_of_32 concurrent; }

stage_bbf() { timeout 90 python3 scripts/bench_bbf.py --device cuda --updates 60 --env-steps 1000 2>&1 | say; }

stage_smoke() {
  rm -rf /tmp/runs/bbf_smoke /tmp/runs/drq_cbp /tmp/runs/drq_noise /tmp/runs/drq_lifecycle
  {
    timeout 60 python3 agents/bbf.py --env-id Pong --device cuda --total-steps 2600 --eval-episodes 2 --eval-envs 2 \
      --max-episode-steps 2000 --log-every 300 --output-dir /tmp/runs/bbf_smoke 2>&1 | grep -E 'update|^step (2400|2600)|eval mean'
    for method in cbp noise lifecycle; do
      timeout 40 python3 agents/drq.py --env-id Pong --device cuda --total-steps 2400 --continual $method \
        --eval-episodes 2 --eval-envs 2 --max-episode-steps 2000 --log-every 400 --output-dir "/tmp/runs/drq_$method" \
        2>&1 | grep -E 'update|^step (2000|2400)|eval mean'
    done
  } | say
}

stage_resnet() {
  timeout 90 python3 scripts/bench_supervised.py --device cuda --batches 100 --variants fp32 graph \
    bf16+channels-last bf16+channels-last+graph bf16+graph 2>&1 | say
}

# the runner itself, eager and captured: per-epoch losses side by side
stage_supervised() {
  for graph in --no-cuda-graph --cuda-graph; do
    timeout 40 python3 scripts/supervised.py run --dataset digits --model resnet18 --protocol fresh --epochs 4 \
      --device cuda --seed 0 --no-hessian --log-every 1 $graph --out "/tmp/runs/supervised$graph.jsonl" 2>&1 \
      | sed "s/^/$graph: /" | say
  done
}

# torch.compile of ResNet-18 (the compile itself takes a minute or more)
stage_compile() {
  timeout 200 python3 scripts/bench_supervised.py --device cuda --batches 100 --variants bf16+channels-last \
    bf16+channels-last+compile 2>&1 | say
}

ALL="graphs interventions drq batch32 concurrent32 bbf smoke resnet supervised compile"
for stage in "$@"; do
  declare -F "stage_${stage//-/_}" > /dev/null || { echo "gpu_check: no stage '$stage'; stages: $ALL drq-short graphs-quick" >&2; exit 2; }
done
setup
elapsed setup
for stage in ${@:-$ALL}; do
  "stage_${stage//-/_}"
  elapsed "$stage"
done
