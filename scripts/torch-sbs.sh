#!/usr/bin/env bash
# The FedAvg paper's CNN round three ways, back to back on this machine: Cohort's native candle
# client, Cohort with PyTorch clients through the Python package (python/examples/
# torch_federation.py), and Flower 1.42's SecAgg+ with the same PyTorch training loop
# (../shared/anchors/flower). All: 100 IID MNIST clients of 600 images, 10 a round, E = 5, B = 10,
# lr 0.05, secure aggregation, 2 clients training at once with one torch thread each.
#
#   cargo build --release --bins
#   (cd python && VIRTUAL_ENV=V maturin develop --release)   # the package, into the venv
#   FLOWER_VENV=V scripts/torch-sbs.sh OUTDIR [ROUNDS]
#
# V: a venv with torch, numpy, "flwr[simulation]==1.42.0" and maturin (../shared/anchors/README.md).
# Prints the median seconds per round of each (Flower's without its first round, as sbs.sh).
set -u
OUT=${1:?usage: torch-sbs.sh OUTDIR [ROUNDS]}
ROUNDS=${2:-6}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${FLOWER_VENV:?set FLOWER_VENV}/bin/python
ANCHORS=$ROOT/../shared/anchors
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 PYTHONUNBUFFERED=1 FB_DATA_DIR=$ROOT/scenarios/data/mnist

"$ROOT/target/release/cohort-sim" run "$ROOT/scenarios/mnist-cnn-iid-secure.toml" --rounds "$ROUNDS" \
  --out "$OUT/native" > "$OUT/native.log" 2>&1
python3 -c "import json,statistics; r=json.load(open('$OUT/native/report.json'))['rounds']; print(f\"cohort native (candle): {statistics.median(x['seconds'] for x in r):.1f} s/round, accuracy after round $ROUNDS {r[-1]['test_accuracy']:.4f}\")"

COHORT_BIN=$ROOT/target/release "$PY" "$ROOT/python/examples/torch_federation.py" --rounds "$ROUNDS" \
  --out "$OUT/torch" > "$OUT/torch.log" 2>&1
python3 -c "import json,statistics; r=[x for x in json.load(open('$OUT/torch/report.json'))['rounds'] if x['status']=='completed']; print(f\"cohort + PyTorch clients: {statistics.median(x['seconds'] for x in r):.1f} s/round, accuracy after round $ROUNDS {r[-1]['test_accuracy']:.4f}\")"

timeout 3600 "$PY" "$ANCHORS/flower/fl_bench.py" --model cnn --partition iid --mode secagg --epochs 5 \
  --max-rounds "$ROUNDS" --out "$OUT/flower.json" > "$OUT/flower.log" 2>&1
python3 -c "import json; d=json.load(open('$OUT/flower.json')); s=d['summary']; r=d['rounds']; print(f\"flower secagg+ (PyTorch): {s['median_round_s_excl_r1']:.1f} s/round, accuracy after round $ROUNDS {r[-1]['acc']:.4f}\")"
