"""Re-detail benchmark: a SIZE² image (a smooth synthetic picture) super-resolved 2x and
re-detailed by a diffusion model on blended latent tiles, with kiln's release binary, on CPU.
Prints the stages' seconds, the time per denoising step, the tile grid and peak RSS.

    cargo build --release -p kiln-cli
    python benches/redetail_bench.py MODEL_DIR [--size 1024] [--steps 10] [--strength 0.3]

MODEL_DIR: a diffusers folder, e.g. the SD-Turbo-shaped random model made by
benches/make_sd_turbo_random.py. Needs only the Python standard library.
"""
import argparse
import json
import math
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_png(path, size):
    """A smooth RGB test picture (gradients and soft rings) as an 8-bit PNG."""
    rows = []
    for y in range(size):
        row = bytearray([0])
        for x in range(size):
            r = int(255 * x / (size - 1))
            g = int(255 * y / (size - 1))
            b = int(127.5 + 127.5 * math.sin(math.hypot(x - size / 2, y - size / 2) / 23.0))
            row += bytes((r, g, b))
        rows.append(bytes(row))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--strength", type=float, default=0.3)
    ap.add_argument("--tile", type=int, default=512)
    args = ap.parse_args()
    kiln = ROOT / "target/release/kiln"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.png", Path(tmp) / "out.png"
        write_png(src, args.size)
        cmd = [
            str(kiln), "upscale", str(src), "--model", str(ROOT / "tests/fixtures/sr/srvgg-tiny-x2.param"),
            "--scale", "2", "--redetail", "--redetail-model", args.model, "--steps", str(args.steps),
            "--strength", str(args.strength), "--guidance", "0", "--redetail-tile", str(args.tile),
            "--device", "cpu", "--json", "--out", str(out),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr)
        report = json.loads(r.stdout)
    d = report["redetail"][0]
    steps = d["step_seconds"]
    print(f"re-detail {args.size}² -> {d['size'][0]}x{d['size'][1]}: {len(steps)} steps of a {d['steps']}-step "
          f"{d['scheduler']} schedule at strength {d['strength']}, {d['tiles'][0]}x{d['tiles'][1]} latent tiles "
          f"of {d['tile'] * 8} px (overlap {d['overlap'] * 8} px)")
    print(f"  VAE encode {d['vae_encode_seconds']:.1f} s, steps {', '.join(f'{s:.1f}' for s in steps)} s "
          f"({sum(steps) / max(len(steps), 1):.1f} s per step, "
          f"{sum(steps) / max(len(steps), 1) / (d['tiles'][0] * d['tiles'][1]):.2f} s per tile), "
          f"VAE decode {d['vae_decode_seconds']:.1f} s, total {d['seconds']:.1f} s")
    print(f"  peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
