"""`kiln serve` against in-process generation, same run, same model (stdlib only).

Usage: python benches/serve_bench.py MODEL_DIR [--kiln target/release/kiln] [--size 256]
       [--final-steps 8] [--drafts 5] [--clients 5] [--per-client 10]

MODEL_DIR: a diffusers folder (benches/make_sd_turbo_random.py makes the SD-Turbo-shaped one).
Builds a throwaway project whose `draft` tier is MODEL_DIR at SIZE², 1 step, no CFG, and whose
`final` tier is the same model with --final-steps steps, then measures:
1. warm draft latency through the server (`POST /v1/images/generations`, after one untimed
   request, median of N) against the same jobs' wall time inside the engine (in-process
   generation: text encode, steps, decode, PNG write, library record); `kiln bench --warmup 1`'s
   per-image time (sum of each stage's fastest) is printed beside it;
2. draft latency while a final runs: drafts submitted while finals keep the worker busy; p50 and
   p95 against one draft + one final step (the preemption goal);
3. CLIENTS clients × PER_CLIENT drafts at once against the same drafts back to back.
Prints one JSON object; every figure is seconds unless named otherwise.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=3600) as r:
        return json.loads(r.read())


def draft_tier(model, size):
    """kiln.toml text of a `draft` tier: MODEL at SIZE², 1 step, no CFG."""
    return f"""
[tiers.draft]
model = "{model}"
width = {size}
height = {size}
steps = 1
guidance = 0.0
scheduler = "euler"
"""


def start_server(kiln, env, extra=()):
    """`kiln serve` on a free loopback port: (process, base URL)."""
    server = subprocess.Popen([kiln, "serve", "--listen", "127.0.0.1:0", "--device", "cpu", *extra], env=env,
                              stderr=subprocess.PIPE, text=True)
    base = None
    for line in server.stderr:
        if line.startswith("kiln serve: listening on "):
            base = line.split("listening on ")[1].strip()
            break
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    return server, base


def percentile(values, p):
    v = sorted(values)
    k = max(0, min(len(v) - 1, round(p / 100 * (len(v) - 1))))
    return v[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--kiln", default=str(REPO / "target/release/kiln"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--final-steps", type=int, default=8)
    ap.add_argument("--drafts", type=int, default=5)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--per-client", type=int, default=10)
    a = ap.parse_args()
    model = Path(a.model).resolve()
    proj = Path(tempfile.mkdtemp(prefix="kiln-serve-bench-"))
    (proj / "kiln.toml").write_text(draft_tier(model, a.size) + f"""
[tiers.final]
model = "{model}"
width = {a.size}
height = {a.size}
steps = {a.final_steps}
guidance = 0.0
scheduler = "euler"
""")
    env = dict(os.environ, KILN_PROJECT=str(proj), KILN_LOG="warn")
    out = {"model": str(model), "size": a.size, "final_steps": a.final_steps}

    # 1. In-process, warm.
    r = subprocess.run([a.kiln, "bench", "--tiers", "draft", "--warmup", "1", "--repeats", str(a.drafts),
                        "--device", "cpu", "--json"], env=env, capture_output=True, text=True, check=True)
    bench = json.loads(r.stdout)
    out["in_process_bench"] = bench.get("results")

    server, base = start_server(a.kiln, env)
    try:
        draft = lambda seed: {"model": "draft", "prompt": "a kiln at dusk", "seed": seed}
        post(base, "/v1/images/generations", draft(0))  # warm-up (loads the model)
        lat, inside = [], []
        for i in range(a.drafts):
            t0 = time.perf_counter()
            post(base, "/v1/images/generations", draft(i + 1))
            lat.append(time.perf_counter() - t0)
            # The same job's own wall time inside the engine (the in-process generation).
            job = get(base, "/v1/jobs?limit=1")["jobs"][0]
            inside.append(job["result"]["detail"]["seconds"]["total"])
        out["server_draft_seconds"] = lat
        out["server_draft_median"] = statistics.median(lat)
        out["engine_draft_seconds"] = inside
        out["engine_draft_median"] = statistics.median(inside)
        out["server_overhead"] = statistics.median(lat) / statistics.median(inside) - 1
        out["in_process_bench_per_image"] = (bench.get("results") or [{}])[0].get("per_image")

        # 2. Drafts while finals run.
        post(base, "/v1/jobs", {"kind": "generate", "tier": "final", "prompt": "warm", "seed": 0})
        while get(base, "/v1/jobs?limit=5")["jobs"][0]["state"] != "done":
            time.sleep(0.1)
        fin = get(base, "/v1/jobs?limit=1")["jobs"][0]["result"]
        final_step = statistics.median(fin["timings"]["steps"])
        out["final_step_seconds"] = final_step
        busy = [post(base, "/v1/jobs", {"kind": "generate", "tier": "final", "prompt": "busy", "seed": s})["id"]
                for s in range(3)]
        during = []
        for i in range(a.drafts):
            time.sleep(final_step * 1.5)
            t0 = time.perf_counter()
            post(base, "/v1/images/generations", draft(100 + i))
            during.append(time.perf_counter() - t0)
        out["draft_during_final_seconds"] = during
        out["draft_during_final_p50"] = percentile(during, 50)
        out["draft_during_final_p95"] = percentile(during, 95)
        out["goal_p95"] = out["server_draft_median"] + final_step
        for j in busy:
            while get(base, f"/v1/jobs/{j}")["state"] not in ("done", "failed", "cancelled"):
                time.sleep(0.1)

        # 3. Many clients at once vs back to back.
        n = a.clients * a.per_client
        t0 = time.perf_counter()
        for i in range(n):
            post(base, "/v1/images/generations", draft(1000 + i))
        out["back_to_back_seconds"] = time.perf_counter() - t0
        errors = []

        def client(c):
            for k in range(a.per_client):
                try:
                    post(base, "/v1/images/generations", draft(2000 + c * a.per_client + k))
                except Exception as e:  # recorded, not raised: every failure counts
                    errors.append(str(e))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        out["concurrent_seconds"] = time.perf_counter() - t0
        out["concurrent_errors"] = len(errors)
        out["concurrent_over_back_to_back"] = out["concurrent_seconds"] / out["back_to_back_seconds"]
    finally:
        server.terminate()
        server.wait()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
