#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, in one run, on a machine with an NVIDIA GPU and the
# binaries of scripts/build-cuda.sh (built elsewhere is fine: x86-64 Linux, same libraries).
#
#   scripts/gpu-check.sh [BIN_DIR] [OUT_DIR]     # defaults: target/cuda/release, gpu-check-out
#
# 1. MNIST CNN local training steps per second on the CPU and on cuda:0, at batch 10 (the
#    McMahan et al. client) and batch 50;
# 2. scenarios/mnist-cnn-gpu.toml: 10 secure rounds whose 100 clients train on cuda:0.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/cuda/release}
OUT=${2:-gpu-check-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
for device in cpu cuda:0; do
    for batch in 10 50; do
        "$BIN/cohort-sim" train-bench --model mnist-cnn --device "$device" --batch-size "$batch" --runs 5 \
            | tee -a "$OUT/train-bench.txt"
    done
done
"$BIN/cohort-sim" train-bench --model mnist-2nn --device cuda:0 --epochs 10 --runs 5 | tee -a "$OUT/train-bench.txt"
"$BIN/cohort-sim" run scenarios/mnist-cnn-gpu.toml --out "$OUT/mnist-cnn-gpu" | tee "$OUT/mnist-cnn-gpu.txt"
