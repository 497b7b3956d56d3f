#!/usr/bin/env bash
# The whole GPU check in one command: unpack the CUDA binaries that
# scripts/build-cuda.sh packed into .dev/, run the parity tests on the device in f32/f16/bf16, then
# time kiln against diffusers/PyTorch on the same GPU. Results land in $OUT (the device tool brings
# back at most 8 files, so everything goes into these): env.txt, tests.log, bench.log, results.json.
#
# On the device machine (carry .dev and .whl; see docs/gpu.md):
#   benches/gpu/run.sh                      # tests + benchmarks, cuda
#   benches/gpu/run.sh --only tests         # or --only bench
# Here, without a GPU, to check the script: it runs the same CUDA binaries on the CPU (the driver
# stub from scripts/cuda-toolkit.sh stands in for libcuda.so.1; nothing touches CUDA), the CPU
# variants of the tests, and the benchmarks shrunk (--shrink) on the CPU:
#   benches/gpu/run.sh --device cpu --quick
#   benches/gpu/run.sh --dry-run            # print the commands only
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
DEVICE=cuda DRY=0 ONLY=all QUICK=0
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift ;;
    --dry-run) DRY=1 ;;
    --only) ONLY=$2; shift ;;
    --quick) QUICK=1 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$ROOT/out/gpu}
mkdir -p "$OUT"
WORK=${KILN_GPU_WORK:-/tmp/kiln-gpu}
BIN=$WORK/bin
RESULTS=$OUT/results.jsonl   # one JSON object per line; summarised into results.json at the end
: > "$RESULTS"

run() {  # run LOG CMD...: echo, then run (unless --dry-run), appending to LOG; returns the status
  local log=$1; shift
  echo "+ $*" | tee -a "$log" >&2
  [ $DRY = 1 ] && return 0
  "$@" >> "$log" 2>&1
}
note() { echo "$*" | tee -a "$OUT/env.txt" >&2; }
record() { [ $DRY = 1 ] || echo "$1" >> "$RESULTS"; }

