"""Measure the coefficients of the peak-memory estimate (pixelwizard_core/pipeline/memory.py) on CPU.

Each case runs in a fresh subprocess with glibc told to mmap every allocation above 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set at once and the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) is the peak of live tensor memory,
with no sampling gaps. The figure of a case is that peak minus the resident memory just before the
measured call (weights and inputs already built), after one warm-up call at the smallest size.

Cases, all at the REAL widths (only depth and token count are small):

* ``dit``: the PixelWizard HR DiT (dim 3072, ffn 14336, 24 heads; 2 blocks: blocks run one after
  another, so depth adds weights, not activations), bf16 with the anchor injector in float32 as
  loaded, one forward (batch 1: the HR stage runs the two CFG branches one after the other) at
  several token counts. The slope is the activation bytes per token.
* ``t5``: the umT5-XXL encoder (dim 4096, 64 heads; 2 blocks), bf16, batch 2 x 512 tokens (prompt and
  negative prompt): activation bytes of the text stage.
* ``vae``: the real Wan2.2 VAE decoder (float32 and bfloat16) streaming 3 latent frames at two small
  sizes, with ``MAX_OP_ELEMENTS`` scaled down by the same area ratio as the latent, so that the
  convolutions split exactly as they would at the size named by ``--vae-target``. The causal cache per
  latent pixel is computed exactly from meta tensors; transient = measured - cache.

    python bench/memory_estimate.py [--cases dit t5 vae:fp32 vae:bf16] [--tokens 8192 16384 24576]
                                    [--vae-sizes 8x8 8x16] [--vae-target 90x59]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixelwizard_core.models import vae_split_ops  # noqa: E402
from pixelwizard_core.models.dit import DiTConfig  # noqa: E402
from pixelwizard_core.models.hr import WanHRDiT  # noqa: E402
from pixelwizard_core.models.t5 import T5Config, UMT5Encoder  # noqa: E402
from pixelwizard_core.models.vae import VAEConfig, WanVAE, decoder_cache_elements  # noqa: E402

GIB = 2**30


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def _measure(run) -> int:
    """Peak resident bytes above the current resident set while ``run()`` executes."""
    import gc

    gc.collect()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    run()
    return _status("VmHWM") - base


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)


def _grid(tokens: int) -> tuple[int, int, int]:
    """A latent grid (T, H, W) with T*(H/2)*(W/2) == tokens, T = 4."""
    per_frame = tokens // 4
    side = 2 ** (per_frame.bit_length() // 2)
    return 4, 2 * side, 2 * (per_frame // side)


def case_dit(tokens: list[int]) -> dict:
    with torch.device("meta"):
        model = WanHRDiT(DiTConfig(num_layers=2))
    model = model.to_empty(device="cpu")
    _randomize(model)
    model.to(torch.bfloat16).spatial_adapter.float()
    model.eval()
    context = torch.randn(1, 512, 4096).to(torch.bfloat16)
    t = torch.tensor([900.0])
    dt = torch.tensor([250.0])
    out = {}
    for i, n in enumerate([tokens[0], *tokens]):
        f, h, w = _grid(n)
        x = torch.randn(1, 48, f, h, w)
        anchor = torch.randn(1, 48, f, h // 2, w // 2)
        with torch.no_grad():
            peak = _measure(lambda: model(x, t, context, dt=dt, anchor=anchor))
        if i:  # the first call is the warm-up
            out[f * (h // 2) * (w // 2)] = peak
    return out


def case_t5() -> dict:
    with torch.device("meta"):
        model = UMT5Encoder(T5Config(num_layers=2))
    model = model.to_empty(device="cpu")
    _randomize(model)
    model.to(torch.bfloat16).eval()
    ids = torch.randint(0, 256384, (2, 512))
    mask = torch.ones(2, 512, dtype=torch.long)
    with torch.no_grad():
        model(ids, mask)
        return {"peak": _measure(lambda: model(ids, mask))}


def case_vae(sizes: list[tuple[int, int]], dtype: str, target: tuple[int, int]) -> dict:
    dtype_ = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    model = model.to_empty(device="cpu")
    _randomize(model)
    model.to(dtype_).eval()
    out = {}
    for i, (h, w) in enumerate([sizes[0], *sizes]):
        vae_split_ops.MAX_OP_ELEMENTS = max(1, int(2**30 * (h * w) / (target[0] * target[1])))
        latent = torch.randn(1, 48, 3, h, w)

        def run() -> None:
            for chunk in model.decode_stream(latent):
                del chunk

        peak = _measure(run)
        if i:
            out[h * w] = peak
    return out


def cache_bytes_per_latent_pixel(element_size: int = 4) -> float:
    """Causal-cache bytes per latent pixel of the real decoder (exact, from meta tensors)."""
    return decoder_cache_elements(VAEConfig(), (16, 16)) * element_size / (16 * 16)


def _fit(points: dict) -> tuple[float, float]:
    """Least-squares slope and intercept of bytes against size."""
    xs, ys = [float(k) for k in points], [float(v) for v in points.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.child == "dit":
        result = case_dit(args.tokens)
    elif args.child == "t5":
        result = case_t5()
    else:
        sizes = [tuple(map(int, s.split("x"))) for s in args.vae_sizes]
        target = tuple(map(int, args.vae_target.split("x")))
        result = case_vae(sizes, args.child.split(":")[1], target)
    print(json.dumps({str(k): v for k, v in result.items()}))


def _run_child(case: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--child", case, "--threads", str(args.threads),
               "--tokens", *map(str, args.tokens), "--vae-sizes", *args.vae_sizes, "--vae-target", args.vae_target]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return {int(k) if k.isdigit() else k: v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 24576])
    parser.add_argument("--vae-sizes", nargs="+", default=["8x8", "8x16"], help="latent HxW of the VAE cases")
    parser.add_argument("--vae-target", default="90x59", help="latent HxW whose op splitting is imitated "
                        "(90x59: the widest 2K tile with 3 tiles and overlap 3; 134x66 for 4K)")
    parser.add_argument("--cases", nargs="+", default=["dit", "t5", "vae:fp32", "vae:bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    for case in args.cases:
        points = _run_child(case, args)
        print(f"\n{case}: " + ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in points.items()))
        if case == "dit":
            slope, icept = _fit(points)
            print(f"  activations: {slope / 1024:.1f} KiB per token + {icept / 2**20:.0f} MiB")
        elif case.startswith("vae"):
            slope, icept = _fit(points)
            size = 4 if case.endswith("fp32") else 2
            cache = cache_bytes_per_latent_pixel(size)
            print(f"  decode: {slope / 1024:.1f} KiB per latent pixel + {icept / 2**20:.0f} MiB; "
                  f"of which causal cache {cache / 1024:.1f} KiB (exact), transient {(slope - cache) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
