"""A random-weight SD1-layout pipeline for timing only-masked inpainting (cost does not depend on
weight values). SD1.5's block structure (3 cross-attention down blocks + 1 plain, factor-8 VAE),
narrower widths so a CPU run takes seconds; native size 512 x 512.
Usage: python benches/make_inpaint_bench_model.py OUT_DIR
"""
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
out = Path(sys.argv[1])
torch.manual_seed(0)
unet = UNet2DConditionModel(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8, cross_attention_dim=128, norm_num_groups=32,
)
text = CLIPTextModel(CLIPTextConfig(vocab_size=1514, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=256, max_position_embeddings=77, bos_token_id=1512,
                                    eos_token_id=1513, pad_token_id=1513))
vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                    block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4, norm_num_groups=32)
tok_src = ROOT / "tests/fixtures/clip-tokenizer-small"
tok = CLIPTokenizer.from_pretrained(tok_src)
sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                      steps_offset=1, set_alpha_to_one=False)
pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained(out, safe_serialization=True)
shutil.rmtree(out / "tokenizer")
shutil.copytree(tok_src, out / "tokenizer", ignore=shutil.ignore_patterns("*.py"))
print(f"wrote {out}")
