#!/usr/bin/env bash
# The class-reweighting comparison of BENCHMARKS.md: each imbalanced scenario run with the same
# seed without reweighting, with local and with global (secure census) class weights, and with
# logit adjustment; prints final accuracy, balanced accuracy and macro-F1 of each run.
#
#   scripts/reweighting-bench.sh [SCENARIO...]      # default: winequality mnist-longtail
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p cohort-scenarios
SIM=target/release/cohort-sim
OUT=$(mktemp -d)
scenarios=${*:-winequality mnist-longtail}
variants=(
    "none|"
    "inverse_frequency, local|--set federation.train.loss.weighting=inverse_frequency"
    "inverse_frequency, global|--set federation.train.loss.weighting=inverse_frequency --set federation.train.loss.scope=global"
    "effective_number, local|--set federation.train.loss.weighting=effective_number"
    "effective_number, global|--set federation.train.loss.weighting=effective_number --set federation.train.loss.scope=global"
    "logit adjustment, local|--set federation.train.loss.logit_adjustment=1.0"
    "logit adjustment, global|--set federation.train.loss.logit_adjustment=1.0 --set federation.train.loss.scope=global"
)
printf "%-16s %-28s %9s %9s %9s\n" scenario loss accuracy bal.acc macro-F1
for s in $scenarios; do
    for v in "${variants[@]}"; do
        name=${v%%|*}
        # shellcheck disable=SC2086
        "$SIM" run "scenarios/$s.toml" ${v#*|} --out "$OUT/run" > /dev/null
        python3 - "$OUT/run/report.json" "$s" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
last = [x for x in r["rounds"] if x["test_accuracy"] is not None][-1]
print(f"{sys.argv[2]:<16} {sys.argv[3]:<28} {last['test_accuracy']*100:8.2f}% {last['balanced_accuracy']*100:8.2f}% {last['macro_f1']:9.4f}")
PY
    done
done
