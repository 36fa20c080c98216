#!/usr/bin/env bash
# The server's memory under hostile peers (issue 12, acceptance 1), with the release binaries on
# loopback: 3 honest `cohort-client run` daemons and ROUNDS secure rounds (default 200) of a tiny
# model on a small synthetic CSV, the server's VmRSS and VmHWM sampled every second.
#   (a) baseline: the honest federation alone;
#   (b) with one enrolled `cohort-hostile decline` (a 4 MB Decline with newlines and ESC, every round);
#   (c) with one enrolled `cohort-hostile wrong-phase` (4 MB of sealed shares for every request);
#   (d) 100 length-bomb hellos and 15 s of 100 pre-hello connections (re-opened as the server
#       closes or refuses them) against the resting server, then the honest rounds, with more
#       bombs and a second flood while they run.
# Acceptance: (b) and (c) within 50 MB of (a); (d) within 100 MB of its resting RSS; every round
# of every scenario completes.
# Usage: cargo build --release --workspace --bins && scripts/hostile-bench.sh [BIN_DIR]
#        ROUNDS=20 scripts/hostile-bench.sh     # a quick run
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(cd "${1:-$ROOT/target/release}" && pwd)
ROUNDS=${ROUNDS:-200}
HONEST=3
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
for b in cohort-server cohort-client cohort-hostile; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: run cargo build --release --workspace --bins" >&2; exit 1; }
done

cat > "$WORK/tiny.toml" <<'TOML'
name = "tiny"
input_shape = [4]
[[trunk]]
kind = "linear"
out = 16
[[trunk]]
kind = "relu"
[[heads]]
name = "y"
classes = 3
TOML

# 2,000 rows: four uniform features, the class is the largest of the first three.
make_csv() {
  awk -v seed="$1" 'BEGIN {
    srand(seed); print "a,b,c,d,y"
    for (i = 0; i < 2000; i++) {
      a = rand(); b = rand(); c = rand(); d = rand()
      y = (a >= b && a >= c) ? 0 : (b >= c ? 1 : 2)
      printf "%.4f,%.4f,%.4f,%.4f,%d\n", a, b, c, d, y
    }
  }'
}

# VmRSS and VmHWM (kB) of PID every second, until it exits.
sample_rss() {
  while [ -r "/proc/$1/status" ]; do
    awk '/^VmRSS/ {r = $2} /^VmHWM/ {h = $2} END {if (r) print r, h}' "/proc/$1/status" 2>/dev/null >>"$2" || true
    sleep 1
  done
}

rss_now() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# Sets up state dir $1 with the honest clients and an enrolled attacker; writes server.toml for
# start_after_clients = $2.
setup() {
  local dir=$1 port=$((20000 + RANDOM % 30000))
  mkdir -p "$dir"
  "$BIN/cohort-server" init --state "$dir/server" --name bench --san localhost >/dev/null
  cp "$WORK/tiny.toml" "$dir/server/"
  cat >"$dir/server/server.toml" <<TOML
listen = "127.0.0.1:$port"
model = "tiny.toml"
[federation]
rounds = $ROUNDS
clients_per_round = $((HONEST + 1))
min_clients = $HONEST
start_after_clients = $2
round_timeout_secs = 30
wait_for_clients_secs = 600
collection = "secure"
[federation.train]
epochs = 1
batch_size = 16
lr = 0.1
[federation.secagg]
degree = 3
threshold = 2
dropout_tolerance = 0.0
TOML
  for i in $(seq 1 "$HONEST"); do
    local c="$dir/honest-$i"
    mkdir -p "$c"
    "$BIN/cohort-server" enroll --state "$dir/server" --client-id "honest-$i" --bundle "$c/bundle.pem" >/dev/null
    make_csv "$i" >"$c/data.csv"
    cat >"$c/client.toml" <<TOML
server = "127.0.0.1:$port"
server_name = "localhost"
state_dir = "state"
device = "cpu"
[identity]
bundle = "bundle.pem"
[data]
format = "csv"
path = "data.csv"
label_column = "y"
classes = 3
[reconnect]
initial_ms = 100
max_ms = 1000
TOML
  done
  "$BIN/cohort-server" enroll --state "$dir/server" --client-id attacker --bundle "$dir/attacker.pem" >/dev/null
  echo "127.0.0.1:$port" >"$dir/addr"
}

start_server() {
  RUST_LOG=info "$BIN/cohort-server" serve --state "$1/server" --config "$1/server/server.toml" 2>"$1/server.log" &
  SERVER=$!
  PIDS+=("$SERVER")
  sample_rss "$SERVER" "$1/rss" &
  PIDS+=("$!")
}

start_honest() {
  for i in $(seq 1 "$HONEST"); do
    (cd "$1/honest-$i" && RUST_LOG=warn exec "$BIN/cohort-client" run --config client.toml 2>client.log) &
    PIDS+=("$!")
  done
}

