"""Parity of the TI2V first frame (``pipeline/first_frame.py``) with the official ``WanTI2V.i2v``.

Run: python tools/parity/ti2v.py --wan-repo /path/to/Wan2.2

The official i2v loop is inline code in ``wan/textimage2video.py`` (l.550-598 at 42bf4cf); its mask comes
from ``wan.utils.utils.masks_like``, which this script imports from the checkout (the module's imageio and
torchvision imports are stubbed: ``masks_like`` uses torch only). The three steps of the loop that the
first frame touches are evaluated here with the official mask, on random inputs: the start latent
``(1 - mask2) * z + mask2 * noise``, the per-token timesteps ``(mask2[0][:, ::2, ::2] * t).flatten()``
padded with ``t`` to seq_len, and the re-injection after a step. Writes tests/fixtures/parity_ti2v.safetensors.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]


def official_masks_like(wan_repo: Path):
    for name in ("imageio", "torchvision"):  # imported by the module, unused by masks_like
        sys.modules.setdefault(name, types.ModuleType(name))
    spec = importlib.util.spec_from_file_location("wan_official_utils", wan_repo / "wan" / "utils" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.masks_like


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wan-repo", default=os.environ.get("WAN22_REPO", ""))
    args = parser.parse_args()
    masks_like = official_masks_like(Path(args.wan_repo))
    generator = torch.Generator().manual_seed(0)
    channels, frames, h, w = 48, 3, 8, 14  # a 448x256-like grid, 9 video frames
    noise = torch.randn(channels, frames, h, w, generator=generator)
    z = torch.randn(channels, 1, h, w, generator=generator)
    stepped = torch.randn(channels, frames, h, w, generator=generator)  # a latent after a solver step
    t = torch.tensor([937.5])
    _, mask2 = masks_like([noise], zero=True)
    start = (1.0 - mask2[0]) * z + mask2[0] * noise
    seq_len = frames * h * w // 4
    temp_ts = (mask2[0][0][:, ::2, ::2] * t).flatten()
    temp_ts = torch.cat([temp_ts, temp_ts.new_ones(seq_len - temp_ts.size(0)) * t])
    reinjected = (1.0 - mask2[0]) * z + mask2[0] * stepped
    out = ROOT / "tests" / "fixtures" / "parity_ti2v.safetensors"
    save_file({"noise": noise, "z": z, "stepped": stepped, "t": t, "start": start, "timesteps": temp_ts.unsqueeze(0),
               "reinjected": reinjected}, str(out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
