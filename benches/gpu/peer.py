"""The PyTorch/diffusers side of the GPU comparison (issue 6): times, on one device and dtype,
  sd-turbo : SD 2.1-shaped StableDiffusionPipeline, 512x512, 1 step, guidance 0, Euler trailing
  sdxl     : SDXL-base-shaped StableDiffusionXLPipeline, 1024x1024, 30 steps, CFG 6, DPM++ 2M Karras
  x4plus   : basicsr RRDBNet x4 (Real-ESRGAN x4plus), one 1024x1024 image -> 4096x4096, untiled
with RANDOM weights built from the configs in memory (cost does not depend on weight values; no
files, no network), the same architectures as `kiln bench --synthetic` builds. Each case: warm-up
calls, then --repeats timed calls (torch.cuda.synchronize around each); the stage split comes from one
extra call with synchronising wrappers. Prints one JSON object per line on stdout.
x4plus also saves its random weights as basicsr-keyed safetensors (--save-x4plus) for `kiln upscale`.

Usage: python3 benches/gpu/peer.py --device cuda --dtype f16 [--cases sd-turbo,sdxl,x4plus]
       python3 benches/gpu/peer.py --device cpu --dtype f32 --shrink 16 --size-div 8   (CPU check)
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent.parent
TOKENIZER = REPO / "tests" / "fixtures" / "clip-tokenizer-small"
PROMPT = "a photo of an astronaut riding a horse on the moon"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return {"median": round(statistics.median(times), 5), "min": round(min(times), 5),
            "all": [round(v, 5) for v in times]}


class StageClock:
    """Synchronising wrappers: per-stage seconds of one call (adds a sync per stage)."""

    def __init__(self, device):
        self.device, self.stages = device, {}

    def wrap(self, obj, attr, stage):
        fn = getattr(obj, attr)

        def run(*a, **k):
            sync(self.device)
            t = time.perf_counter()
            out = fn(*a, **k)
            sync(self.device)
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - t
            return out

        setattr(obj, attr, run)


def clip(hidden, layers, heads, inter, act, proj, k, with_projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(hidden_size=hidden // k, intermediate_size=inter // k, num_hidden_layers=layers,
                         num_attention_heads=heads, hidden_act=act, projection_dim=proj // k, vocab_size=49408)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def vae(k, scaling):
    from diffusers import AutoencoderKL
    g = 32 // k
    # force_upcast off: kiln's tiers decode in f16 (the final tier uses the fp16-fix VAE)
    return AutoencoderKL(block_out_channels=[128 // k, 256 // k, 512 // k, 512 // k], norm_num_groups=g,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         latent_channels=4, layers_per_block=2, sample_size=512, scaling_factor=scaling,
                         force_upcast=False)


def sd_turbo(k):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer
    unet = UNet2DConditionModel(
        block_out_channels=[320 // k, 640 // k, 1280 // k, 1280 // k], norm_num_groups=32 // k,
        attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024 // k, use_linear_projection=True,
        sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    sched = EulerDiscreteScheduler(timestep_spacing="trailing", beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(vae=vae(k, 0.18215), text_encoder=clip(1024, 23, 16, 4096, "gelu", 512, k),
                                   tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl(k):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer
    unet = UNet2DConditionModel(
        block_out_channels=[320 // k, 640 // k, 1280 // k], norm_num_groups=32 // k,
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
        cross_attention_dim=2048 // k, use_linear_projection=True, sample_size=128,
        addition_embed_type="text_time", addition_time_embed_dim=256 // k,
        projection_class_embeddings_input_dim=1280 // k + 6 * (256 // k),
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
    sched = DPMSolverMultistepScheduler(use_karras_sigmas=True, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    return StableDiffusionXLPipeline(
        vae=vae(k, 0.13025), text_encoder=clip(768, 12, 12, 3072, "quick_gelu", 768, k),
        text_encoder_2=clip(1280, 32, 20, 5120, "gelu", 1280, k, with_projection=True),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)


# basicsr's RRDBNet (Real-ESRGAN x4plus: num_feat 64, num_block 23, num_grow_ch 32), same keys.
class RDB(nn.Module):
    def __init__(self, f, g):
        super().__init__()
        self.conv1 = nn.Conv2d(f, g, 3, 1, 1)
        self.conv2 = nn.Conv2d(f + g, g, 3, 1, 1)
        self.conv3 = nn.Conv2d(f + 2 * g, g, 3, 1, 1)
        self.conv4 = nn.Conv2d(f + 3 * g, g, 3, 1, 1)
        self.conv5 = nn.Conv2d(f + 4 * g, f, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, f, g):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = RDB(f, g), RDB(f, g), RDB(f, g)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, f=64, blocks=23, g=32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, f, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(f, g) for _ in range(blocks)])
        self.conv_body = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_hr = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_last = nn.Conv2d(f, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def run_pipe(name, pipe, args, device, dtype, width, height, steps, guidance):
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu")

    def call():
        with torch.inference_mode():
            return pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=steps,
                        guidance_scale=guidance, generator=gen.manual_seed(0), output_type="np").images

    total = timed(call, device, args.warmup, args.repeats)
    clock = StageClock(device)
    clock.wrap(pipe.unet, "forward", "unet_steps")
    clock.wrap(pipe.vae, "decode", "vae_decode")
    for enc in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, enc, None) is not None:
            clock.wrap(getattr(pipe, enc), "forward", "text_encode")
    image = call()
    finite = bool(torch.isfinite(torch.from_numpy(image)).all())
    return {"case": name, "impl": "diffusers", "width": width, "height": height, "steps": steps,
            "guidance": guidance, "seconds": total, "stages_one_call": {k: round(v, 5) for k, v in clock.stages.items()},
            "output_finite": finite}


def run_x4plus(args, device, dtype, side):
    with torch.device(device):
        net = RRDBNet(blocks=23 if args.shrink == 1 else max(1, 23 // args.shrink))
    if args.save_x4plus:
        from safetensors.torch import save_file
        save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}, args.save_x4plus)
    net = net.to(dtype).eval()
    x = torch.rand(1, 3, side, side, device=device, dtype=dtype)

    def call():
        with torch.inference_mode():
            return net(x)

    total = timed(call, device, args.warmup, args.repeats)
    return {"case": "x4plus", "impl": "pytorch", "input": [side, side], "output": [4 * side, 4 * side],
            "blocks": len(net.body), "seconds": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f16", choices=["f16", "bf16", "f32"])
    ap.add_argument("--cases", default="sd-turbo,sdxl,x4plus")
    ap.add_argument("--shrink", type=int, default=1, help="divide channel widths by K (CPU checks)")
    ap.add_argument("--size-div", type=int, default=1, help="divide image sides by N (CPU checks)")
    ap.add_argument("--sdxl-steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save-x4plus", help="write the x4plus random weights here (safetensors)")
    args = ap.parse_args()
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    d, k = args.size_div, args.shrink
    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "shrink": k, "size_div": d}
    for case in args.cases.split(","):
        with torch.device(device) if device.type == "cuda" else torch.device("cpu"):
            if case == "sd-turbo":
                r = run_pipe(case, sd_turbo(k), args, device, dtype, 512 // d, 512 // d, 1, 0.0)
            elif case == "sdxl":
                r = run_pipe(case, sdxl(k), args, device, dtype, 1024 // d, 1024 // d, args.sdxl_steps, 6.0)
            elif case == "x4plus":
                r = run_x4plus(args, device, dtype, 1024 // d)
            else:
                sys.exit(f"unknown case {case}")
        r.update(meta)
        print(json.dumps(r), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
