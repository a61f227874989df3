"""Peak host memory of tiled against untiled VAE decoding, on CPU, all cases in one run.

A narrow Wan2.2 VAE (same structure, ``dec_dim`` channels instead of 256, random weights) decodes one
random latent in each of these ways, each in a fresh subprocess while a thread samples the process's
anonymous resident memory (RssAnon) every 2 ms; frames are turned into uint8 as a writer would, then
dropped:

* untiled ``vae.decode`` (the whole float32 video is returned);
* untiled ``vae.decode_stream`` (frames streamed, nothing kept);
* the reference's algorithm (decode.py): each tile decoded whole, blended into a full-video canvas;
* ours, ``tiled_decode_stream(order="frame")``: tiles in lockstep, frames streamed, no canvas;
* ours, ``tiled_decode_stream(order="tile")``: one tile at a time into a canvas (the reference's profile).

It also prints, without running anything heavy (meta tensors), the causal-cache size of the REAL VAE
(dec_dim 256, float32) at 2K and 4K, untiled and per tile: on a GPU that cache, not the canvas,
decides which order fits.

    python bench/tiled_decode_memory.py [--dec-dim 16] [--latent 31 22 40] [--patches 3] [--overlap 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peak_memory import peak_extra_rss  # noqa: E402
from pixelwizard_core.io import frames_to_uint8  # noqa: E402
from pixelwizard_core.models import vae_split_ops  # noqa: E402
from pixelwizard_core.models.vae import VAEConfig, WanVAE, decoder_cache_elements  # noqa: E402
from pixelwizard_core.pipeline.tile_plan import plan_tiles  # noqa: E402
from pixelwizard_core.pipeline.tiled_decode import blend_plan, tiled_decode_stream  # noqa: E402

CASES = {
    "untiled `vae.decode` (whole video returned)": "untiled",
    "untiled `vae.decode_stream` (frames streamed)": "untiled_stream",
    "reference decode.py: whole tiles into a canvas": "reference",
    "ours: `tiled_decode_stream`, order=frame (lockstep)": "frame",
    "ours: `tiled_decode_stream`, order=tile": "tile",
}


def build(args: argparse.Namespace) -> tuple[WanVAE, torch.Tensor]:
    torch.manual_seed(0)
    model = WanVAE(VAEConfig(dim=4, dec_dim=args.dec_dim)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # activations of order 1, like a trained network
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
    frames, height, width = args.latent
    return model, torch.randn(1, 48, frames, height, width)


def reference_decode(vae: WanVAE, latent: torch.Tensor, patches: int, overlap: int) -> torch.Tensor:
    """decode.py's algorithm along width: whole tile decodes, canvas += piece*mask, / weight."""
    plan = blend_plan(tuple(latent.shape[-2:]), patches, "w", overlap, "reference")
    canvas = torch.zeros(1, 3, 4 * (latent.shape[2] - 1) + 1, plan.height, plan.width)
    weight = torch.zeros(plan.height, plan.width)
    for tile, mask in zip(plan.tiles, plan.masks):
        piece = vae.decode(latent[..., tile.cols[0]:tile.cols[1]])
        rows, cols = tile.pixels()
        canvas[..., rows, cols] += piece * mask
        weight[rows, cols] += mask
        del piece
    return canvas / weight.clamp_min(1e-6)


def run_case(case: str, args: argparse.Namespace) -> None:
    vae, latent = build(args)
    if case == "untiled":
        video = vae.decode(latent)
        frames_to_uint8(video)
    elif case == "untiled_stream":
        for chunk in vae.decode_stream(latent):
            frames_to_uint8(chunk)
    elif case == "reference":
        frames_to_uint8(reference_decode(vae, latent, args.patches, args.overlap))
    else:
        for chunk in tiled_decode_stream(vae, latent, args.patches, "w", args.overlap, order=case):
            frames_to_uint8(chunk)


def measure(case: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    with peak_extra_rss() as peak:
        run_case(case, args)
    return {"peak_mib": peak["bytes"] / 2**20, "seconds": peak["seconds"]}


def real_cache_gib(height: int, width: int) -> float:
    """Causal-cache bytes of the real decoder (float32) after a few latent frames, from meta tensors."""
    return decoder_cache_elements(VAEConfig(), (height, width)) * 4 / 2**30


def print_real_cache() -> None:
    print("\nReal Wan2.2 VAE decoder, float32 (bfloat16: half): causal cache and blending canvas, GiB")
    print("| size | untiled cache | largest tile's cache | all tiles' caches (order=frame) | canvas + weight "
          "(order=tile / reference, 121 frames) |\n|---|---|---|---|---|")
    for name, (h, w), n in (("2K 2560x1440, 3 tiles", (90, 160), 3), ("4K 3840x2144, 4 tiles", (134, 240), 4)):
        per_tile = [real_cache_gib(t.rows[1] - t.rows[0], t.cols[1] - t.cols[0]) for t in plan_tiles((h, w), n, "w", 3)]
        canvas = (3 * 121 + 1) * h * 16 * w * 16 * 4 / 2**30
        print(f"| {name} | {real_cache_gib(h, w):.1f} | {max(per_tile):.1f} | {sum(per_tile):.1f} | {canvas:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dec-dim", type=int, default=16, help="decoder width (the real VAE has 256)")
    parser.add_argument("--latent", type=int, nargs=3, default=[31, 22, 40], metavar=("T", "H", "W"))
    parser.add_argument("--patches", type=int, default=3)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    frames, height, width = args.latent
    pixels = f"{width * 16}x{height * 16}, {4 * (frames - 1) + 1} frames"
    video_mib = 3 * (4 * (frames - 1) + 1) * height * width * 256 * 4 / 2**20
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads available, torch {torch.__version__}, "
          f"MAX_OP_ELEMENTS {vae_split_ops.MAX_OP_ELEMENTS}")
    print(f"VAE dec_dim {args.dec_dim}, latent {args.latent} -> {pixels}; float32 video {video_mib:.0f} MiB; "
          f"{args.patches} tiles along width, overlap {args.overlap}\n")
    print("| method | peak extra RssAnon | vs untiled decode | time (noisy) |\n|---|---|---|---|")
    results = {}
    for label, case in CASES.items():
        command = [sys.executable, __file__, "--dec-dim", str(args.dec_dim), "--latent", *map(str, args.latent),
                   "--patches", str(args.patches), "--overlap", str(args.overlap), "--threads", str(args.threads),
                   "--child", case]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[case] = json.loads(out.strip().splitlines()[-1])
        ratio = results[case]["peak_mib"] / results["untiled"]["peak_mib"]
        print(f"| {label} | {results[case]['peak_mib']:.0f} MiB | {ratio:.2f}x | {results[case]['seconds']:.1f} s |",
              flush=True)
    print_real_cache()


if __name__ == "__main__":
    main()
