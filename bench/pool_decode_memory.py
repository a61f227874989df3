"""Host memory of the worker pool's parent during a multi-process decode: streamed against whole.

Two gloo workers decode one random latent with the tiny test VAE (3 tiles along the width, overlap 1), in
a fresh process per case: ``WorkerPool.decode`` (every worker returns its tiles whole, the parent blends
the whole video) or ``WorkerPool.decode_stream`` (chunks blended as they arrive and dropped, as a video
writer would). The figure is the parent's peak of anonymous plus shared-memory resident set (RssAnon +
RssShmem: the /dev/shm files that carry large tensors count as shared memory) above its level just
before the decode, sampled every 2 ms, after a warm-up decode that loads the VAE in the workers.

    python bench/pool_decode_memory.py [--frames 31] [--latent 16x32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from multiprocess import random_weights  # noqa: E402
from peak_memory import peak_extra_rss  # noqa: E402

from pixelwizard_core.distributed.pool import WorkerPool  # noqa: E402
from pixelwizard_core.models.vae import VAEConfig, WanVAE  # noqa: E402
from pixelwizard_core.pipeline.handles import ModelHandle  # noqa: E402
from pixelwizard_core.pipeline.engine import DecodeSettings  # noqa: E402

SETTINGS = DecodeSettings(num_patches=3, overlap=1)


def measure(case: str, vae: ModelHandle, latent: torch.Tensor) -> dict:
    """One case in this process: the parent's peak above its start, and the wall time."""
    pool = WorkerPool(2, backend="gloo", threads=1)
    try:
        pool.decode(vae, latent[:, :, :2], SETTINGS)  # starts the workers and loads the VAE there
        with peak_extra_rss(fields=("RssAnon", "RssShmem")) as peak:
            if case == "stream":
                frames = sum(chunk.shape[2] for chunk in pool.decode_stream(vae, latent, SETTINGS))
            else:
                frames = pool.decode(vae, latent, SETTINGS).shape[2]
    finally:
        pool.shutdown()
    return {"frames": frames, "peak_bytes": peak["bytes"], "seconds": peak["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=31, help="latent frames (31: 121 video frames)")
    parser.add_argument("--latent", default="16x32", help="latent height x width (16x32: 256x512 pixels)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    height, width = (int(v) for v in args.latent.split("x"))
    latent = torch.randn(1, 48, args.frames, height, width, generator=torch.Generator().manual_seed(0))
    if args.child:
        case, folder = args.child
        result = measure(case, ModelHandle.for_file("vae", Path(folder) / "vae.safetensors", precision="fp32"), latent)
        print(f"{result['frames']} {result['peak_bytes']} {result['seconds']:.2f}")
        return
    video_mib = 3 * (4 * (args.frames - 1) + 1) * height * 16 * width * 16 * 4 / 2**20
    print(f"torch {torch.__version__}, latent {args.frames}x{height}x{width}, float32 video {video_mib:.0f} MiB")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        save_file(random_weights(WanVAE(VAEConfig.tiny()), 2), Path(folder) / "vae.safetensors")
        for case in ("whole", "stream"):
            started = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--frames", str(args.frames), "--latent", args.latent,
                                  "--child", case, folder], capture_output=True, text=True, check=True)
            frames, peak, seconds = out.stdout.split()
            print(f"{case:6s}: {frames} frames, parent peak {int(peak) / 2**20:.0f} MiB above start, decode "
                  f"{float(seconds):.1f} s (case {time.perf_counter() - started:.0f} s with start-up)")


if __name__ == "__main__":
    main()
