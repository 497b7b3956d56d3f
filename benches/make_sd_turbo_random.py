"""Builds a full-size SD-Turbo-shaped diffusers folder with RANDOM weights, for timing only.

No diffusion weights can be downloaded on these machines, and compute cost does not depend on weight
values, so the benchmark runs the real architecture (stabilityai/sd-turbo = SD 2.1 layout, 512x512)
with random init. The images it makes are noise.

Shapes (from the SD 2.1 / sd-turbo diffusers configs):
- unet: UNet2DConditionModel, block_out_channels (320, 640, 1280, 1280), 3x CrossAttnDownBlock2D +
  DownBlock2D, UpBlock2D + 3x CrossAttnUpBlock2D, layers_per_block 2, attention_head_dim [5, 10, 20, 20]
  (SD2's name for the head count: heads of 64 channels), cross_attention_dim 1024, use_linear_projection,
  sample_size 64 (512 px), norm_num_groups 32.
  upcast_attention: false, as in SD 2.1-base, the 512 px model sd-turbo derives from (the 768 px
  v-model sets true). It only changes the dtype of the q.k product in f16; in f32 it costs nothing either way.
- text_encoder: OpenCLIP ViT-H text tower as CLIPTextModel: hidden 1024, 23 layers (SD2 drops the last of
  24), 16 heads, intermediate 4096, gelu, projection_dim 512, vocab 49408; bos/eos/pad ids 0/2/1 as in
  the hub config (transformers then pools by argmax; SD uses last_hidden_state, so it does not matter).
- tokenizer: full CLIP BPE (48894 merges -> 49408 tokens) built from open_clip's
  bpe_simple_vocab_16e6.txt.gz with tests/fixtures/clip-tokenizer-small/make.py, pad "!" as in SD 2.x.
- vae: the standard SD AutoencoderKL (128, 256, 512, 512), layers_per_block 2, scaling_factor 0.18215.
- scheduler: EulerDiscreteScheduler, timestep_spacing "trailing" (1 step -> t = 999), prediction_type
  "epsilon": sd-turbo is distilled (ADD) from SD 2.1 at 512 px, whose base model is an eps model, and
  its hub scheduler config is SD 2.1-base's with Euler/trailing. Prediction type does not change cost.

Usage: python benches/make_sd_turbo_random.py OUT_DIR [--bpe PATH/bpe_simple_vocab_16e6.txt.gz]
(the .gz is in the open-clip-torch wheel: pip download --no-deps open-clip-torch==3.3.0, unzip it).
Takes about 1-2 minutes and ~5.2 GB of disk (f32 safetensors).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_MAKE = REPO / "tests" / "fixtures" / "clip-tokenizer-small" / "make.py"
N_MERGES = 48894  # 49408 - 2 * 256 - 2

SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def make_tokenizer(dst: Path, bpe: Path):
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(TOKENIZER_MAKE), str(bpe), str(N_MERGES)], cwd=dst, check=True)
    for name in ["special_tokens_map.json", "tokenizer_config.json"]:
        cfg = json.loads((dst / name).read_text())
        cfg["pad_token"] = "!"
        (dst / name).write_text(json.dumps(cfg, indent=2) + "\n")


def clip_config(hidden, layers, heads, intermediate, act, projection, ids=(49406, 49407, 1)):
    """A CLIP text tower's config (49408 tokens, 77 positions); `ids`: bos, eos, pad."""
    bos, eos, pad = ids
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                          num_attention_heads=heads, num_hidden_layers=layers, hidden_act=act,
                          projection_dim=projection, max_position_embeddings=77, layer_norm_eps=1e-5,
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def sd_vae(sample_size, scaling_factor):
    """The SD / SDXL AutoencoderKL shape (128, 256, 512, 512), 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--bpe", type=Path, required=True)
    args = ap.parse_args()
    out = args.out_dir
    start = time.time()
    torch.manual_seed(0)

    tokenizer_dir = out / "tokenizer"
    make_tokenizer(tokenizer_dir, args.bpe)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 49408, len(tokenizer)

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention=False,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20],
        dual_cross_attention=False,
        use_linear_projection=True,
        upcast_attention=False,
        num_class_embeds=None,
    )
    # SD2's OpenCLIP-H tower; bos/eos/pad ids 0/2/1 as in the hub config.
    text_encoder = CLIPTextModel(clip_config(1024, 23, 16, 4096, "gelu", 512, ids=(0, 2, 1)))
    vae = sd_vae(sample_size=512, scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # Hub-style tokenizer folder (transformers 5 would write tokenizer.json only).
    for f in tokenizer_dir.iterdir():
        if f.name not in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
            f.unlink()
    make_tokenizer(tokenizer_dir, args.bpe)

    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in [("unet", unet), ("text_encoder", text_encoder), ("vae", vae)]}
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"out_dir": str(out), "parameters": counts, "bytes": size, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
