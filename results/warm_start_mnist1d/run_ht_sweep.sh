#!/usr/bin/env bash
# Warm-start on MNIST-1D (MLP, subset 0.1, noise 0.5, 100 epochs phase 2), 3 seeds:
# the bounds (warm-started baseline, fresh) and Hare & Tortoise at the paper's fixed setting and at
# schedules that scale with the phase (--ht-horizon, --ht-reset-share). Appends to ht_sweep.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/warm_start_mnist1d/ht_sweep.jsonl
common=(--dataset mnist1d --model mlp --subset 0.1 --noise 0.5 --epochs 100 --no-hessian --log-every 1000 --out "$OUT")
for seed in 0 1 2; do
  python scripts/supervised.py run "${common[@]}" --seed $seed --protocol warm-start --method baseline
  python scripts/supervised.py run "${common[@]}" --seed $seed --protocol fresh --method baseline
  python scripts/supervised.py run "${common[@]}" --seed $seed --protocol warm-start --method hare-tortoise
  for setting in "0.05 0.1" "0.02 0.1" "0.1 0.1" "0.05 0.25" "0.01 0.05" "0.2 0.25"; do
    set -- $setting
    python scripts/supervised.py run "${common[@]}" --seed $seed --protocol warm-start --method hare-tortoise \
      --ht-horizon $1 --ht-reset-share $2
  done
  python scripts/supervised.py run "${common[@]}" --seed $seed --protocol warm-start --method ema --ht-horizon 0.05
done
