#!/usr/bin/env bash
# Builds the CUDA binaries (cohort-client and cohort-sim with the `cuda` feature) on a Debian 12
# (bookworm) x86-64 machine without a GPU: installs the CUDA 11.8 toolkit from Debian's non-free
# section (nvcc for candle's kernels; the cuBLAS, cuRAND, NVRTC and driver libraries the binary
# links against), then builds into target/cuda/release.
#
#   scripts/build-cuda.sh [COMPUTE_CAP]      # default 80
#
# The kernels are PTX for compute capability COMPUTE_CAP; the driver compiles PTX for the GPU it
# runs on, so 80 serves Ampere (A100), Ada (L4, RTX 40xx) and Hopper (H100, H200) alike. CUDA
# 11.8 cannot target 90 itself: candle's kernel builder asks for compute_90a, which needs CUDA 12.
#
# Needs root for apt-get. On a machine that already has a CUDA toolkit (nvcc on PATH, libraries
# in the linker's path), skip to the cargo command at the end. At run time the machine needs the
# NVIDIA driver and the CUDA 11 libraries the binary names (`ldd target/cuda/release/cohort-client`).
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=${1:-${CUDA_COMPUTE_CAP:-80}}

if ! command -v nvcc >/dev/null; then
    if [ ! -f /etc/apt/sources.list.d/debian-nonfree.sources ]; then
        cat > /etc/apt/sources.list.d/debian-nonfree.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
fi
nvcc --version | tail -1

# candle's kernel build asks nvidia-smi for the compute capability unless it is given.
export CUDA_COMPUTE_CAP="$CAP"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release -p cohort-client -p cohort-scenarios --features cohort-client/cuda,cohort-scenarios/cuda
echo "built $CARGO_TARGET_DIR/release/cohort-client and cohort-sim for compute capability $CAP"
