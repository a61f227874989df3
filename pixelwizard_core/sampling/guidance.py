"""Classifier-free guidance, in the reference's operation order and in float32."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond); scale 1 gives cond, 0 gives uncond."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"guidance scale must be a finite number (the reference uses 5.0), got {scale!r}")
    if cond.shape != uncond.shape:
        raise ConfigError(f"cond {list(cond.shape)} and uncond {list(uncond.shape)} predictions must have one shape")
    uncond = uncond.float()
    return uncond + scale * (cond.float() - uncond)
