#!/usr/bin/env bash
# Runs kiln's CUDA kernels (attention.cu, group_norm.cu; f32 entry points) on the CPU through a
# one-OS-thread host emulation of CUDA (cuda_emu.h: each CUDA thread a coroutine, barriers for
# __syncthreads and warp shuffles) and checks them against double-precision references.
# It tests the kernels' indexing, masking, tiling and reductions without a GPU; it does not test
# what nvcc makes of them (the GPU tests in kernels/src/cuda/tests.rs do). Needs g++ >= 12.
#   kernels/cuda/emu/run.sh              (one CPU thread, ~1 min)
set -euo pipefail
cd "$(dirname "$0")"
FLAGS=(-std=c++17 -O2 -Ishim)
OUT=${TMPDIR:-/tmp}/kiln-cuda-emu-$$
${CXX:-g++} "${FLAGS[@]}" -o "$OUT" emu_test.cpp
trap 'rm -f "$OUT"' EXIT
"$OUT"
