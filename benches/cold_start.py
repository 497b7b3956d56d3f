"""Cold start, kiln vs diffusers, same run: load time, the first image of a fresh process, peak RSS.

Each measured run is a fresh process making one image (kiln: `kiln generate --json`; diffusers:
this script with --peer, which loads the pipeline with `DiffusionPipeline.from_pretrained` and
calls it once). Three tools: kiln as shipped (pre-laid-out weights mapped from its layout cache),
kiln with `KILN_LAYOUT_CACHE=off` (every weight read out of the safetensors files and laid out
at load), and diffusers. Two page-cache states:
- warm: the files were read moments before (one untimed run per tool first, which for kiln also
  writes its layout cache);
- cold: the OS page cache is dropped before every run (`echo 3 > /proc/sys/vm/drop_caches`:
  needs root; skipped with a note otherwise). The time the disk needs to read the weights once is
  measured the same way (a cold `cat` of the weight files) and printed beside it.
Figures are the minimum over --repeats runs; peak RSS is each process's maxrss (wait4).
`process` is the whole process (start to exit, interpreter and imports included), `load` each
tool's own load figure, `first image` the generation after the load.

Usage:
    python benches/make_sd_turbo_random.py MODEL_DIR --bpe ...   # or make_sdxl_random.py
    cargo build --release -p kiln-cli
    python benches/cold_start.py MODEL_DIR [--width 256 --height 256 --steps 1 --repeats 3]
        [--data-dir DIR (kiln's data dir for the runs: its layout cache lives there)]
Needs a venv with torch + diffusers + transformers (never a dependency of the tests).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def peer(args):
    """diffusers in this process: load, one image, print JSON."""
    t0 = time.perf_counter()
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(args.threads)
    t1 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    t2 = time.perf_counter()
    pipe(args.prompt, width=args.width, height=args.height, num_inference_steps=args.steps,
         guidance_scale=args.guidance, generator=torch.Generator().manual_seed(0))
    t3 = time.perf_counter()
    print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2}))


def timed(cmd, env):
    """Runs cmd; returns (stdout, wall seconds, maxrss MB)."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = status
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if status != 0:
        raise SystemExit(f"{cmd[0]} failed ({status}): {err[-2000:]}")
    return out, wall, usage.ru_maxrss / 1024


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_caches():
    try:
        drop_caches()
        return True
    except OSError:
        return False


def weight_files(model_dir):
    return [os.path.join(d, f) for d, _, fs in os.walk(model_dir) for f in fs if f.endswith(".safetensors")]


def disk_read_seconds(files):
    drop_caches()
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return time.perf_counter() - t0


def run(tool, args, env):
    if tool == "diffusers":
        cmd = [sys.executable, os.path.abspath(__file__), "--peer", args.model_dir, "--width", str(args.width),
               "--height", str(args.height), "--steps", str(args.steps), "--guidance", str(args.guidance),
               "--threads", str(args.threads), "--prompt", args.prompt]
        out, wall, rss = timed(cmd, env)
        r = json.loads(out.strip().splitlines()[-1])
        return {"process_s": wall, "load_s": r["load_s"], "first_image_s": r["first_image_s"], "rss_mb": rss}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.kiln, "generate", "--model", args.model_dir, "--prompt", args.prompt, "--width", str(args.width),
               "--height", str(args.height), "--steps", str(args.steps), "--guidance", str(args.guidance),
               "--seed", "0", "--device", "cpu", "--dtype", "f32", "--json", "--out", os.path.join(tmp, "k.png")]
        out, wall, rss = timed(cmd, env)
    r = json.loads(out)
    return {"process_s": wall, "load_s": r["seconds"]["load"], "first_image_s": r["seconds"]["generate"],
            "rss_mb": rss}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--data-dir", help="kiln's data dir for the runs (default: a temporary one)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tools", nargs="+", default=["kiln", "kiln-no-cache", "diffusers"])
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    args = ap.parse_args()
    if args.peer:
        return peer(args)

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="kiln-cold-start-")
    base = dict(os.environ, KILN_DATA_DIR=data_dir, RAYON_NUM_THREADS=str(args.threads))
    envs = {"kiln": base, "kiln-no-cache": dict(base, KILN_LAYOUT_CACHE="off"), "diffusers": base}
    cold_ok = can_drop_caches()
    results = {}
    for tool in args.tools:
        run(tool, args, envs[tool])  # untimed: page cache, kiln's hash and layout caches
        warm = [run(tool, args, envs[tool]) for _ in range(args.repeats)]
        cold = []
        if cold_ok:
            for _ in range(args.repeats):
                drop_caches()
                cold.append(run(tool, args, envs[tool]))
        results[tool] = {"warm": warm, "cold": cold}
    disk = disk_read_seconds(weight_files(args.model_dir)) if cold_ok else None

    size = sum(os.path.getsize(f) for f in weight_files(args.model_dir))
    print(f"{args.model_dir}: {size / 1e9:.2f} GB of weights; {args.width}x{args.height}, {args.steps} step(s), "
          f"CPU f32, {args.threads} threads; min over {args.repeats} fresh processes per cell")
    if disk is not None:
        print(f"disk: reading the weight files once from a dropped page cache takes {disk:.2f} s")
    else:
        print("cold page cache: not measured (dropping the page cache needs root)")
    print(f"{'tool':<15}{'cache':<6}{'load s':>8}{'first image s':>15}{'process s':>11}{'peak RSS MB':>13}")
    summary = {}
    for tool, r in results.items():
        for state in ["warm", "cold"]:
            runs = r[state]
            if not runs:
                continue
            row = {k: min(x[k] for x in runs) for k in ["load_s", "first_image_s", "process_s", "rss_mb"]}
            summary[f"{tool}/{state}"] = row
            print(f"{tool:<15}{state:<6}{row['load_s']:>8.3f}{row['first_image_s']:>15.3f}{row['process_s']:>11.3f}"
                  f"{row['rss_mb']:>13.0f}")
    for state in ["warm", "cold"]:
        k, d = summary.get(f"kiln/{state}"), summary.get(f"diffusers/{state}")
        if k and d:
            print(f"{state}: kiln/diffusers load {k['load_s'] / d['load_s']:.2f}, process "
                  f"{k['process_s'] / d['process_s']:.2f}, peak RSS {k['rss_mb'] / d['rss_mb']:.2f}")
    print("JSON " + json.dumps({"disk_read_s": disk, "weights_bytes": size, "summary": summary, "runs": results}))


if __name__ == "__main__":
    main()
