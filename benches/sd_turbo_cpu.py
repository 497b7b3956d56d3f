"""kiln vs diffusers on CPU, same run, same full-size SD-Turbo-shaped pipeline (random weights).

Runs diffusers (benches/diffusers_sd_turbo.py, one process: warm-up + repeats) and kiln two ways:
- warm, like diffusers: one process, one untimed image then the repeats (`kiln bench --warmup 1`
  on a temporary project whose tier is this model and these settings);
- cold, as a one-shot CLI user sees it: `kiln generate` per image, each a fresh process (after one
  untimed run to warm the OS file cache), timed by its own --json report.
diffusers' cold times are its warm-up image in `repeats` fresh processes. Prints per-stage seconds (min) and
the kiln/diffusers ratios, warm against warm and cold against cold.

Usage:
    python benches/make_sd_turbo_random.py MODEL_DIR     # once, ~5 GB
    cargo build --release -p kiln-cli
    python benches/sd_turbo_cpu.py MODEL_DIR [--width 256 --height 256 --steps 1 --repeats 3]
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


def run_kiln_warm(args, project_dir):
    """kiln in one process: one untimed image, then `repeats` timed ones (fastest per stage)."""
    with open(os.path.join(project_dir, "kiln.toml"), "w") as f:
        f.write(f"""[tiers.bench]
description = "benches/sd_turbo_cpu.py"
kind = "diffusion"
model = {json.dumps(os.path.abspath(args.model_dir))}
width = {args.width}
height = {args.height}
steps = {args.steps}
guidance = {args.guidance}
dtype = "f32"
price = {{ credits_per_image = 0.0 }}
""")
    cmd = [args.kiln, "bench", "--project", project_dir, "--tiers", "bench", "--device", "cpu", "--warmup", "1",
           "--repeats", str(args.repeats), "--json"]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(res.stdout)["results"][0]
    return {"text_encode_s": r["text_encode"], "unet_s": r["steps_total"], "vae_decode_s": r["vae_decode"],
            "total_s": r["per_image"], "load_s": r["load_warm"],
            "peak_rss_mb": (r["peak_host_memory_bytes"] or 0) / 2**20}


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
    # More fresh diffusers processes, for the first image's (cold) times.
    firsts = [diff["first_image"]]
    for _ in range(args.repeats - 1):
        d = subprocess.run([sys.executable, os.path.join(HERE, "diffusers_sd_turbo.py"), args.model_dir,
                            "--repeats", "1", "--threads", str(args.threads)] + common,
                           check=True, capture_output=True, text=True)
        firsts.append(json.loads(d.stdout.strip().splitlines()[-1])["first_image"])
    diff_cold = {stage: summary([f[stage] for f in firsts])
                 for stage in ["text_encode_s", "unet_s", "vae_decode_s", "total_s"]}

    with tempfile.TemporaryDirectory() as tmp:
        warm = run_kiln_warm(args, tmp)
        run_kiln(args, tmp)  # warm-up (page cache)
        runs = [run_kiln(args, tmp) for _ in range(args.repeats)]
    cold = {
        "load_s": summary([r["seconds"]["load"] for r in runs]),
        "text_encode_s": summary([r["seconds"]["text_encode"] for r in runs]),
        "unet_s": summary([sum(r["seconds"]["steps"]) for r in runs]),
        "vae_decode_s": summary([r["seconds"]["vae_decode"] for r in runs]),
        "total_s": summary([r["seconds"]["generate"] for r in runs]),
        "peak_rss_mb": max((r["peak_memory_bytes"] or 0) for r in runs) / 2**20,
    }
    print(f"SD-Turbo-shaped pipeline, random weights, CPU f32, {args.width}x{args.height}, {args.steps} step(s), "
          f"guidance {args.guidance}, {args.repeats} repeats, {diff['threads']} threads")
    print("warm = one process after an untimed image (diffusers: its own warm-up); cold = the first image "
          "of a fresh process (kiln: `kiln generate`; diffusers: the warm-up image). Min over the repeats.")
    print(f"{'stage':<14}{'kiln warm':>10}{'diff warm':>10}{'ratio':>7}{'kiln cold':>11}{'diff cold':>10}{'ratio':>7}")
    result = {"kiln_warm": warm, "kiln_cold": cold, "diffusers": diff, "diffusers_cold": diff_cold,
              "ratio_warm": {}, "ratio_cold": {}}
    for stage in ["text_encode_s", "unet_s", "vae_decode_s", "total_s"]:
        wm, dm = warm[stage], diff[stage]["min"]
        cm, dcm = cold[stage]["min"], diff_cold[stage]["min"]
        rw = wm / dm if dm else float("nan")
        rc = cm / dcm if dcm else float("nan")
        result["ratio_warm"][stage] = round(rw, 3)
        result["ratio_cold"][stage] = round(rc, 3)
        print(f"{stage[:-2]:<14}{wm:>10.3f}{dm:>10.3f}{rw:>7.2f}{cm:>11.3f}{dcm:>10.3f}{rc:>7.2f}")
    print(f"load s: kiln {cold['load_s']['min']:.3f} (fresh process), {warm['load_s']:.3f} (second load in a "
          f"process); diffusers {diff['load_s']:.3f}")
    print(f"peak RSS MB: kiln warm {warm['peak_rss_mb']:.0f}, kiln cold {cold['peak_rss_mb']:.0f}, "
          f"diffusers {diff['peak_rss_mb']:.0f}")
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
