#!/usr/bin/env bash
# vds+ beside vds, kNN prompting and the untrained references on the seven sets of
# ../shared/data, with the settings of all-methods.json (256 training / 250 test examples per
# set), for the seeds given (default 0 1 2). Writes bench/results/eval/vds-plus-seed<S>.json/.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/app/shared_sets.sh
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
for seed in "${seeds[@]}"; do
  vocabsem eval "${args[@]}" --train-limit 256 --test-limit 250 --seed "$seed" \
    --methods vds+,vds,knn,zeroshot,cosine --out "$OUT/vds-plus-seed$seed.json" > "$OUT/vds-plus-seed$seed.txt"
done
