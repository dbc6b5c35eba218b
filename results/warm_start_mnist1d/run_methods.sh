#!/usr/bin/env bash
# Every method of the supervised runner on the warm-start protocol, MNIST-1D MLP (subset 0.1, label
# noise 0.5, 100 epochs phase 2), 3 seeds, plus the fresh network; appends to methods.jsonl.
# Hare & Tortoise: the paper's fixed setting and the best scaled one of ht_sweep.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/warm_start_mnist1d/methods.jsonl}
common=(--dataset mnist1d --model mlp --subset 0.1 --noise 0.5 --epochs 100 --no-hessian --log-every 1000 --out "$OUT")
methods=(baseline l2 spectral-decoupling regen crelu redo head-reset shrink-perturb ema hare-tortoise lifecycle
         lifecycle-he lifecycle-xavier lifecycle-nowarmup lifecycle-he-nowarmup lifecycle-xavier-nowarmup
         neuronal-decay topk-cycle topk-accuracy topk-plateau)
for seed in 0 1 2; do
  python scripts/supervised.py run "${common[@]}" --seed $seed --protocol fresh --method baseline
  for method in "${methods[@]}"; do
    python scripts/supervised.py run "${common[@]}" --seed $seed --protocol warm-start --method $method
  done
  python scripts/supervised.py run "${common[@]}" --seed $seed --protocol warm-start --method hare-tortoise \
    --ht-horizon 0.01 --ht-reset-share 0.02
done
