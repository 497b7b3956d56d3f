#!/usr/bin/env bash
# Only-masked inpainting of a 200 px spot on a 4K canvas vs a draft at the crop's processing size
# (the model's native 512 x 512), same model, steps and device, in one run. Reports wall time and
# peak host memory of each and their ratios. Not a test: numbers go to benches/RESULTS.md.
# Usage: benches/inpaint_only_masked.sh [DEVICE (cpu|cuda)] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}
STEPS=${2:-4}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FEATURES=""
[ "$DEVICE" = cuda ] && FEATURES="--features cuda"
cargo build --release -q -p kiln-cli $FEATURES
KILN=target/release/kiln
"$PY" benches/make_inpaint_bench_model.py "$WORK/model" >/dev/null 2>&1
"$PY" - "$WORK" <<'PYEOF'
import sys
import numpy as np
from PIL import Image
work = sys.argv[1]
y, x = np.mgrid[0:2160, 0:3840]
img = np.stack([(x * 255 // 3839), (y * 255 // 2159), ((x + y) % 256)], -1).astype(np.uint8)
Image.fromarray(img).save(f"{work}/canvas.png")
mask = np.zeros((2160, 3840), np.uint8)
mask[1000:1200, 2500:2700] = 255  # a 200 x 200 spot
Image.fromarray(mask, mode="L").save(f"{work}/mask.png")
PYEOF
common=(--model "$WORK/model" --steps "$STEPS" --seed 1 --device "$DEVICE" --json)
# Warm-up (page cache, weight hashes) so neither run pays first-touch costs.
"$KILN" generate "${common[@]}" --prompt "warm up" --width 512 --height 512 --out "$WORK/warm.png" >/dev/null
draft=$("$KILN" generate "${common[@]}" --prompt "a red fox" --width 512 --height 512 --out "$WORK/draft.png")
inpaint=$("$KILN" inpaint "$WORK/canvas.png" --mask "$WORK/mask.png" "${common[@]}" --prompt "a red fox" --out "$WORK/inpainted.png")
"$PY" - "$draft" "$inpaint" <<'PYEOF'
import json, sys
d, i = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"plan: {i['plan']}")
print(f"{'':28}{'draft 512x512':>16}{'only-masked 4K':>16}{'ratio':>8}")
for label, a, b in [
    ("total s (incl. load, I/O)", d["seconds"]["total"], i["seconds"]["total"]),
    ("pipeline s", d["seconds"]["generate"], i["seconds"]["inpaint"]),
    ("denoising s", sum(d["seconds"]["steps"]), sum(i["seconds"]["steps"])),
    ("peak host MiB", d["peak_memory_bytes"] / 2**20, i["peak_memory_bytes"] / 2**20),
]:
    print(f"{label:28}{a:16.2f}{b:16.2f}{b / a:8.2f}")
PYEOF