# --- 1. binaries ---------------------------------------------------------------------------------
[ -f .dev/manifest.txt ] || { echo "run.sh: no .dev/manifest.txt: run scripts/build-cuda.sh and carry .dev" >&2; exit 1; }
: > "$OUT/env.txt"
cat .dev/manifest.txt >> "$OUT/env.txt"
mkdir -p "$BIN/tests"
if [ $DRY = 0 ]; then
  xz -dc .dev/kiln.xz > "$BIN/kiln" && chmod +x "$BIN/kiln"
  for t in .dev/tests/*.xz; do
    [ -e "$t" ] || continue
    name=$(basename "$t" .xz)
    xz -dc "$t" > "$BIN/tests/$name" && chmod +x "$BIN/tests/$name"
  done
fi
# Tests find fixtures through the source path compiled into them (CARGO_MANIFEST_DIR): make that
# path lead here.
SRC=$(sed -n 's/^source_root //p' .dev/manifest.txt)
if [ -n "$SRC" ] && [ "$SRC" != "$ROOT" ] && [ ! -e "$SRC" ] && [ $DRY = 0 ]; then
  mkdir -p "$(dirname "$SRC")" && ln -s "$ROOT" "$SRC"
fi

# --- 2. libraries ----------------------------------------------------------------------------------
if [ "$DEVICE" = cpu ]; then
  # The pip toolkit's libraries and its driver stub, so the CUDA build loads on a machine without one.
  eval "$(scripts/cuda-toolkit.sh)"
  STUB=$WORK/stub; mkdir -p "$STUB"; ln -sf "$KILN_CUDA_LINK/libcuda.so" "$STUB/libcuda.so.1"
  export LD_LIBRARY_PATH="$STUB:$CUDA_ROOT/lib:$(dirname "$CUDA_ROOT")/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  PY=${KILN_PEER_PYTHON:-python3}
else
  # The device's PyTorch venv carries CUDA 13's libraries as NVIDIA wheels (nvidia/cu13/lib, nvidia/cudnn/lib).
  PY=${KILN_PEER_PYTHON:-python3}
  LIBS=$($PY -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/lib/lib*.so*")})))' 2>/dev/null)
  export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi >> "$OUT/env.txt" 2>&1
fi
note "device $DEVICE; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
[ $DRY = 1 ] || { ldd "$BIN/kiln" | grep -E "cuda|cublas|curand|cudnn|nvrtc|not found" >> "$OUT/env.txt"; }

# --- 3. tests --------------------------------------------------------------------------------------
TLOG=$OUT/tests.log
: > "$TLOG"
test_case() {  # test_case LABEL BINARY [env...] -- [test args...]
  local label=$1 bin=$BIN/tests/$2; shift 2
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  if [ ! -x "$bin" ] && [ $DRY = 0 ]; then record "{\"test\":\"$label\",\"status\":\"missing\"}"; return; fi
  echo "=== $label" >> "$TLOG"
  local t0=$SECONDS
  run "$TLOG" env "${envs[@]}" "$bin" --test-threads 1 "$@"
  local rc=$?
  # libtest's summary line (per-test lines interleave with --nocapture output)
  local summary passed failed
  summary=$(sed -n "/^=== $label\$/,\$p" "$TLOG" | grep -E '^test result:' | tail -n 1)
  passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<< "$summary"); passed=${passed:-0}
  failed=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<< "$summary"); failed=${failed:-0}
  record "{\"test\":\"$label\",\"rc\":$rc,\"passed\":$passed,\"failed\":$failed,\"seconds\":$((SECONDS - t0))}"
}
if [ "$ONLY" = all ] || [ "$ONLY" = tests ]; then
  if [ "$DEVICE" = cpu ]; then
    # The stub driver cannot run CUDA: leave out the tests that open a CUDA device.
    SKIP=(--skip cuda --skip gpu_)
    DTYPES="f32 f16"      # candle's CPU matmul has no bf16
  else
    SKIP=()
    DTYPES="f32 f16 bf16"
  fi
  test_case kernels kiln_kernels -- "${SKIP[@]}"
  for dt in $DTYPES; do
    test_case "pipelines-$dt" pipelines KILN_TEST_DEVICE=$DEVICE KILN_TEST_DTYPE=$dt -- --nocapture "${SKIP[@]}"
  done
  test_case vae vae -- "${SKIP[@]}"
  # (precision and sr_tiling run on the CPU whatever the build: CI covers them; not carried.)
fi

# --- 4. benchmarks -----------------------------------------------------------------------------------
BLOG=$OUT/bench.log
: > "$BLOG"
if [ "$ONLY" = all ] || [ "$ONLY" = bench ]; then
  if [ "$DEVICE" = cpu ]; then
    SHRINK=(--shrink 16) DIV=8 DTYPE=f32 SDXL_STEPS=2 REPEATS=(--warmup 1 --repeats 1)
  else
    SHRINK=() DIV=1 DTYPE=f16 SDXL_STEPS=30 REPEATS=(--warmup 2 --repeats 5)
    # diffusers is not in the device image: install the carried wheels (pure Python).
    if ls .whl/*.whl > /dev/null 2>&1; then
      run "$BLOG" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
      export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  [ $QUICK = 1 ] && SDXL_STEPS=1
  # kiln: zero-weight models of the tiers' architectures; each tier three (SDXL: two) times in one
  # process, the first run being the warm-up (CUDA context, cuBLAS/cuDNN set-up).
  for tiers in draft,draft,draft final,final; do
    echo "=== kiln bench $tiers" >> "$BLOG"
    steps=(); [[ $tiers == final* ]] && steps=(--steps "$SDXL_STEPS")
    base=512; [[ $tiers == final* ]] && base=1024
    size=(); [ $DIV != 1 ] && size=(--size $((base / DIV)))
    if [ $DRY = 1 ]; then
      echo "+ kiln bench --synthetic --tiers $tiers --device $DEVICE --dtype $DTYPE ${SHRINK[*]} ${size[*]} ${steps[*]} --json" >&2
    else
      line=$("$BIN/kiln" bench --synthetic --tiers "$tiers" --device "$DEVICE" --dtype "$DTYPE" \
        "${SHRINK[@]}" "${size[@]}" "${steps[@]}" --json 2>> "$BLOG")
      echo "$line" >> "$BLOG"
      [ -n "$line" ] && record "{\"impl\":\"kiln\",\"bench\":\"$tiers\",\"report\":$line}"
    fi
  done
  # The PyTorch/diffusers peer on the same device (also writes the x4plus weights kiln loads).
  X4=$WORK/x4plus-random.safetensors
  if [ $DRY = 1 ]; then
    echo "+ $PY benches/gpu/peer.py --device $DEVICE --dtype $DTYPE --save-x4plus $X4 ..." >&2
  else
    $PY benches/gpu/peer.py --device "$DEVICE" --dtype "$DTYPE" "${SHRINK[@]}" --size-div $DIV \
      --sdxl-steps "$SDXL_STEPS" "${REPEATS[@]}" --save-x4plus "$X4" 2>> "$BLOG" | tee -a "$BLOG" |
      while read -r line; do record "$line"; done
  fi
  # kiln upscale: the same (random) x4plus weights, one 1024² image (CPU check: 128²), three copies
  # in one process (the first is the warm-up).
  side=$((1024 / DIV))
  mkdir -p "$WORK/up-in" "$WORK/up-out"
  if [ $DRY = 0 ]; then
    $PY -c "import numpy as np, PIL.Image as I, sys
rng = np.random.default_rng(0); s = int(sys.argv[1])
y, x = np.mgrid[0:s, 0:s] / s
img = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y), x * y], -1) * 0.4 + 0.5 + rng.normal(0, 0.05, (s, s, 3))
for i in range(3): I.fromarray((np.clip(img, 0, 1) * 255).astype('uint8')).save(sys.argv[2] + f'/in{i}.png')" "$side" "$WORK/up-in"
  fi
  echo "=== kiln upscale" >> "$BLOG"
  if [ $DRY = 1 ]; then
    echo "+ kiln upscale $WORK/up-in/in{0,1,2}.png --model $X4 --device $DEVICE --dtype $DTYPE --out $WORK/up-out --json" >&2
  elif [ -f "$X4" ]; then
    t0=$(date +%s.%N)
    report=$("$BIN/kiln" upscale "$WORK"/up-in/in0.png "$WORK"/up-in/in1.png "$WORK"/up-in/in2.png --model "$X4" \
      --device "$DEVICE" --dtype "$DTYPE" --out "$WORK/up-out" --json 2>> "$BLOG")
    rc=$?
    echo "$report" >> "$BLOG"
    record "{\"impl\":\"kiln\",\"bench\":\"upscale-x4plus\",\"rc\":$rc,\"wall_s\":$(echo "$(date +%s.%N) - $t0" | bc),\"report\":$($PY -c '
import json, sys
t = sys.stdin.read().strip()
try: print(json.dumps(json.loads(t)))
except ValueError: print(json.dumps(t))' <<< "$report")}"
  fi
fi

# --- 5. summary -------------------------------------------------------------------------------------
[ $DRY = 1 ] && exit 0
$PY - "$RESULTS" "$OUT/results.json" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tests = [r for r in rows if "test" in r]
def kiln_last(name):
    r = next((r for r in rows if r.get("impl") == "kiln" and r.get("bench") == name), None)
    rep = r and r.get("report")
    runs = rep.get("results") if isinstance(rep, dict) else rep if isinstance(rep, list) else None
    return runs[-1] if runs else rep
def peer(case):
    return next((r for r in rows if r.get("case") == case), None)
summary = {"tests_ok": all(t.get("rc") == 0 for t in tests) if tests else None, "tests": tests, "compare": {}}
for case, bench in (("sd-turbo", "draft,draft,draft"), ("sdxl", "final,final")):
    k, p = kiln_last(bench), peer(case)
    ks = k.get("per_image") if isinstance(k, dict) else None
    ps = p["seconds"]["median"] if p else None
    summary["compare"][case] = {"kiln_s": ks, "diffusers_s": ps, "ratio": (ks / ps) if ks and ps else None}
up = next((r for r in rows if r.get("bench") == "upscale-x4plus"), None)
rep = (up or {}).get("report")
outs = rep.get("outputs") if isinstance(rep, dict) else None
k_up = outs[-1].get("seconds") if outs else None  # the third image: warm
p_up = (peer("x4plus") or {}).get("seconds", {}).get("median")
summary["compare"]["x4plus"] = {"kiln_s": k_up, "pytorch_s": p_up, "ratio": (k_up / p_up) if k_up and p_up else None,
                                "kiln_wall_3_images_s": up and up.get("wall_s")}
summary["raw"] = rows
json.dump(summary, open(sys.argv[2], "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=1))
PYEOF
rm -f "$RESULTS"
