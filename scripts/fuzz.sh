#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of our own for peer and file input (cargo-fuzz,
# libFuzzer): wire frames both ways (hellos of any version included), safetensors
# files, model specs, server.toml and run files, client.toml, CSV, IDX and .npy data, the client's
# privacy ledger. The targets live in fuzz/fuzz_targets/ (one per decoder). `.npz` archives and
# PNG/JPEG images are decoded by the zip and image crates behind our size checks, which have
# their own tests (damaged and oversized files); they have no target here.
#
# Needs the nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz --locked
#
# Usage:
#   scripts/fuzz.sh [options] [TARGET...]      # every target when none is named
#
#   -r, --runs N       executions per target (libFuzzer -runs; default 10000000)
#   -t, --time S       stop a target after S seconds (-max_total_time); with --runs, whichever
#                      comes first (default: no time limit)
#   -j, --jobs N       N fuzzing processes per target (-jobs=N -workers=N; default 1); each
#                      process runs the --runs executions
#   -n, --nice N       run under `nice -n N` (default 0)
#   -s, --sanitizer S  address (default) or none (faster, finds panics and OOMs only)
#   -l, --list         list the targets and exit
#   -- ARGS            passed to libFuzzer as they are (e.g. -- -seed=1 -timeout=30)
#
# Targets run one after another, each with its own -max_len, -rss_limit_mb=2048 and, for the
# text formats, a dictionary of their keys and edge values (fuzz/dicts). Corpora
# grow in fuzz/corpus/TARGET (ignored by git), seeded from fuzz/seeds/TARGET when it exists;
# crashes, timeouts and out-of-memory inputs land in fuzz/artifacts/TARGET/, with the run's log
# (fuzz/artifacts/TARGET/fuzz-DATE-PID.log). For each target the script prints the executions, the
# seconds, the final coverage (cov: edges, ft: features), the corpus size and whether it
# crashed; it exits 1 when any target crashed. Reproduce a crash with
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/crash-...
# and minimise it with `cargo +nightly fuzz tmin TARGET fuzz/artifacts/TARGET/crash-...`.
#
# The numbers in BENCHMARKS.md: scripts/fuzz.sh --runs 10000000 --time 1800 --nice 10
set -euo pipefail
cd "$(dirname "$0")/.."

# target:max_len (bytes):dictionary in fuzz/dicts (tokens libFuzzer splices in)
TARGETS=(
    ledger:65536:ledger.dict
    idx:1048576:
    csv:1048576:
    npy:1048576:npy.dict
    client_config_toml:65536:toml.dict
    server_config_toml:65536:toml.dict
    model_spec_toml:65536:toml.dict
    safetensors:1048576:
    frame_client_msg:65536:
    frame_server_msg:65536:
)

runs=10000000
time_limit=0
jobs=1
niceness=0
sanitizer=address
extra=()
chosen=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -r | --runs) runs=$2; shift 2 ;;
        -t | --time) time_limit=$2; shift 2 ;;
        -j | --jobs) jobs=$2; shift 2 ;;
        -n | --nice) niceness=$2; shift 2 ;;
        -s | --sanitizer) sanitizer=$2; shift 2 ;;
        -l | --list) for t in "${TARGETS[@]}"; do echo "${t%%:*}"; done; exit 0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) chosen+=("$1"); shift ;;
    esac
done

# field N (2: max_len, 3: dictionary) of target $1
field_of() {
    for t in "${TARGETS[@]}"; do
        if [[ ${t%%:*} == "$1" ]]; then cut -d: -f"$2" <<< "$t"; return; fi
    done
    echo "unknown target $1 (see --list)" >&2
    exit 2
}
if [[ ${#chosen[@]} -eq 0 ]]; then
    for t in "${TARGETS[@]}"; do chosen+=("${t%%:*}"); done
fi
for t in "${chosen[@]}"; do field_of "$t" 2 > /dev/null; done

run_nice=(nice -n "$niceness")
echo "building ${chosen[*]} (sanitizer: $sanitizer)" >&2
build_one=()
[[ ${#chosen[@]} -eq 1 ]] && build_one=("${chosen[0]}") # cargo fuzz builds one target or all
(cd fuzz && "${run_nice[@]}" cargo +nightly fuzz build --sanitizer "$sanitizer" "${build_one[@]}") >&2 \
    || { echo "build failed" >&2; exit 2; }
bin_dir=$PWD/fuzz/target/x86_64-unknown-linux-gnu/release

failed=0
printf '%-20s %12s %9s %8s %8s %8s  %s\n' target executions seconds cov ft corpus result
for target in "${chosen[@]}"; do
    corpus=$PWD/fuzz/corpus/$target
    artifacts=$PWD/fuzz/artifacts/$target
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    [[ -d fuzz/seeds/$target ]] && dirs+=("$PWD/fuzz/seeds/$target")
    log=$artifacts/fuzz-$(date +%Y%m%d-%H%M%S)-$$.log # one per run: runs never share a log
    args=(-runs="$runs" -max_len="$(field_of "$target" 2)" -rss_limit_mb=2048 -print_final_stats=1
        -artifact_prefix="$artifacts/")
    dict=$(field_of "$target" 3)
    [[ -n $dict ]] && args+=(-dict="$PWD/fuzz/dicts/$dict")
    [[ $time_limit -gt 0 ]] && args+=(-max_total_time="$time_limit")
    [[ $jobs -gt 1 ]] && args+=(-jobs="$jobs" -workers="$jobs")
    start=$(date +%s)
    rc=0
    if [[ $jobs -gt 1 ]]; then
        # libFuzzer writes each job's log as fuzz-N.log in the working directory.
        logs=$(mktemp -d)
        (cd "$logs" && "${run_nice[@]}" "$bin_dir/$target" "${args[@]}" "${extra[@]}" "${dirs[@]}") > "$log" 2>&1 \
            || rc=$?
        cat "$logs"/fuzz-*.log >> "$log" 2>/dev/null || true
        rm -rf "$logs"
    else
        "${run_nice[@]}" "$bin_dir/$target" "${args[@]}" "${extra[@]}" "${dirs[@]}" > "$log" 2>&1 || rc=$?
    fi
    seconds=$(($(date +%s) - start))
    execs=$(awk -F': *' '/^stat::number_of_executed_units/ { n += $NF } END { print n + 0 }' "$log")
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n 1 || true)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<< "$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<< "$last")
    size=$(find "$corpus" -type f | wc -l)
    if [[ $rc -eq 0 ]]; then
        result=ok
    else
        result="CRASH (exit $rc): $(grep -m1 -oE 'Test unit written to [^ ]+' "$log" | sed 's/Test unit written to //' || true)"
        failed=1
    fi
    printf '%-20s %12s %9s %8s %8s %8s  %s\n' "$target" "$execs" "$seconds" "${cov:-?}" "${ft:-?}" "$size" "$result"
done
exit "$failed"
