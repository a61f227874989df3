"""A prompt file on 4 gloo processes: 1 group of 4 (``--ulysses_size 4``) against 2 groups of 2 (``--ulysses_size 2``).

Both runs are ``python -m pixelwizard_core generate --prompt_file`` in 4 processes given torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, ...; torchrun's agent left out so that only the ranks are measured), on the same
random-weight models written to a temporary folder: a DiT with the real head size (4 heads of 128, so both
degrees divide them), its HR variant, the tiny test umT5 and VAE. CPU time is user + system time of the whole
process tree (the 4 ranks and their ffmpeg children: ``getrusage(RUSAGE_CHILDREN)`` before and after), which
other programs on the machine disturb much less than wall time. The HR latents of both runs are compared.

    python bench/batch_groups.py [--prompts 4] [--lr_size 256*128] [--resolution 512x256] [--frames 9]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from spm_support import train_umt5_like_spm  # noqa: E402
from tiny_models import _weights, state_dicts, write_comfy, write_pixelwizard  # noqa: E402

from pixelwizard_core.models.dit import DiTConfig, WanDiT  # noqa: E402
from pixelwizard_core.models.hr import WanHRDiT  # noqa: E402
from pixelwizard_core.pipeline.anchors import load_hr_latent  # noqa: E402

PROMPTS = ["a red fox in snow", "a boat at dawn", "rain on a window", "a lighthouse at night", "a busy market",
           "leaves in wind", "a train in fog", "waves on rocks"]


def write_models(root: Path, dim: int, layers: int) -> list[str]:
    states = state_dicts()
    config = DiTConfig(dim=dim, ffn_dim=2 * dim, freq_dim=256, num_heads=dim // 128, num_layers=layers, text_dim=32)
    states["dit"], states["hr"] = _weights(WanDiT(config), 10), _weights(WanHRDiT(config), 11)
    (root / "spm").mkdir(parents=True)
    comfy = write_comfy(root / "comfy", states, train_umt5_like_spm(root / "spm"))
    pw = write_pixelwizard(root / "pw", states)
    return ["--text_encoder", str(comfy["t5"]), "--vae_path", str(comfy["vae"]), "--lr_ckpt", str(pw["lr"]),
            "--hr_ckpt", str(pw["hr"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int) -> tuple[float, float]:
    """Run ``argv`` in ``world`` ranks; (wall seconds, CPU seconds of the process tree)."""
    port, before = free_port(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    ranks = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        ranks.append(subprocess.Popen([sys.executable, "-m", "pixelwizard_core", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in ranks:
        output = process.communicate()[0]
        if process.returncode:
            sys.exit(output[-3000:])
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--lr_size", default="256*128")
    parser.add_argument("--resolution", default="512x256")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--dim", type=int, default=512, help="DiT width: dim/128 heads (4 for --dim 512)")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pw-batch-"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:args.prompts]) + "\n")
    common = ["generate", *write_models(root, args.dim, args.layers), "--device", "cpu", "--dtype", "fp32",
              "--lr_size", args.lr_size, "--frame_num", str(args.frames), "--lr_steps", "4", "--resolution",
              args.resolution, "--hr_steps", "2", "--num_patches", "4", "--overlap", "1", "--base_seed", "3",
              "--prompt_file", str(root / "prompts.txt")]
    print(f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}; {args.prompts} prompts, LR {args.lr_size}, HR {args.resolution}, "
          f"{args.frames} frames, DiT dim {args.dim} x {args.layers} blocks")
    results = {}
    for groups, size in ((1, 4), (2, 2)):
        out = root / f"g{groups}"
        results[groups] = launch([*common, "--ulysses_size", str(size), "--video_dir", str(out), "--save_dir",
                                  str(out)], 4)
        print(f"{groups} group(s) of {size}: wall {results[groups][0]:.1f} s, CPU {results[groups][1]:.1f} s "
              f"(load average {os.getloadavg()[0]:.1f})")
    errors = []
    for index in range(args.prompts):
        one, _ = load_hr_latent(root / "g1" / f"{index}.safetensors")
        two, _ = load_hr_latent(root / "g2" / f"{index}.safetensors")
        errors.append(((one - two).abs().max() / one.abs().max()).item())
    print(f"CPU-time ratio (1 group of 4 / 2 groups of 2): {results[1][1] / results[2][1]:.2f}; wall-time ratio "
          f"{results[1][0] / results[2][0]:.2f}; largest HR latent relative difference {max(errors):.1e}")


if __name__ == "__main__":
    main()
