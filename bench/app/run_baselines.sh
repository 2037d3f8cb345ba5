#!/usr/bin/env bash
# The slow baselines (in-context learning, retrieval ICL, IA3, LoRA) on the seven shared sets
# with the settings of all-methods.json (256 training / 250 test examples per set), one file per
# method and seed so that a long run keeps what it finished:
#   bash bench/app/run_baselines.sh "1 2" "ia3 icl rag lora"
# writes bench/results/eval/baselines/seed<S>-<method>.json/.txt (about 70 min per seed for all
# four on a 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/app/shared_sets.sh
seeds=(${1:-1 2})
methods=(${2:-ia3 icl rag lora})
mkdir -p "$OUT/baselines"
for method in "${methods[@]}"; do
  for seed in "${seeds[@]}"; do
    vocabsem eval "${args[@]}" --train-limit 256 --test-limit 250 --seed "$seed" --methods "$method" \
      --out "$OUT/baselines/seed$seed-$method.json" > "$OUT/baselines/seed$seed-$method.txt"
  done
done
