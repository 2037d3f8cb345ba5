#!/usr/bin/env bash
# vds+ beside vds, kNN prompting and the untrained references on the seven sets of
# ../shared/data, with the settings of all-methods.json (256 training / 250 test examples per
# set), for the seeds given (default 0 1 2). Writes bench/results/eval/vds-plus-seed<S>.json/.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
OUT=bench/results/eval
sets=(sst2 subj agnews mr trec cb rte)
args=()
for s in "${sets[@]}"; do args+=(--data "$DATA/$s"); done
mkdir -p "$OUT"
for seed in "${@:-0 1 2}"; do
  for s in $seed; do
    vocabsem eval "${args[@]}" --train-limit 256 --test-limit 250 --seed "$s" \
      --methods vds+,vds,knn,zeroshot,cosine --out "$OUT/vds-plus-seed$s.json" > "$OUT/vds-plus-seed$s.txt"
  done
done
