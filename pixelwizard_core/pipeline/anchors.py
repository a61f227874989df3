"""Anchors: the LR latent that fixes layout and motion, with everything needed to reproduce or reuse it.

On disk an anchor is a safetensors file (one tensor, ``latent``) with its metadata in the header,
checked for integrity on load. Never a pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.latents import load_tensor_file, save_tensor_file
from .presets import LATENT_CHANNELS, check_size, latent_frames

ANCHOR_KIND = "pixelwizard.anchor"
HR_LATENT_KIND = "pixelwizard.hr_latent"


@dataclass
class Anchor:
    """A normalised Wan2.2 latent [1, 48, T, H/16, W/16] float32 (CPU) and how it was made."""

    latent: torch.Tensor
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    frames: int
    steps: int
    shift: float
    cfg: float
    solver: str = "unipc"
    model: str = ""

    @classmethod
    def from_latent(cls, latent: torch.Tensor, *, model: str, prompt: str = "") -> "Anchor":
        """An anchor the LR stage did not sample (a native sampler's latent, encoded footage): size and frame
        count come from ``latent`` [1, 48, T, h, w]; there are no sampling settings; ``model`` says where it
        came from."""
        _, _, frames, height, width = latent.shape
        check_size(width * 16, height * 16)
        return cls(latent=latent, prompt=prompt, negative_prompt="", seed=0, width=width * 16, height=height * 16,
                   frames=4 * (frames - 1) + 1, steps=0, shift=0.0, cfg=0.0, solver="", model=model)

    def __post_init__(self) -> None:
        expected = (1, LATENT_CHANNELS, latent_frames(self.frames), self.height // 16, self.width // 16)
        if tuple(self.latent.shape) != expected:
            raise ConfigError(
                f"anchor latent has shape {tuple(self.latent.shape)} but its metadata ({self.width}x{self.height}, "
                f"{self.frames} frames) needs {list(expected)}"
            )

    def metadata(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latent"}

    def save(self, path: str | Path, *, overwrite: bool = False, extra: dict | None = None) -> Path:
        """The anchor file; ``extra`` metadata is stored too (e.g. the command line's run settings)."""
        return save_tensor_file(path, {"latent": self.latent.float().cpu().contiguous()},
                                {**(extra or {}), **self.metadata()}, kind=ANCHOR_KIND, overwrite=overwrite,
                                make_dirs=True)

    @classmethod
    def load(cls, path: str | Path) -> "Anchor":
        tensors, metadata = load_tensor_file(path, kind=ANCHOR_KIND)
        known = {f.name for f in fields(cls)}
        return cls(latent=tensors["latent"], **{k: v for k, v in metadata.items() if k in known})


def save_hr_latent(path: str | Path, latent: torch.Tensor, metadata: dict, *, overwrite: bool = False) -> Path:
    """The HR latent [1, 48, T, H/16, W/16] with its metadata (prompt, seeds, size, anchor...)."""
    return save_tensor_file(path, {"latent": latent.float().cpu().contiguous()}, metadata, kind=HR_LATENT_KIND,
                            overwrite=overwrite, make_dirs=True)


def load_hr_latent(path: str | Path) -> tuple[torch.Tensor, dict]:
    tensors, metadata = load_tensor_file(path, kind=HR_LATENT_KIND)
    latent = tensors["latent"]
    if latent.dim() != 5 or latent.shape[1] != LATENT_CHANNELS:
        raise ConfigError(f"{path}: latent shape {tuple(latent.shape)} is not [1, 48, T, H/16, W/16]")
    return latent, metadata
