#!/usr/bin/env bash
# Every method on every data set in ../shared/data with the default model, on the CPU: seeded
# (seed 0), class-stratified subsets of 256 training and 250 test examples per set (sets whose
# test split has no usable labels are scored on a stratified hold-out of their training split).
# Then the module's defaults are chosen on validation data carved out of 1000 training examples.
# Writes bench/results/eval/. About 90 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/app/shared_sets.sh
vocabsem eval "${args[@]}" --train-limit 256 --test-limit 250 --seed 0 \
  --methods vds,vds:train=sm-gt,vds:train=mm:predict=mm,knn,icl,rag,lora,ia3,zeroshot,cosine \
  --out "$OUT/all-methods.json" --plot "$OUT/plots" > "$OUT/all-methods.txt"
python bench/app/sweep_vds.py --data "$DATA/sst2" --data "$DATA/subj" --data "$DATA/agnews" --data "$DATA/trec" \
  --out "$OUT/vds-sweep.json" > "$OUT/vds-sweep.txt"
