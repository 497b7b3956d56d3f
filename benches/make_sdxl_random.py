"""Builds a full-size SDXL-shaped diffusers folder with RANDOM weights, for timing only.

The same idea as benches/make_sd_turbo_random.py (which this reuses for the tokenizers and the
scheduler) for the SDXL base 1.0 architecture, from its diffusers configs:
- unet: UNet2DConditionModel, block_out_channels (320, 640, 1280), DownBlock2D + 2x CrossAttnDownBlock2D,
  2x CrossAttnUpBlock2D + UpBlock2D, transformer_layers_per_block (1, 2, 10), attention_head_dim (5, 10, 20),
  cross_attention_dim 2048, use_linear_projection, addition_embed_type "text_time" (time ids 256-d,
  projection input 2816), sample_size 128 (1024 px). 2.57 G parameters.
- text_encoder: CLIP ViT-L text model (768 wide, 12 layers, 12 heads, 3072, quick_gelu).
- text_encoder_2: OpenCLIP ViT-bigG text model with projection (1280 wide, 32 layers, 20 heads, 5120, gelu,
  projection 1280).
- vae: the SD AutoencoderKL shape with SDXL's scaling_factor 0.13025, sample_size 1024.
- scheduler: EulerDiscreteScheduler ("leading" spacing as SDXL base ships).

Usage: python benches/make_sdxl_random.py OUT_DIR --bpe PATH/bpe_simple_vocab_16e6.txt.gz
Takes a few minutes, ~14 GB of RAM and ~13.9 GB of disk (f32 safetensors; the UNet is sharded).
"""
import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from make_sd_turbo_random import SCHEDULER, clip_config, make_tokenizer, sd_vae


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--bpe", type=Path, required=True)
    args = ap.parse_args()
    out = args.out_dir
    start = time.time()
    torch.manual_seed(0)
    tokenizer_dirs = [out / "tokenizer", out / "tokenizer_2"]
    for d in tokenizer_dirs:
        make_tokenizer(d, args.bpe)
    tokenizers = [CLIPTokenizer.from_pretrained(d) for d in tokenizer_dirs]

    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(clip_config(768, 12, 12, 3072, "quick_gelu", 768))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(1280, 32, 20, 5120, "gelu", 1280))
    vae = sd_vae(sample_size=1024, scaling_factor=0.13025)
    scheduler = dict(SCHEDULER, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # Hub-style tokenizer folders (transformers 5 would write tokenizer.json only); SDXL's first
    # tokenizer pads with <|endoftext|>, its second with "!".
    for d in tokenizer_dirs:
        for f in d.iterdir():
            f.unlink()
        make_tokenizer(d, args.bpe)
    for name in ["special_tokens_map.json", "tokenizer_config.json"]:
        cfg = json.loads((tokenizer_dirs[0] / name).read_text())
        cfg["pad_token"] = "<|endoftext|>"
        (tokenizer_dirs[0] / name).write_text(json.dumps(cfg, indent=2) + "\n")

    models = [("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("vae", vae)]
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in models}
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"out_dir": str(out), "parameters": counts, "bytes": size, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
