"""The official `openai` client against `kiln serve`: list models, generate, edit with a mask
(OpenAI's convention: alpha 0 = the area to change) and stream partial images.

Usage: python openai_client.py BASE_URL OUT_DIR IMAGE.png MASK.png
Writes the first generated image to OUT_DIR/openai-0.png and prints one JSON line."""
import base64
import json
import sys

from openai import OpenAI

base, out, image_path, mask_path = sys.argv[1:5]
client = OpenAI(base_url=base + "/v1", api_key="no-keys-configured", max_retries=0, timeout=300)
result = {}

result["models"] = sorted(m.id for m in client.models.list().data)

gen = client.images.generate(model="draft", prompt="a red kiln", size="64x64", n=2, extra_body={"seed": 7})
result["generated"] = len(gen.data)
with open(f"{out}/openai-0.png", "wb") as f:
    f.write(base64.b64decode(gen.data[0].b64_json))

with open(image_path, "rb") as image, open(mask_path, "rb") as mask:
    edit = client.images.edit(model="final", image=image, mask=mask, prompt="a blue door", extra_body={"seed": 3})
edited = base64.b64decode(edit.data[0].b64_json)
result["edited_png"] = edited[:8] == b"\x89PNG\r\n\x1a\n"
with open(f"{out}/openai-edit.png", "wb") as f:
    f.write(edited)

events = []
stream = client.images.generate(
    model="final", prompt="a streamed kiln", size="64x64", stream=True, partial_images=2, extra_body={"seed": 5}
)
for event in stream:
    events.append(event.type)
    if event.type == "image_generation.completed":
        result["completed_png"] = base64.b64decode(event.b64_json)[:4] == b"\x89PNG"
result["stream_events"] = events

try:
    client.images.generate(model="no-such-tier", prompt="x")
    result["bad_model"] = "accepted"
except Exception as e:  # the client raises BadRequestError with the server's message
    result["bad_model"] = type(e).__name__ + ": " + str(e)

print(json.dumps(result))
