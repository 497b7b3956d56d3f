"""kiln vs diffusers on CPU, same run: FLUX.1 and Z-Image transformers, T5-XXL and Qwen3-4B encoders at
full width and reduced depth (random weights, f32), per block and per whole forward (one step of the
reduced model), with an extrapolation to full depth.

For each model and round: benches/diffusers_flux_zimage.py (diffusers / transformers) and the
`flux_zimage_bench` example (kiln), one process each, one after the other (the order alternates
between rounds), so that only one model is in memory at a time. Per round and tool: a block kind's
time is the mean over the blocks of that kind of each block's fastest repeat; a step is the fastest
whole forward. Tables give the range over rounds (lo–hi) and the ratio of each round's kiln to
diffusers (lo–hi).

Extrapolated to full depth (not measured): step at full depth = (measured step − the measured blocks)
+ full block counts × per-block time, with FLUX.1 19 double + 38 single, Z-Image-Turbo 2 noise
refiner + 2 context refiner + 30 main, T5-XXL 24, Qwen3-4B 36 layers run by transformers (Z-Image keeps
hidden_states[-2] but computes every layer) and 35 by kiln (it stops after the layer it keeps).

Usage:
    python benches/make_flux_zimage_random.py MODELS_DIR        # once, ~10 GB
    cargo build --release -p kiln-core --example flux_zimage_bench
    python benches/flux_zimage_cpu.py MODELS_DIR [--models flux zimage t5 qwen3] [--repeats 2] [--rounds 2]
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KILN = os.path.join(ROOT, "target", "release", "examples", "flux_zimage_bench")

FULL = {
    "flux": {"double": 19, "single": 38},
    "zimage": {"noise_refiner": 2, "context_refiner": 2, "layers": 30},
    "t5": {"block": 24},
    "qwen3": {"layers": 36},
}
# kiln's Qwen3 encoder runs one layer fewer than transformers (see the module docs).
KILN_FULL_OFFSET = {"qwen3": {"layers": -1}}


def run(cmd):
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def reduce(result):
    """{kind: mean of per-block fastest repeats}, fastest step, measured-blocks total, depth."""
    kinds = {}
    for name, ts in result["blocks"].items():
        kinds.setdefault(name.rsplit(".", 1)[0], []).append(min(ts))
    per_kind = {k: sum(v) / len(v) for k, v in kinds.items()}
    blocks_sum = sum(sum(v) for v in kinds.values())
    return {"kinds": per_kind, "step": min(result["step"]), "blocks_sum": blocks_sum, "depth": result["depth"]}


def extrapolate(model, tool, r):
    full = dict(FULL[model])
    if tool == "kiln":
        for k, d in KILN_FULL_OFFSET.get(model, {}).items():
            full[k] += d
    overhead = r["step"] - r["blocks_sum"]
    return overhead + sum(n * r["kinds"][k] for k, n in full.items())


def span(xs, fmt="{:.0f}"):
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models_dir")
    ap.add_argument("--models", nargs="*", default=["flux", "zimage", "t5", "qwen3"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kiln", default=KILN)
    ap.add_argument("--json-out", help="also write every raw result here")
    args = ap.parse_args()
    py = [sys.executable, os.path.join(HERE, "diffusers_flux_zimage.py"), args.models_dir]
    raw = []
    rows = []
    for model in args.models:
        per_round = []
        for rnd in range(args.rounds):
            cmds = {"diffusers": py + [model, "--repeats", str(args.repeats)],
                    "kiln": [args.kiln, args.models_dir, model, str(args.repeats)]}
            order = ["diffusers", "kiln"] if rnd % 2 == 0 else ["kiln", "diffusers"]
            got = {}
            for tool in order:
                got[tool] = run(cmds[tool])
                raw.append(got[tool])
                print(f"# {model} round {rnd + 1} {tool}: step {min(got[tool]['step']):.0f} ms", file=sys.stderr,
                      flush=True)
            per_round.append({t: reduce(r) for t, r in got.items()})
        k0 = per_round[0]
        for kind in k0["kiln"]["kinds"]:
            ks = [r["kiln"]["kinds"][kind] for r in per_round]
            ds = [r["diffusers"]["kinds"][kind] for r in per_round]
            rs = [k / d for k, d in zip(ks, ds)]
            rows.append([model, f"{kind} block (per block)", span(ks), span(ds), span(rs, "{:.2f}")])
        kd = k0["kiln"]["depth"]
        dd = k0["diffusers"]["depth"]
        depth = ", ".join(f"{k} {kd[k]}" + ("" if kd[k] == dd[k] else f" (diffusers {dd[k]})") for k in kd)
        ks = [r["kiln"]["step"] for r in per_round]
        ds = [r["diffusers"]["step"] for r in per_round]
        rows.append([model, f"whole forward, measured ({depth})", span(ks), span(ds),
                     span([k / d for k, d in zip(ks, ds)], "{:.2f}")])
        ke = [extrapolate(model, "kiln", r["kiln"]) for r in per_round]
        de = [extrapolate(model, "diffusers", r["diffusers"]) for r in per_round]
        full = ", ".join(f"{k} {n}" for k, n in FULL[model].items())
        rows.append([model, f"*full depth, extrapolated* ({full})", span(ke), span(de),
                     span([k / d for k, d in zip(ke, de)], "{:.2f}")])
    print("| model | what | kiln ms | diffusers ms | kiln / diffusers |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    threads = {r["tool"]: r["threads"] for r in raw}
    print(f"\nthreads: {threads}; repeats {args.repeats}, rounds {args.rounds}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
