#!/usr/bin/env bash
# Builds kiln for CUDA on a machine without a GPU and packs what the device machine needs into .dev/:
#   .dev/kiln.xz            the CLI (`kiln`), xz-compressed
#   .dev/tests/*.xz         the CUDA-enabled test binaries of kiln-core and kiln-kernels
#   .dev/manifest.txt       what was built, from which commit and source root, with which features
# Usage: scripts/build-cuda.sh [--no-cudnn] [--no-tests]
# Then carry `.dev` (and `.whl` for the diffusers wheels) to the device and run benches/gpu/run.sh there.
# flash-attn is not built: its kernels take hours to compile on two cores (see docs/gpu.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CUDNN=1 TESTS=1
for arg in "$@"; do
  case $arg in
    --no-cudnn) CUDNN=0 ;;
    --no-tests) TESTS=0 ;;
    *) echo "build-cuda.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
FEATURES=cuda
[ $CUDNN = 1 ] && FEATURES=cuda,cudnn
eval "$(KILN_CUDNN=$CUDNN scripts/cuda-toolkit.sh)"
# A target dir of its own: the CUDA build's RUSTFLAGS and features would otherwise evict the CPU build's
# artifacts (and hold the cargo lock for the whole build).
export CARGO_TARGET_DIR=${KILN_CUDA_TARGET:-$ROOT/target/cuda}
NICE="nice -n ${KILN_BUILD_NICE:-10}"
DEV=$ROOT/.dev
mkdir -p "$DEV/tests"

start=$(date +%s)
$NICE cargo build --release -p kiln-cli --features "$FEATURES"
echo "build-cuda.sh: kiln built in $(( $(date +%s) - start )) s" >&2

tests=()
if [ $TESTS = 1 ]; then
  # The same packages and features as the CLI build (kiln-cli too: its clap turns on syn's `full`,
  # and any feature difference under candle-kernels' build script rebuilds all its CUDA kernels).
  core_features=kiln-core/cuda,kiln-kernels/cuda
  [ $CUDNN = 1 ] && core_features=$core_features,kiln-core/cudnn
  mapfile -t tests < <($NICE cargo test --release -p kiln-core -p kiln-kernels -p kiln-cli --features "$core_features" \
      --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        print(m["executable"])')
  [ ${#tests[@]} -gt 0 ] || { echo "build-cuda.sh: no test binaries (run the cargo test command by hand to see why)" >&2; exit 1; }
  echo "build-cuda.sh: everything built in $(( $(date +%s) - start )) s" >&2
fi

rm -f "$DEV"/kiln.xz "$DEV"/tests/*.xz
xz -T2 -6 -c "$CARGO_TARGET_DIR/release/kiln" > "$DEV/kiln.xz"
# Only the suites benches/gpu/run.sh runs (the carry limit is 64 MiB in all).
WANTED=" ${KILN_DEVICE_TESTS:-kiln_kernels pipelines vae} "
packed=()
for t in "${tests[@]}"; do
  # cargo names test binaries <target>-<hash>: keep the target's name only
  name=$(basename "$t"); name=${name%-*}
  case $WANTED in *" $name "*) ;; *) continue ;; esac
  xz -T2 -6 -c "$t" > "$DEV/tests/$name.xz"
  packed+=("$t")
done
tests=("${packed[@]}")
{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (dirty)')"
  echo "source_root $ROOT"
  echo "features $FEATURES"
  echo "cuda_compute_cap $CUDA_COMPUTE_CAP"
  echo "nvcc $(nvcc --version | tail -n 2 | head -n 1)"
  echo "built $(date -u +%FT%TZ)"
} > "$DEV/manifest.txt"
ldd_needed=$(readelf -d "$CARGO_TARGET_DIR/release/kiln" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')
echo "needed $ldd_needed" >> "$DEV/manifest.txt"
echo "build-cuda.sh: packed (raw -> xz):" >&2
for f in "$CARGO_TARGET_DIR/release/kiln" "${tests[@]}"; do
  name=$(basename "$f"); [ "$name" = kiln ] || name=tests/${name%-*}
  printf '  %-28s %6.1f MB -> %5.1f MB\n' "$name" "$(du -m --apparent-size "$f" | cut -f1)" \
    "$(echo "scale=1; $(stat -c %s "$DEV/$name.xz") / 1048576" | bc)" >&2
done
total=$(du -sb "$DEV" | cut -f1)
echo "build-cuda.sh: .dev holds $((total / 1048576)) MiB (the device tool carries at most 64 MiB in all)" >&2
[ "$total" -lt $((60 * 1048576)) ] || { echo "build-cuda.sh: .dev is too large to carry" >&2; exit 1; }
