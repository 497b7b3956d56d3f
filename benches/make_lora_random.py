"""Writes a random kohya-format LoRA of rank R for a diffusers folder, for timing only.

Every Linear (and 1x1 projection conv) in the UNet's attention blocks and every attention/MLP
Linear of the text encoders gets a `lora_down`/`lora_up` pair and an `.alpha` (R/2), named the way
kohya/sd-scripts names them (module path with dots flattened to underscores). With
`--sdxl-shapes` no folder is read: the LoRA is shaped for SDXL 1.0 (UNet from its published
config, CLIP-L + OpenCLIP-bigG text encoders), built on torch's meta device so nothing
full-size is allocated; then only the file is written (~R/32 × 440 MB in f16).

Usage:
    python benches/make_lora_random.py MODEL_DIR OUT.safetensors [--rank 32]
    python benches/make_lora_random.py --sdxl-shapes OUT.safetensors [--rank 32]

`--seed N` makes another LoRA of the same shapes (switch timings need two); `--unet-only` leaves
the text encoders out, as LoRAs trained with kohya's `--network_train_unet_only` do.
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def shapes_of(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def components(args):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if args.sdxl_shapes:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SDXL_UNET)
            te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
            te2 = CLIPTextModel(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20))
        return [("lora_unet_", shapes_of(unet)), ("lora_te1_", shapes_of(te1)), ("lora_te2_", shapes_of(te2))]
    root = Path(args.model)
    out = []
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
        out.append(("lora_unet_", shapes_of(unet)))
        for i, name in enumerate(["text_encoder", "text_encoder_2"]):
            cfg = root / name / "config.json"
            if cfg.is_file():
                te = CLIPTextModel(CLIPTextConfig.from_json_file(cfg))
                prefix = "lora_te_" if not (root / "text_encoder_2").is_dir() else f"lora_te{i + 1}_"
                out.append((prefix, shapes_of(te)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--sdxl-shapes", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="another seed makes another LoRA of the same shapes")
    ap.add_argument("--unet-only", action="store_true", help="no text-encoder layers (kohya's --network_train_unet_only)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    sd = {}
    for prefix, shapes in components(args):
        if args.unet_only and prefix != "lora_unet_":
            continue
        for name, shape in shapes.items():
            unet_target = "attentions" in name and (len(shape) == 2 or name.endswith(("proj_in", "proj_out")))
            te_target = "self_attn" in name or "mlp" in name
            if not (unet_target if prefix == "lora_unet_" else te_target):
                continue
            te_name = name if name.startswith("text_model.") or prefix == "lora_unet_" else "text_model." + name
            key = prefix + te_name.replace(".", "_")
            out_f, in_f = shape[0], shape[1]
            sd[key + ".lora_down.weight"] = (torch.randn(args.rank, in_f, generator=g) * 0.01).half()
            sd[key + ".lora_up.weight"] = (torch.randn(out_f, args.rank, generator=g) * 0.01).half()
            sd[key + ".alpha"] = torch.tensor(args.rank / 2).half()
    save_file(sd, args.out, metadata={"ss_network_dim": str(args.rank), "ss_network_module": "networks.lora"})
    print(f"{args.out}: {len(sd) // 3} layers, rank {args.rank}")


if __name__ == "__main__":
    main()
