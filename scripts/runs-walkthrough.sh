#!/usr/bin/env bash
# One federation, many runs (issue 15), with the real binaries on loopback: one CA, one server
# and three clients started once; two runs with different models (the 2NN, then a logistic
# regression) submitted to the running server, one after the other, both secure and
# differentially private; `status` while it serves, the runs' list, a client's privacy ledger
# (one account per run), and both runs' exports loaded with Python's `safetensors`. A run the
# clients' policy refuses is declined by every site and fails without disturbing the others.
# Usage: scripts/runs-walkthrough.sh [BIN_DIR] (default target/debug).
set -euo pipefail
BIN=${1:-target/debug}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
PORT=$((40000 + RANDOM % 20000))
MNIST="$ROOT/scenarios/data/mnist"
S="$WORK/server"

"$BIN/cohort-server" init --state "$S" --name consortium --san localhost
# No run in server.toml: the server hosts submitted runs, and waits for more after the last.
cat > "$S/server.toml" <<TOML
listen = "127.0.0.1:$PORT"
TOML

for id in hospital-a hospital-b hospital-c; do
  mkdir -p "$WORK/$id"
  "$BIN/cohort-server" enroll --state "$S" --client-id "$id" --bundle "$WORK/$id/$id.pem"
  cat > "$WORK/$id/client.toml" <<TOML
server = "127.0.0.1:$PORT"
server_name = "localhost"
state_dir = "state"
[identity]
bundle = "$id.pem"
[data]
format = "idx"
images = "$MNIST/t10k-images.idx3-ubyte.gz"
labels = "$MNIST/t10k-labels.idx1-ubyte.gz"
[privacy]
max_epsilon = 40.0
[policy]
models = ["mnist-2nn", "mnist-logreg"]
max_epsilon_per_run = 20.0
TOML
  "$BIN/cohort-client" check --config "$WORK/$id/client.toml"
done

"$BIN/cohort-server" serve --state "$S" --config "$S/server.toml" > "$WORK/server.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
for id in hospital-a hospital-b hospital-c; do
  "$BIN/cohort-client" run --config "$WORK/$id/client.toml" > "$WORK/$id/daemon.log" 2>&1 &
  PIDS+=("$!")
done
CLIENTS=("${PIDS[@]:1}")

# Two runs, two models. A run file is server.toml's run part: model, test set, [federation].
run_file() { # NAME SPEC_FILE ROUNDS
  cat > "$WORK/$1.toml" <<TOML
model = "$2"
[test_data]
format = "idx"
images = "$MNIST/t10k-images.idx3-ubyte.gz"
labels = "$MNIST/t10k-labels.idx1-ubyte.gz"
[federation]
rounds = $3
clients_per_round = 3
min_clients = 3
round_timeout_secs = 120
max_consecutive_aborts = 1
collection = "secure"          # three sites: secure aggregation's settings are derived
[federation.dp]
clip = 0.01
noise_multiplier = 1.0
TOML
}
cp "$ROOT/common/specs/mnist-2nn.toml" "$WORK/"
cat > "$WORK/mnist-logreg.toml" <<'TOML'
name = "mnist-logreg"
input_shape = [1, 28, 28]
[[trunk]]
kind = "normalize"
mean = 0.1307
std = 0.3081
[[trunk]]
kind = "flatten"
[[heads]]
name = "digit"
classes = 10
TOML
cat > "$WORK/mnist-wide.toml" <<'TOML'
name = "mnist-wide"
input_shape = [1, 28, 28]
[[trunk]]
kind = "flatten"
[[trunk]]
kind = "linear"
out = 32
[[heads]]
name = "digit"
classes = 10
TOML
run_file first mnist-2nn.toml 2
run_file second mnist-logreg.toml 2
run_file refused mnist-wide.toml 1

"$BIN/cohort-server" submit --state "$S" --run first --config "$WORK/first.toml"
"$BIN/cohort-server" submit --state "$S" --run refused --config "$WORK/refused.toml"
"$BIN/cohort-server" submit --state "$S" --run second --config "$WORK/second.toml"
# A name is one run's for good.
if "$BIN/cohort-server" submit --state "$S" --run first --config "$WORK/second.toml" 2>"$WORK/dup.txt"; then
  echo "a second run named first was accepted" >&2
  exit 1
fi
grep -q "already a run named" "$WORK/dup.txt"

# `status` while the server works on a run: what it is doing now.
for _ in $(seq 1 240); do
  "$BIN/cohort-server" status --state "$S" > "$WORK/status.txt"
  grep -q "^now:      run " "$WORK/status.txt" && break
  sleep 0.5
done
cat "$WORK/status.txt"
grep -q "^server:   running" "$WORK/status.txt"

# Wait until the three runs are done (finished or failed), the server and clients still up.
for _ in $(seq 1 600); do
  "$BIN/cohort-server" runs --state "$S" --json > "$WORK/runs.json"
  python3 - "$WORK/runs.json" <<'PY' && break
import json, sys
runs = json.load(open(sys.argv[1]))
sys.exit(0 if all(r["status"] in ("finished", "failed") for r in runs) else 1)
PY
  sleep 0.5
done
"$BIN/cohort-server" runs --state "$S" | tee "$WORK/runs.txt"
grep -q "^first .* finished .* mnist-2nn .* 2/2" "$WORK/runs.txt"
grep -q "^second .* finished .* mnist-logreg .* 2/2" "$WORK/runs.txt"
grep -q "^refused .* failed" "$WORK/runs.txt"
# The server and every client ran through all three runs: started once, still running.
for p in "${PIDS[@]}"; do kill -0 "$p"; done
grep -q "policy.models" "$WORK/hospital-a/daemon.log"
# The server's live state is at most two seconds old.
for _ in $(seq 1 20); do
  "$BIN/cohort-server" status --state "$S" > "$WORK/status.txt"
  grep -q "between runs, waiting" "$WORK/status.txt" && break
  sleep 0.5
done
cat "$WORK/status.txt"
grep -q "between runs, waiting" "$WORK/status.txt"
"$BIN/cohort-server" rounds --state "$S" --run first
"$BIN/cohort-server" rounds --state "$S" --run second

# Each site's ledger: one account per run, both within the per-run cap.
"$BIN/cohort-client" ledger --config "$WORK/hospital-a/client.toml" | tee "$WORK/ledger.txt"
grep -q "^run first: epsilon" "$WORK/ledger.txt"
grep -q "^run second: epsilon" "$WORK/ledger.txt"

# Both runs' models, each with its own shape.
"$BIN/cohort-server" export --state "$S" --run first --out "$WORK/first.safetensors"
"$BIN/cohort-server" export --state "$S" --run second --out "$WORK/second.safetensors"
python3 - "$WORK/first.safetensors" "$WORK/second.safetensors" <<'PY'
import sys
from safetensors.numpy import load_file
first, second = (load_file(p) for p in sys.argv[1:3])
assert sum(v.size for v in first.values()) == 199210, {k: v.shape for k, v in first.items()}
assert sum(v.size for v in second.values()) == 7850, {k: v.shape for k, v in second.items()}
print("exports: run first", sum(v.size for v in first.values()), "parameters; run second",
      sum(v.size for v in second.values()), "parameters")
PY

kill -TERM "$SERVER"
wait "$SERVER"
for p in "${CLIENTS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" || true; done
PIDS=()
# (To a file, not `| grep -q`: grep would close the pipe before `status` has written its last line.)
"$BIN/cohort-server" status --state "$S" > "$WORK/status.txt"
grep -q "^server:   not running" "$WORK/status.txt"
echo "runs walkthrough: ok"
