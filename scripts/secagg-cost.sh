#!/usr/bin/env bash
# The cost of secure aggregation, measured back to back on one machine: the MNIST 2NN IID
# federation plain and secure, alternately, RUNS times each, then the protocol alone at 100
# clients (scale-secure-100). Prints each run's median seconds per round, the round that reached
# 97% and the final accuracy.
#
#   cargo build --release -p cohort-scenarios --bin cohort-sim
#   scripts/secagg-cost.sh [path/to/cohort-sim]        # RUNS=2 by default
set -euo pipefail
cd "$(dirname "$0")/.."
sim=${1:-target/release/cohort-sim}
runs=${RUNS:-2}
out=${OUT:-out/secagg-cost}
mkdir -p "$out"
report() {
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], 'median s/round', round(r['median_round_seconds'], 3), 'reached target at', r['target_reached_at'], 'final accuracy', r['final_accuracy'])" "$1/report.json" "$2"
}
for i in $(seq 1 "$runs"); do
    for scenario in mnist-2nn-iid mnist-2nn-iid-secure; do
        "$sim" run "scenarios/$scenario.toml" --out "$out/$scenario-$i" > /dev/null
        report "$out/$scenario-$i" "$scenario run $i:"
    done
done
for i in $(seq 1 "$runs"); do
    "$sim" run scenarios/scale-secure-100.toml --out "$out/scale-secure-100-$i" > /dev/null
    report "$out/scale-secure-100-$i" "scale-secure-100 run $i:"
done
