# Sourced by the evaluation runs: the seven shared data sets as --data arguments, and the
# output folder. DATA overrides where ../shared/data is.
DATA=${DATA:-../shared/data}
OUT=bench/results/eval
sets=(sst2 subj agnews mr trec cb rte)
args=()
for s in "${sets[@]}"; do args+=(--data "$DATA/$s"); done
mkdir -p "$OUT"
