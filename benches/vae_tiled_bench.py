"""Tiled VAE decode on CPU: kiln (whole-image GroupNorm statistics) vs diffusers' enable_tiling(),
same latents shape, same run, SDXL VAE shape with RANDOM weights (cost does not depend on values).

Each side runs in its own process and reports its own peak RSS (VmHWM). kiln runs the release
example `vae_tiled_bench` (cargo build --release -p kiln-core --example vae_tiled_bench first).

Usage: python benches/vae_tiled_bench.py WORK_DIR [--latent 512] [--tile 512] [--threads 2] [--kiln-bin PATH]
(--latent 512 = a 4096² image, the issue's size; --tile = tile size in output pixels for both).
"""
import argparse
import json
import os
import subprocess
import sys
import time

SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

DIFFUSERS = r"""
import json, sys, time, torch
from diffusers import AutoencoderKL
torch.set_num_threads(int(sys.argv[4]))
vae = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
vae.enable_tiling()
tile = int(sys.argv[3])
vae.tile_sample_min_size = tile
vae.tile_latent_min_size = tile // 8
side = int(sys.argv[2])
z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
with torch.no_grad():
    img = vae.decode(z).sample
s = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"seconds": s, "width": img.shape[-1], "height": img.shape[-2], "peak_rss_bytes": int(hwm) * 1024}))
"""


def make_vae(path: str) -> None:
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SDXL_VAE).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--latent", type=int, default=512)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kiln-bin", help="the vae_tiled_bench example binary (default: target/release/examples/)")
    a = ap.parse_args()
    vae_dir = os.path.join(a.work, "sdxl-vae-random")
    make_vae(vae_dir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kiln_bin = a.kiln_bin or os.path.join(root, "target", "release", "examples", "vae_tiled_bench")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    kiln = json.loads(subprocess.check_output([kiln_bin, vae_dir, str(a.latent), str(a.tile)], env=env).decode().strip().splitlines()[-1])
    diff = json.loads(
        subprocess.check_output([sys.executable, "-c", DIFFUSERS, vae_dir, str(a.latent), str(a.tile), str(a.threads)])
        .decode()
        .strip()
        .splitlines()[-1]
    )
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "latent": a.latent,
        "tile_px": a.tile,
        "kiln": kiln,
        "diffusers_enable_tiling": diff,
        "time_ratio_kiln_over_diffusers": kiln["seconds"] / diff["seconds"],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