hostile() { # DIR ARGS...: runs cohort-hostile in the background; its pid in HOSTILE
  local dir=$1
  shift
  "$BIN/cohort-hostile" --server "$(cat "$dir/addr")" --bundle "$dir/attacker.pem" "$@" 2>>"$dir/hostile.log" &
  HOSTILE=$!
  PIDS+=("$HOSTILE")
}

# Waits for the server to finish its rounds (or gives up), then stops everything else.
finish() {
  local dir=$1 deadline=$((SECONDS + 120 + ROUNDS * 5))
  while kill -0 "$SERVER" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
  if kill -0 "$SERVER" 2>/dev/null; then
    echo "the server of $(basename "$dir") did not finish in time; stopping it" >&2
    kill "$SERVER"
  fi
  wait "$SERVER" || echo "the server of $(basename "$dir") exited with an error: $(tail -n 3 "$dir/server.log")" >&2
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
  "$BIN/cohort-server" rounds --state "$dir/server" --json >"$dir/rounds.json"
}

run_answering() { # NAME ATTACK: an enrolled attacker answering every request
  local dir="$WORK/$1"
  setup "$dir" $((HONEST + 1))
  start_server "$dir"
  sleep 2
  hostile "$dir" "$2"
  sleep 1
  start_honest "$dir"
  finish "$dir"
}

echo "hostile-bench: $ROUNDS secure rounds per scenario, $HONEST honest clients, binaries in $BIN" >&2
setup "$WORK/a-baseline" "$HONEST"
start_server "$WORK/a-baseline"
sleep 2
start_honest "$WORK/a-baseline"
finish "$WORK/a-baseline"
echo "(a) done" >&2

run_answering b-decline decline
echo "(b) done" >&2
run_answering c-wrong-phase wrong-phase
echo "(c) done" >&2

dir="$WORK/d-flood"
setup "$dir" "$HONEST"
start_server "$dir"
sleep 3
rss_now "$SERVER" >"$dir/resting"
# The bombs first (each is refused at once), then the flood: while it holds the cap of
# connections in their hello, new connections (bombs included) are refused before any byte.
hostile "$dir" length-bomb --count 100
wait "$HOSTILE" || true
hostile "$dir" --secs 15 flood --connections 100
wait "$HOSTILE" || true
start_honest "$dir"
# Bombs and a second flood once the first round is in, while the honest rounds run.
for _ in $(seq 1 120); do
  grep -q "round finished\|round complete" "$dir/server.log" && break
  sleep 0.5
done
hostile "$dir" length-bomb --count 100
wait "$HOSTILE" || true
hostile "$dir" --secs 15 flood --connections 100
finish "$dir"
echo "(d) done" >&2

python3 - "$WORK" "$ROUNDS" <<'PY'
import json, os, sys
work, rounds = sys.argv[1], int(sys.argv[2])
def load(name):
    d = os.path.join(work, name)
    samples = [tuple(map(int, l.split())) for l in open(os.path.join(d, "rss")) if l.strip()]
    rows = json.load(open(os.path.join(d, "rounds.json")))
    done = sum(1 for r in rows if r["status"] == "completed")
    # At 1 s: the server is up and waits for its clients (the first sample may be the shell
    # before it became the server).
    start = samples[min(1, len(samples) - 1)][0]
    peak = max(max(r, h) for r, h in samples)
    end = samples[-1][0]
    log = open(os.path.join(d, "server.log"), "rb").read()
    resting = os.path.join(d, "resting")
    return dict(done=done, start=start, peak=peak, end=end, esc=log.count(b"\x1b"),
                resting=int(open(resting).read()) if os.path.exists(resting) else None)
mb = lambda kb: kb / 1024
a, b, c, d = (load(n) for n in ["a-baseline", "b-decline", "c-wrong-phase", "d-flood"])
print(f"{'scenario':<30} {'rounds':>9} {'RSS start':>10} {'max':>9} {'end':>9} {'max vs ref':>11} {'end vs ref':>11} {'ESC in log':>10}")
rows = [("(a) baseline", a, a, "a"), ("(b) 4 MB decline every round", b, a, "a"),
        ("(c) 4 MB wrong phase", c, a, "a"), ("(d) flood + length bombs", d, None, "resting")]
ok = True
for name, s, ref, against in rows:
    if ref is None:
        dmax, dend, limit = s["peak"] - s["resting"], s["end"] - s["resting"], 100 * 1024
    else:
        dmax, dend, limit = s["peak"] - ref["peak"], s["end"] - ref["end"], 50 * 1024
    good = s["done"] == rounds and dmax <= limit and dend <= limit and s["esc"] == 0
    ok &= good
    print(f"{name:<30} {s['done']:>4}/{rounds:<4} {mb(s['start']):>8.1f}MB {mb(s['peak']):>7.1f}MB {mb(s['end']):>7.1f}MB"
          f" {mb(dmax):>+9.1f}MB {mb(dend):>+9.1f}MB {s['esc']:>10}  {'ok' if good else 'FAIL'} (vs {against})")
print(f"(d) resting RSS {mb(d['resting']):.1f} MB; limits: (b), (c) within 50 MB of (a), (d) within 100 MB of resting")
print("hostile-bench:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
