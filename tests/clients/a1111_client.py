"""The AUTOMATIC1111 flow SillyTavern and Open WebUI use, with `requests`: options ->
sd-models -> txt2img (info parsed) -> poll progress -> interrupt.

Usage: python a1111_client.py BASE_URL [KEY]   (KEY: sent as HTTP Basic, as those clients do)
Prints one JSON line."""
import base64
import json
import sys
import threading
import time

import requests

base = sys.argv[1]
auth = ("kiln", sys.argv[2]) if len(sys.argv) > 2 else None
s = requests.Session()
s.auth = auth
result = {}

options = s.get(f"{base}/sdapi/v1/options", timeout=60).json()
result["checkpoint"] = options["sd_model_checkpoint"]
models = s.get(f"{base}/sdapi/v1/sd-models", timeout=60).json()
result["models"] = sorted(m["title"] for m in models)
s.post(f"{base}/sdapi/v1/options", json={"sd_model_checkpoint": "draft"}, timeout=60).raise_for_status()
result["samplers"] = [x["name"] for x in s.get(f"{base}/sdapi/v1/samplers", timeout=60).json()]

r = s.post(
    f"{base}/sdapi/v1/txt2img",
    json={"prompt": "a red kiln", "negative_prompt": "", "seed": 7, "steps": 2, "cfg_scale": 0,
          "width": 64, "height": 64, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1,
          "enable_hr": False, "restore_faces": False, "send_images": True, "save_images": False},
    timeout=300,
)
r.raise_for_status()
body = r.json()
info = json.loads(body["info"])
result["info_seed"] = info["seed"]
result["image_png"] = base64.b64decode(body["images"][0])[:4] == b"\x89PNG"
with open(sys.argv[3] if len(sys.argv) > 3 else "/dev/null", "wb") as f:
    f.write(base64.b64decode(body["images"][0]))

# A long final in a thread; poll progress until it moves, then interrupt it.
s.post(f"{base}/sdapi/v1/options", json={"sd_model_checkpoint": "final"}, timeout=60).raise_for_status()
holder = {}
t = threading.Thread(target=lambda: holder.update(r=s.post(f"{base}/sdapi/v1/txt2img",
                                                             json={"prompt": "slow", "seed": 1}, timeout=300)))
t.start()
seen = 0.0
deadline = time.time() + 120
while time.time() < deadline:
    p = s.get(f"{base}/sdapi/v1/progress", timeout=60).json()
    seen = max(seen, p["progress"])
    if 0 < p["progress"] < 1:
        break
    time.sleep(0.02)
result["progress_seen"] = seen
s.post(f"{base}/sdapi/v1/interrupt", timeout=60).raise_for_status()
t.join()
result["interrupted_status"] = holder["r"].status_code
print(json.dumps(result))
