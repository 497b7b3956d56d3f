"""Draft throughput with 1 and 2 `kiln worker` processes on one database (stdlib only).

Usage: python benches/scale_out_bench.py MODEL_DIR [--kiln target/release/kiln] [--size 256]
       [--jobs 12] [--workers 1,2] [--database postgres://...]

MODEL_DIR: a diffusers folder (benches/make_sd_turbo_random.py makes the SD-Turbo-shaped one;
tests/fixtures/pipelines/sd1/model is the tiny one). For each worker count, a fresh project whose
`draft` tier is MODEL_DIR at SIZE², 1 step, no CFG; `kiln serve --no-worker` takes the jobs and
N `kiln worker --device cpu` processes run them. Each worker first runs one untimed draft (model
load), then JOBS drafts are submitted at once and timed from the first submission to the last
job done; an SSE client per job records when the server relays the worker's `started` event
(against the claim time in the queue row: the cross-process event latency). Without --database the project's own SQLite library is shared by the processes; with
it (a database the benchmark may write to; its tables are created, and jobs accumulate), the
queue is in PostgreSQL. Prints one JSON object: seconds, jobs/s and the speed-up over 1 worker.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from serve_bench import draft_tier, get, post, start_server  # same folder: shared bench helpers

REPO = Path(__file__).resolve().parent.parent


def wait(base, ids):
    for j in ids:
        while True:
            state = get(base, f"/v1/jobs/{j}")["state"]
            if state in ("done", "failed", "cancelled"):
                if state != "done":
                    raise SystemExit(f"job {j} ended {state}")
                break
            time.sleep(0.02)


def run(a, model, workers):
    proj = Path(tempfile.mkdtemp(prefix="kiln-scale-bench-"))
    (proj / "kiln.toml").write_text(draft_tier(model, a.size))
    env = dict(os.environ, KILN_PROJECT=str(proj), KILN_LOG="warn")
    if a.database:
        env["KILN_DATABASE_URL"] = a.database
    server, base = start_server(a.kiln, env, ["--no-worker"])
    procs = [subprocess.Popen([a.kiln, "worker", "--device", "cpu", "--name", f"bench{w}",
                               "--heartbeat-seconds", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for w in range(workers)]
    try:
        draft = lambda seed: {"kind": "generate", "tier": "draft", "prompt": "a kiln at dusk", "seed": seed}
        # Warm every worker: one draft each, submitted together (each loads the model once).
        warm = [post(base, "/v1/jobs", draft(s))["id"] for s in range(workers)]
        wait(base, warm)
        while True:  # every worker must have loaded the model, not one having run all warm-ups
            listed = get(base, "/v1/workers")["workers"]
            if sum(1 for w in listed if w["id"].startswith("bench") and w["warm_models"]) >= workers:
                break
            extra = [post(base, "/v1/jobs", draft(1000 + s))["id"] for s in range(workers)]
            wait(base, extra)
        t0 = time.perf_counter()
        ids = [post(base, "/v1/jobs", draft(100 + i))["id"] for i in range(a.jobs)]
        # Relay latency: when an SSE client of the server sees `started` for a job a worker
        # process claimed, against the claim's own time (the queue row's started_at; same clock).
        seen = {}
        listeners = [threading.Thread(target=listen, args=(base, j, seen), daemon=True) for j in ids]
        [t.start() for t in listeners]
        wait(base, ids)
        seconds = time.perf_counter() - t0
        [t.join(timeout=10) for t in listeners]
        relay = sorted(seen[j] - get(base, f"/v1/jobs/{j}")["started_at"] for j in ids if j in seen)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        server.terminate()
        server.wait()
    return seconds, relay


def listen(base, job, seen):
    """Records when this client first sees the job's `started` event."""
    with urllib.request.urlopen(f"{base}/v1/jobs/{job}/events", timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and '"event":"started"' in line.replace(" ", ""):
                seen[job] = time.time()
            if line.startswith("data: ") and any(f'"event":"{e}"' in line.replace(" ", "")
                                                 for e in ("done", "failed", "cancelled")):
                return


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--kiln", default=str(REPO / "target/release/kiln"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--database")
    a = ap.parse_args()
    model = Path(a.model).resolve()
    out = {"model": str(model), "size": a.size, "jobs": a.jobs,
           "database": "postgres" if a.database else "sqlite", "runs": []}
    for n in [int(x) for x in a.workers.split(",")]:
        s, relay = run(a, model, n)
        out["runs"].append({"workers": n, "seconds": s, "jobs_per_second": a.jobs / s,
                            "relay_started_ms_p50": 1e3 * relay[len(relay) // 2] if relay else None,
                            "relay_started_ms_max": 1e3 * relay[-1] if relay else None,
                            "relay_samples": len(relay)})
    first = out["runs"][0]["jobs_per_second"]
    for r in out["runs"]:
        r["speed_up"] = r["jobs_per_second"] / first
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
