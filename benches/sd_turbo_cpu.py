"""kiln vs diffusers on CPU, same run, same full-size SD-Turbo-shaped pipeline (random weights).

Runs diffusers (benches/diffusers_sd_turbo.py, one process: warm-up + repeats) and the kiln binary
(one warm-up + repeats, each a fresh process, timed by kiln's own --json report), then prints
per-stage seconds (min and median) and the kiln/diffusers ratio.

Usage:
    python benches/make_sd_turbo_random.py /work/cache/sd-turbo-random     # once, ~5 GB
    cargo build --release -p kiln-cli
    python benches/sd_turbo_cpu.py /work/cache/sd-turbo-random [--width 256 --height 256 --steps 1 --repeats 3]
Needs a venv with torch + diffusers + transformers (never a dependency of the tests).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def summary(xs):
    return {"min": round(min(xs), 4), "median": round(statistics.median(xs), 4)}


def run_kiln(args, out_dir):
    cmd = [args.kiln, "generate", "--model", args.model_dir, "--prompt", args.prompt, "--width", str(args.width),
           "--height", str(args.height), "--steps", str(args.steps), "--guidance", str(args.guidance),
           "--seed", "0", "--device", "cpu", "--dtype", "f32", "--json", "--out", os.path.join(out_dir, "kiln.png")]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    args = ap.parse_args()

    common = ["--width", str(args.width), "--height", str(args.height), "--steps", str(args.steps),
              "--guidance", str(args.guidance), "--prompt", args.prompt]
    d = subprocess.run([sys.executable, os.path.join(HERE, "diffusers_sd_turbo.py"), args.model_dir,
                        "--repeats", str(args.repeats), "--threads", str(args.threads)] + common,
                       check=True, capture_output=True, text=True)
    diff = json.loads(d.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        run_kiln(args, tmp)  # warm-up (page cache)
        runs = [run_kiln(args, tmp) for _ in range(args.repeats)]
    k = {
        "load_s": summary([r["seconds"]["load"] for r in runs]),
        "text_encode_s": summary([r["seconds"]["text_encode"] for r in runs]),
        "unet_s": summary([sum(r["seconds"]["steps"]) for r in runs]),
        "vae_decode_s": summary([r["seconds"]["vae_decode"] for r in runs]),
        "total_s": summary([r["seconds"]["generate"] for r in runs]),
        "peak_rss_mb": max((r["peak_memory_bytes"] or 0) for r in runs) / 2**20,
    }
    print(f"SD-Turbo-shaped pipeline, random weights, CPU f32, {args.width}x{args.height}, {args.steps} step(s), "
          f"guidance {args.guidance}, {args.repeats} repeats, {diff['threads']} threads")
    print(f"{'stage':<14}{'kiln min':>10}{'kiln med':>10}{'diffusers min':>15}{'diffusers med':>15}{'ratio(min)':>12}")
    result = {"kiln": k, "diffusers": diff, "ratio_min": {}}
    for stage in ["text_encode_s", "unet_s", "vae_decode_s", "total_s"]:
        km, dm = k[stage]["min"], diff[stage]["min"]
        ratio = km / dm if dm else float("nan")
        result["ratio_min"][stage] = round(ratio, 3)
        print(f"{stage[:-2]:<14}{km:>10.3f}{k[stage]['median']:>10.3f}{dm:>15.3f}{diff[stage]['median']:>15.3f}{ratio:>12.2f}")
    print(f"{'load':<14}{k['load_s']['min']:>10.3f}{'':>10}{diff['load_s']:>15.3f}")
    print(f"peak RSS MB: kiln {k['peak_rss_mb']:.0f}, diffusers {diff['peak_rss_mb']:.0f}")
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
