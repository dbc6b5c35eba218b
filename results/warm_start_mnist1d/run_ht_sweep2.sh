#!/usr/bin/env bash
# Second round of the Hare & Tortoise sweep (shorter horizons and periods than round 1), and EMA
# alone at the same horizons. Appends to ht_sweep.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/warm_start_mnist1d/ht_sweep.jsonl
common=(--dataset mnist1d --model mlp --subset 0.1 --noise 0.5 --epochs 100 --no-hessian --log-every 1000 --out "$OUT")
for seed in 0 1 2; do
  for setting in "0.005 0.02" "0.01 0.02" "0.02 0.05" "0.005 0.05"; do
    set -- $setting
    python scripts/supervised.py run "${common[@]}" --seed $seed --protocol warm-start --method hare-tortoise \
      --ht-horizon $1 --ht-reset-share $2
  done
  for horizon in 0.01 0.02; do
    python scripts/supervised.py run "${common[@]}" --seed $seed --protocol warm-start --method ema --ht-horizon $horizon
  done
done
