"""The worker pool on CPU: 2 processes (Ulysses 2, with and without FSDP) against 1 process.

Every configuration runs through :class:`pixelwizard_core.distributed.pool.WorkerPool` with gloo: 1 process
with T threads (the same cores as 2 x T/2), 1 process with T/2 threads (one process's share), and 2
processes with T/2 threads each, Ulysses 2 without and with FSDP; all on the same random-weight
models written to a temporary folder: a narrow DiT with the real head size (128) and 48 latent channels,
its HR variant, and the tiny test VAE. Per configuration: one warm-up HR job (loads the model), then the
timed HR job (models resident; 2 x steps DiT calls with CFG) and a timed tiled decode (tiles split over
the processes). Speed-ups and errors are against the first row. Peak memory is each worker process's peak
resident set (ru_maxrss, the interpreter and torch included); CPU s is user + system time summed over the
processes (the work done, less sensitive than wall time to other programs sharing the cores).

    python bench/multiprocess.py [--size 1024x576] [--frames 9] [--dim 512] [--layers 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelwizard_core.distributed.pool import WorkerPool  # noqa: E402
from pixelwizard_core.models.dit import DiTConfig  # noqa: E402
from pixelwizard_core.models.hr import WanHRDiT  # noqa: E402
from pixelwizard_core.models.vae import VAEConfig, WanVAE  # noqa: E402
from pixelwizard_core.pipeline.handles import ModelHandle  # noqa: E402
from pixelwizard_core.pipeline.presets import StageSettings, parse_resolution  # noqa: E402
from pixelwizard_core.pipeline.engine import DecodeSettings  # noqa: E402
from pixelwizard_core.pipeline.text import TextConditioning  # noqa: E402


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's own init, zero-initialised layers given small values so every part computes."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.dim() > 1 and not tensor.any():
            tensor = torch.randn(tensor.shape, generator=generator) * 0.02
        state[name] = tensor.detach().clone().contiguous()
    return state


def write_models(folder: Path, config: DiTConfig) -> dict[str, ModelHandle]:
    torch.manual_seed(0)
    save_file(random_weights(WanHRDiT(config), 1), folder / "hr.safetensors")
    save_file(random_weights(WanVAE(VAEConfig.tiny()), 2), folder / "vae.safetensors")
    return {"hr": ModelHandle.for_file("hr", folder / "hr.safetensors", precision="fp32"),
            "vae": ModelHandle.for_file("vae", folder / "vae.safetensors", precision="fp32")}


def run(label: str, pool: WorkerPool, models: dict, text: TextConditioning, settings: StageSettings,
        anchor: torch.Tensor, decode: DecodeSettings) -> dict:
    try:
        pool.hr_latent(models["hr"], anchor, text, settings, 10000)  # loads the model, warms up
        start = time.perf_counter()
        latent = pool.hr_latent(models["hr"], anchor, text, settings, 10000)
        hr_seconds = time.perf_counter() - start
        assert pool.last_report.loaded == []
        hr_cpu = sum(info["cpu_seconds"] for info in pool.last_report.ranks)
        pool.decode(models["vae"], latent, decode)  # loads the VAE
        start = time.perf_counter()
        pool.decode(models["vae"], latent, decode)
        decode_seconds = time.perf_counter() - start
        decode_cpu = sum(info["cpu_seconds"] for info in pool.last_report.ranks)
        reports = pool.describe()
        peaks = [info["peak_rss_mib"] for info in reports]
        held = [info["models"]["hr"]["local"] * 4 / 2**20 for info in reports]  # float32 parameters
    finally:
        pool.shutdown()
    return {"label": label, "hr": hr_seconds, "decode": decode_seconds, "hr_cpu": hr_cpu, "decode_cpu": decode_cpu,
            "peaks": peaks, "held": held, "latent": latent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024x576")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in total, split over the processes")
    parser.add_argument("--patches", type=int, default=4)
    args = parser.parse_args()
    config = DiTConfig(dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.dim // 128, num_layers=args.layers)
    width, height, _ = parse_resolution(args.size)
    settings = StageSettings(width, height, args.frames, args.steps, 5.5, 5.0)
    decode = DecodeSettings(num_patches=args.patches, overlap=1)
    text = TextConditioning(torch.randn(1, 64, config.text_dim), torch.randn(1, 64, config.text_dim), "p", "n")
    anchor = torch.randn(1, 48, settings.latent_shape[1], 16, 28)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        models = write_models(Path(folder), config)
        half = max(1, args.threads // 2)
        results = [
            run(f"1 process x {args.threads} threads", WorkerPool(1, backend="gloo", threads=args.threads), models,
                text, settings, anchor, decode),
            run(f"1 process x {half} thread(s)", WorkerPool(1, backend="gloo", threads=half), models, text, settings,
                anchor, decode),
            run(f"2 processes x {half}, Ulysses 2", WorkerPool(2, ulysses=2, backend="gloo", threads=half),
                models, text, settings, anchor, decode),
            run(f"2 processes x {half}, Ulysses 2 + FSDP",
                WorkerPool(2, ulysses=2, dit_fsdp=True, backend="gloo", threads=half),
                models, text, settings, anchor, decode),
        ]
    base = results[0]
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"HR stage {width}x{height}, {args.frames} frames ({settings.tokens} tokens), {args.steps} steps, CFG 5 "
          f"({2 * args.steps} DiT calls), DiT dim {args.dim} ({config.num_heads} heads) x {args.layers} blocks; "
          f"decode {args.patches} tiles; {args.threads} threads in total")
    print("| configuration | HR stage s (CPU s) | speed-up | decode s (CPU s) | speed-up | peak RSS per process (MiB) "
          "| HR DiT parameters held per process (MiB) | HR latent rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        error = ((r["latent"] - base["latent"]).abs().max() / base["latent"].abs().max()).item()
        print(f"| {r['label']} | {r['hr']:.2f} ({r['hr_cpu']:.1f}) | {base['hr'] / r['hr']:.2f} | "
              f"{r['decode']:.2f} ({r['decode_cpu']:.1f}) | {base['decode'] / r['decode']:.2f} | "
              f"{' / '.join(f'{p:.0f}' for p in r['peaks'])} | {' / '.join(f'{h:.0f}' for h in r['held'])} | "
              f"{error:.1e} |")


if __name__ == "__main__":
    main()
