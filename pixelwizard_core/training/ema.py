"""Exponential moving average of the trainable weights (reference: decay 0.99, started at step 10).

Shadows are float32 copies with the parameters' own layout, so under FSDP each rank keeps only its
shard (DTensor arithmetic stays local).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weight after every optimiser step from ``start_step`` on;
    the shadow is a plain copy of the weights at ``start_step``."""

    def __init__(self, decay: float = 0.99, start_step: int = 10) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1) (the reference uses 0.99; 0 turns EMA off), got {decay!r}")
        if start_step < 0:
            raise ConfigError(f"EMA start step must be >= 0, got {start_step}")
        self.decay = decay
        self.start_step = start_step
        self.shadow: dict[str, torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after the optimiser step that made ``step`` steps in total."""
        if not self.enabled or step < self.start_step:
            return
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
            return
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)
