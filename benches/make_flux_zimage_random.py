"""Writes full-width, reduced-depth FLUX.1 / Z-Image / T5-XXL / Qwen3-4B models with RANDOM weights.

For timing only (benches/flux_zimage_cpu.py): compute cost does not depend on weight values, and
these machines cannot download the real checkpoints. Every layer has its published width; only the
number of blocks is cut, so that f32 weights fit in memory (each folder is 2-3 GB) and a forward
takes seconds. Per-block times then extrapolate to full depth.

Shapes (published configs: FLUX.1-dev `transformer/config.json`, Tongyi-MAI/Z-Image-Turbo's, which are
diffusers' `ZImageTransformer2DModel` defaults, google/t5-v1_1-xxl, Qwen/Qwen3-4B):
- flux/: FluxTransformer2DModel, 24 heads x 128 (3072 wide), joint_attention_dim 4096, pooled 768,
  guidance_embeds, axes_dims_rope [16, 56, 56]; 1 double-stream + 2 single-stream blocks (full: 19 + 38).
- zimage/: ZImageTransformer2DModel, dim 3840, 30 heads x 128, FFN 10240, cap_feat_dim 2560,
  axes_dims [32, 48, 48]; 1 noise-refiner + 1 context-refiner + 2 main blocks (full: 2 + 2 + 30).
- t5/: T5EncoderModel, d_model 4096, d_ff 10240, 64 heads x d_kv 64, gated-gelu, vocab 32128,
  32 buckets / max distance 128; 2 layers (full: 24).
- qwen3/: Qwen3Model, hidden 2560, 32 query / 8 key-value heads x 128, intermediate 9728, vocab
  151936, rope theta 1e6; 3 layers (full: 36). Z-Image reads `hidden_states[-2]`: diffusers runs all
  layers, kiln stops after layer n-2, so 3 layers here are 3 timed layers in transformers, 2 in kiln.

Usage: python benches/make_flux_zimage_random.py OUT_DIR [--only flux zimage t5 qwen3]
About 10 GB of disk in all; one model is in memory at a time.
"""
import argparse
import gc
import time
from pathlib import Path

import torch

# Full-width configs with reduced depth; the depths are read back by the timing scripts.
FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=2,
              n_refiner_layers=1, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
              cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
              axes_lens=[1024, 512, 512])
T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
          relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
          layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
          tie_word_embeddings=False)
QWEN3 = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=3,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
             attention_bias=False, tie_word_embeddings=True)


def randomize_zeros(model):
    """diffusers starts some parameters at zero (pad tokens, modulation); give every one values."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)


def make(kind, out):
    torch.manual_seed(0)
    if kind == "flux":
        from diffusers import FluxTransformer2DModel
        model = FluxTransformer2DModel(**FLUX)
    elif kind == "zimage":
        from diffusers import ZImageTransformer2DModel
        model = ZImageTransformer2DModel(**ZIMAGE)
    elif kind == "t5":
        from transformers import T5Config, T5EncoderModel
        model = T5EncoderModel(T5Config(**T5))
    else:
        from transformers import Qwen3Config, Qwen3Model
        model = Qwen3Model(Qwen3Config(**QWEN3))
    randomize_zeros(model)
    model = model.eval()
    n = sum(p.numel() for p in model.parameters())
    # One file per model: kiln and diffusers both read sharded folders, but one file is simpler.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")
    print(f"{kind}: {n / 1e6:.1f} M parameters -> {out}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--only", nargs="*", default=["flux", "zimage", "t5", "qwen3"])
    args = ap.parse_args()
    for kind in args.only:
        t = time.time()
        make(kind, Path(args.out_dir) / kind)
        print(f"  {time.time() - t:.1f} s", flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
