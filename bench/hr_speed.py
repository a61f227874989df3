"""Wall time of the 4-step HR shortcut stage against a 50-step direct generation at the same size.

Both run in this one process on the same random-weight models (a narrow DiT with the real head size
and 48 latent channels), with CFG 5.0 and UniPC as the reference samples them: the HR stage makes
2 x 4 DiT calls plus the anchor injector, the direct generation 2 x 50 DiT calls at the same token
count. Reported as a ratio; absolute CPU times are noise.

    python bench/hr_speed.py [--size 512x288] [--frames 9] [--dim 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelwizard_core.models.dit import DiTConfig, WanDiT  # noqa: E402
from pixelwizard_core.models.hr import WanHRDiT  # noqa: E402
from pixelwizard_core.pipeline.presets import StageSettings, parse_resolution  # noqa: E402
from pixelwizard_core.pipeline.stages import hr_latent, lr_anchor  # noqa: E402
from pixelwizard_core.pipeline.text import TextConditioning  # noqa: E402


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512x288")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = DiTConfig(dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.dim // 128, num_layers=args.layers)
    direct, shortcut = WanDiT(config).eval(), WanHRDiT(config).eval()
    width, height, _ = parse_resolution(args.size)
    text = TextConditioning(torch.randn(1, 64, config.text_dim), torch.randn(1, 64, config.text_dim), "p", "n")
    hr = StageSettings(width, height, args.frames, 4, 5.5, 5.0)
    full = StageSettings(width, height, args.frames, 50, 5.0, 5.0)
    anchor = torch.randn(1, 48, hr.latent_shape[1], 16, 28)
    hr_latent(shortcut, anchor, text, StageSettings(width, height, args.frames, 2, 5.5, 5.0), 0)  # warm-up
    hr_seconds = timed(hr_latent, shortcut, anchor, text, hr, 10000)
    direct_seconds = timed(lr_anchor, direct, text, full, 100, batch_cfg=False)
    print(f"size {width}x{height}, {args.frames} frames ({hr.tokens} tokens), DiT dim {args.dim} x {args.layers} blocks")
    print(f"| 50-step direct / 4-step HR stage | {direct_seconds / hr_seconds:.1f}x |")
    print(f"| DiT calls | 100 / 8 = {100 / 8:.1f}x |")


if __name__ == "__main__":
    main()
