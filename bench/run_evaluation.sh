#!/usr/bin/env bash
# Every method on every data set in ../shared/data with the default model (CPU), in two runs:
#  1. the semantic clustering module's readings and ablations with the untrained references and
#     kNN prompting (cheap: they share one extraction), train 1000 / test 500 per set;
#  2. every method, prompt-based and fine-tuned baselines included, train 256 / test 250 per set.
# Seeded, class-stratified subsets (seed 0). Writes bench/results/eval/*.json and plots.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=bench/results/eval
sets=(sst2 subj agnews mr trec cb rte)
args=()
for s in "${sets[@]}"; do args+=(--data "$DATA/$s"); done
mkdir -p "$OUT"
vocabsem eval "${args[@]}" --train-limit 1000 --test-limit 500 --seed 0 \
  --methods vds,vds:attention=last,vds:attention=none,vds:train=sm-gt,vds:train=mm,vds:predict=mm,vds:train=mm:predict=mm,knn,zeroshot,cosine \
  --out "$OUT/vds-variants.json" --plot "$OUT/plots" > "$OUT/vds-variants.txt"
vocabsem eval "${args[@]}" --train-limit 256 --test-limit 250 --seed 0 \
  --methods vds,knn,icl,rag,lora,ia3,zeroshot,cosine \
  --out "$OUT/all-methods.json" > "$OUT/all-methods.txt"
