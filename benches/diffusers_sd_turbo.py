"""Times diffusers' StableDiffusionPipeline on CPU (f32), stage by stage: the peer side of kiln's benchmark.

It runs the real pipeline call (pipe(...)), and splits its time with wrappers around the text
encoder's forward, the UNet's forward (one call = one step, both CFG halves batched) and vae.decode;
`other` is whatever the call spends outside them (scheduler steps, latents set-up, post-processing).
One warm-up call first (reported apart as `first_image`), then --repeats timed calls; each stage is
reported as min / median over them.
Prints one JSON object on stdout.

Usage: python benches/diffusers_sd_turbo.py MODEL_DIR [--width 256 --height 256 --steps 1
       --guidance 0 --repeats 3 --threads 2]
MODEL_DIR: e.g. the random-weight folder made by benches/make_sd_turbo_random.py.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import time

import numpy as np
import torch

import diffusers
import transformers
from diffusers import StableDiffusionPipeline


class StageClock:
    """Accumulates wall time of wrapped callables per stage for the current run."""

    def __init__(self):
        self.current = {}

    def reset(self):
        self.current = {"text_encode_s": 0.0, "unet_steps_s": [], "vae_decode_s": 0.0}

    def wrap(self, fn, stage):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            dt = time.perf_counter() - t0
            if stage == "unet_steps_s":
                self.current[stage].append(dt)
            else:
                self.current[stage] += dt
            return out

        return timed


def summary(values):
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4),
            "all": [round(v, 4) for v in values]}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, dtype=torch.float32, safety_checker=None)
    pipe.to("cpu")
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)

    clock = StageClock()
    pipe.text_encoder.forward = clock.wrap(pipe.text_encoder.forward, "text_encode_s")
    pipe.unet.forward = clock.wrap(pipe.unet.forward, "unet_steps_s")
    pipe.vae.decode = clock.wrap(pipe.vae.decode, "vae_decode_s")

    def run():
        clock.reset()
        generator = torch.Generator("cpu").manual_seed(args.seed)
        t = time.perf_counter()
        with torch.inference_mode():
            image = pipe(prompt=args.prompt, width=args.width, height=args.height, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, generator=generator, output_type="np").images
        total = time.perf_counter() - t
        return total, dict(clock.current), image

    # The first image of the process (untimed in the warm stats below): what a one-shot run sees.
    first_total, first_stages, _ = run()
    first = {"text_encode_s": round(first_stages["text_encode_s"], 4),
             "unet_s": round(sum(first_stages["unet_steps_s"]), 4),
             "vae_decode_s": round(first_stages["vae_decode_s"], 4),
             "total_s": round(first_total, 4)}
    totals, text, unet, vae, other, per_step = [], [], [], [], [], []
    image = None
    for _ in range(args.repeats):
        total, stages, image = run()
        totals.append(total)
        text.append(stages["text_encode_s"])
        unet.append(sum(stages["unet_steps_s"]))
        per_step.append(stages["unet_steps_s"])
        vae.append(stages["vae_decode_s"])
        other.append(total - stages["text_encode_s"] - sum(stages["unet_steps_s"]) - stages["vae_decode_s"])

    result = {
        "impl": "diffusers",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "model_dir": os.path.abspath(args.model_dir),
        "device": "cpu",
        "cpu": cpu_name(),
        "dtype": "f32",
        "threads": torch.get_num_threads(),
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance": args.guidance,
        "cfg": args.guidance > 1.0,
        "repeats": args.repeats,
        "scheduler": type(pipe.scheduler).__name__,
        "load_s": round(load_s, 4),
        "text_encode_s": summary(text),
        "unet_s": summary(unet),
        "unet_step_s": [summary([run_steps[i] for run_steps in per_step]) for i in range(len(per_step[0]))],
        "vae_decode_s": summary(vae),
        "other_s": summary(other),
        "total_s": summary(totals),
        "first_image": first,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "image_finite": bool(np.isfinite(image).all()),
        "image_shape": list(image.shape),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
