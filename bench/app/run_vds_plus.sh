#!/usr/bin/env bash
# vds+ beside vds, kNN prompting and the untrained references on the seven sets of
# ../shared/data, with the settings of all-methods.json (256 training / 250 test examples per
# set), for the seeds given (default 0 1 2). Writes bench/results/eval/vds-plus-seed<S>.json/.txt.
# METHODS=vds+ reruns only those methods (after a change to them) into
# vds-plus-seed<S>-<methods>.json/.txt, which the summary lays over the full run of that seed.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/app/shared_sets.sh
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
methods=${METHODS:-vds+,vds,knn,zeroshot,cosine}
for seed in "${seeds[@]}"; do
  name="vds-plus-seed$seed"
  [ -z "${METHODS:-}" ] || name+="-${methods//[,:=\/]/_}"
  vocabsem eval "${args[@]}" --train-limit 256 --test-limit 250 --seed "$seed" \
    --methods "$methods" --out "$OUT/$name.json" > "$OUT/$name.txt"
done
