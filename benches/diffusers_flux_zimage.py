"""Times diffusers' FLUX.1 / Z-Image transformers and transformers' T5 / Qwen3 encoders on CPU, f32,
per block and per whole forward, on the models benches/make_flux_zimage_random.py writes. The peer
of crates/kiln-core/examples/flux_zimage_bench.rs (same inputs, same JSON); benches/flux_zimage_cpu.py
runs both and compares.

Inputs: 512² (64×64 latent: FLUX packs it 2×2 to 1024 tokens with 512 T5 tokens; Z-Image patches
it to 1024 tokens with a 128-token caption), 512 ids for each encoder (FluxPipeline's T5 budget;
ZImagePipeline pads the Qwen3 input to 512 and passes the attention mask). Random values: cost does
not depend on them.

Per-block times come from forward pre/post hooks on each block inside the timed whole forwards
(CPU ops are synchronous, so the clock brackets the block's work). One untimed forward first.

Usage: python benches/diffusers_flux_zimage.py MODELS_DIR flux|zimage|t5|qwen3 [--repeats 3]
"""
import argparse
import json
import os
import time

import torch

LATENT = 64
TEXT_TOKENS = 512
CAPTION_TOKENS = 128


def ids(n, vocab):
    # The same ids as the kiln example: spread over the vocabulary.
    return torch.tensor([[(i * 7919 + 13) % vocab for i in range(n)]], dtype=torch.long)


def load(kind, path):
    if kind == "flux":
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32)
    if kind == "zimage":
        from diffusers import ZImageTransformer2DModel
        return ZImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32)
    if kind == "t5":
        from transformers import T5EncoderModel
        return T5EncoderModel.from_pretrained(path, dtype=torch.float32)
    from transformers import Qwen3Model
    return Qwen3Model.from_pretrained(path, dtype=torch.float32)


def setup(kind, model):
    """(named blocks in run order, the whole forward as a closure, the depth measured)."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    if kind == "flux":
        n = (LATENT // 2) ** 2
        hidden = torch.randn(1, n, cfg.in_channels, generator=g)
        text = torch.randn(1, TEXT_TOKENS, cfg.joint_attention_dim, generator=g)
        pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
        # FluxPipeline's ids: text zeros, image (0, row, column) of the packed grid.
        img_ids = torch.zeros(LATENT // 2, LATENT // 2, 3)
        img_ids[..., 1] = torch.arange(LATENT // 2)[:, None]
        img_ids[..., 2] = torch.arange(LATENT // 2)[None, :]
        kwargs = dict(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=torch.tensor([0.5]), img_ids=img_ids.reshape(-1, 3),
                      txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.tensor([3.5]), return_dict=False)
        blocks = [(f"double.{i}", b) for i, b in enumerate(model.transformer_blocks)]
        blocks += [(f"single.{i}", b) for i, b in enumerate(model.single_transformer_blocks)]
        depth = {"double": cfg.num_layers, "single": cfg.num_single_layers}
        return blocks, lambda: model(**kwargs), depth
    if kind == "zimage":
        latents = torch.randn(cfg.in_channels, 1, LATENT, LATENT, generator=g)  # [C, F, H, W]
        caption = torch.randn(CAPTION_TOKENS, cfg.cap_feat_dim, generator=g)
        blocks = [(f"noise_refiner.{i}", b) for i, b in enumerate(model.noise_refiner)]
        blocks += [(f"context_refiner.{i}", b) for i, b in enumerate(model.context_refiner)]
        blocks += [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
        depth = {"noise_refiner": cfg.n_refiner_layers, "context_refiner": cfg.n_refiner_layers,
                 "layers": cfg.n_layers}
        return blocks, lambda: model([latents], torch.tensor([0.5]), [caption], return_dict=False), depth
    if kind == "t5":
        x = ids(TEXT_TOKENS, cfg.vocab_size)
        blocks = [(f"block.{i}", b) for i, b in enumerate(model.encoder.block)]
        # FluxPipeline: text_encoder_2(ids, output_hidden_states=False), no attention mask.
        return blocks, lambda: model(x, output_hidden_states=False), {"block": cfg.num_layers}
    x = ids(TEXT_TOKENS, cfg.vocab_size)
    mask = torch.ones_like(x, dtype=torch.bool)
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    # ZImagePipeline: all layers run, hidden_states[-2] is kept.
    fwd = lambda: model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[-2]  # noqa: E731
    return blocks, fwd, {"layers": cfg.num_hidden_layers}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models_dir")
    ap.add_argument("model", choices=["flux", "zimage", "t5", "qwen3"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load(args.model, os.path.join(args.models_dir, args.model)).eval()
    blocks, forward, depth = setup(args.model, model)

    times = {name: [] for name, _ in blocks}
    started = {}
    for name, block in blocks:
        block.register_forward_pre_hook(lambda _m, _a, name=name: started.__setitem__(name, time.perf_counter()))
        block.register_forward_hook(
            lambda _m, _a, _o, name=name: times[name].append((time.perf_counter() - started[name]) * 1e3))

    step = []
    with torch.inference_mode():
        forward()
        for ts in times.values():
            ts.clear()
        for _ in range(args.repeats):
            t = time.perf_counter()
            forward()
            step.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"blocks": times, "step": step, "depth": depth, "tool": "diffusers", "model": args.model,
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "total_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
